"""Reference models as ``nnx.Sequential`` stacks of a small layer vocabulary.

The vocabulary (what export, the NumPy runtime and the operation census understand):
``nnx.Linear``, ``nnx.Conv``, :class:`~ternjax.TernaryLinear`, :class:`~ternjax.TernaryConv`,
``nnx.BatchNorm``, ``nnx.Dropout``, :class:`ReLU`, :class:`MaxPool`, :class:`Flatten`.
Inputs are NHWC images (``(B, 28, 28, 1)`` for MNIST); :class:`Flatten` makes them vectors.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from ternjax.layers import QuantConfig, TernaryConv, TernaryLinear

FP = QuantConfig(weights="fp")


class ReLU(nnx.Module):
  def __call__(self, x):
    return nnx.relu(x)


class Flatten(nnx.Module):
  def __call__(self, x):
    return x.reshape(x.shape[0], -1)


class MaxPool(nnx.Module):
  def __init__(self, window: int = 2, strides: int | None = None):
    self.window = window
    self.strides = strides or window

  def __call__(self, x):
    return nnx.max_pool(x, (self.window,) * 2, (self.strides,) * 2)


def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm whose running statistics follow the batches within a few hundred steps."""
  return nnx.BatchNorm(features, momentum=0.9, rngs=rngs)


def _edge(quant: QuantConfig, fp_first_last: bool) -> QuantConfig:
  return FP if fp_first_last else quant


def mlp(quant: QuantConfig, *, fp_first_last: bool = False, rngs: nnx.Rngs,
        sizes=(784, 256, 128, 10)) -> nnx.Sequential:
  """784-256-128-10 MLP with ReLU; ``fp_first_last`` keeps the first and last layer float."""
  layers = [Flatten()]
  n = len(sizes) - 1
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    cfg = _edge(quant, fp_first_last) if i in (0, n - 1) else quant
    layers.append(TernaryLinear(a, b, quant=cfg, rngs=rngs))
    if i < n - 1:
      layers += [_bn(b, rngs), ReLU()]
  return nnx.Sequential(*layers)


def lenet5(quant: QuantConfig, *, fp_first_last: bool = False, rngs: nnx.Rngs) -> nnx.Sequential:
  """LeNet-5 as in the comparison seed: conv 5×5 32 → 64 (VALID), FC 1024-512-10."""
  edge = _edge(quant, fp_first_last)
  return nnx.Sequential(
      TernaryConv(1, 32, (5, 5), padding="VALID", quant=edge, rngs=rngs),
      _bn(32, rngs), ReLU(), MaxPool(2),
      TernaryConv(32, 64, (5, 5), padding="VALID", quant=quant, rngs=rngs),
      _bn(64, rngs), ReLU(), MaxPool(2),
      Flatten(),
      TernaryLinear(1024, 512, quant=quant, rngs=rngs),
      _bn(512, rngs), ReLU(),
      TernaryLinear(512, 10, quant=edge, rngs=rngs),
  )


def ternary_cnn(quant: QuantConfig, *, fp_first_last: bool = False,
                rngs: nnx.Rngs) -> nnx.Sequential:
  """Fully ternary CNN: every layer after the first takes ternary activations.

  No ReLU: BatchNorm output goes straight into the next layer's ternary activation quantizer
  (learned scale), so activations use all of {-1, 0, +1}. The first layer sees pixels, so its
  input is never ternarized; ``fp_first_last`` also keeps its weights and the last layer float.
  """
  act = dataclasses.replace(quant, activations="ternary")
  first = dataclasses.replace(_edge(quant, fp_first_last), activations="none")
  last = dataclasses.replace(FP, activations="ternary") if fp_first_last else act
  return nnx.Sequential(
      TernaryConv(1, 32, (5, 5), padding="VALID", quant=first, rngs=rngs),
      _bn(32, rngs), MaxPool(2),
      TernaryConv(32, 64, (5, 5), padding="VALID", quant=act, rngs=rngs),
      _bn(64, rngs), MaxPool(2),
      Flatten(),
      TernaryLinear(1024, 512, quant=act, rngs=rngs),
      _bn(512, rngs),
      TernaryLinear(512, 10, quant=last, rngs=rngs),
  )


MODELS = {"mlp": mlp, "lenet5": lenet5, "ternary_cnn": ternary_cnn}
