"""Reference models as ``nnx.Sequential`` stacks of a small layer vocabulary.

The vocabulary (what export, the NumPy runtime and the operation census understand):
``nnx.Linear``, ``nnx.Conv``, :class:`~ternjax.TernaryLinear`, :class:`~ternjax.TernaryConv`,
``nnx.BatchNorm``, ``nnx.Dropout``, :class:`ReLU`, :class:`MaxPool`, :class:`Flatten`.
Inputs are NHWC images (``(B, 28, 28, 1)`` for MNIST); :class:`Flatten` makes them vectors.

CIFAR-10 models (``CIFAR_MODELS``, ``(B, 32, 32, 3)`` inputs): the residual networks are
modules of their own (:class:`ResNet` of :class:`BasicBlock`, :class:`MobileNetV2` of
:class:`InvertedResidual`), as is :class:`ViT` (ViT-tiny); VGG-7 is a stack as above.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
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


def _bn(features: int, rngs: nnx.Rngs, dtype=None) -> nnx.BatchNorm:
  """BatchNorm whose running statistics follow the batches within a few hundred steps."""
  return nnx.BatchNorm(features, momentum=0.9, dtype=dtype, rngs=rngs)


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


# --------------------------------------------------------------------------------------------
# CIFAR-10: ResNet-20 (TTQ's), ResNet-18 (CIFAR variant), VGG-7 (TWN's)
#
# Every model takes ``quant`` for its ternary layers, ``fp_first`` / ``fp_last`` (keep the
# first conv / the classifier's weights float; TTQ keeps the first conv float), ``dtype`` (the
# compute dtype, e.g. bfloat16; parameters stay float32) and ``num_classes``. The first conv
# never quantizes its input (pixels). With ternary activations the ReLUs go: the ternary
# quantizer in front of every later layer is the nonlinearity and uses all of {-1, 0, +1}
# (a ReLU before it would leave only {0, +1}), as in :func:`ternary_cnn`.


def _cifar_quants(quant: QuantConfig, fp_first: bool, fp_last: bool):
  """The (first, inner, last) layers' configs."""
  first = dataclasses.replace(FP if fp_first else quant, activations="none")
  last = dataclasses.replace(FP, activations=quant.activations) if fp_last else quant
  return first, quant, last


def _relu(quant: QuantConfig):
  return (lambda x: x) if quant.activations == "ternary" else nnx.relu


def _conv(cin: int, cout: int, kernel: int, stride: int, quant: QuantConfig, dtype,
          rngs: nnx.Rngs) -> TernaryConv:
  """A bias-free conv (BatchNorm follows) with symmetric padding ``kernel // 2``."""
  return TernaryConv(cin, cout, (kernel, kernel), stride, padding=kernel // 2, use_bias=False,
                     quant=quant, dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):
  """Two 3×3 conv-BN layers and a shortcut, added before the last ReLU (He et al. 2016).

  Where the shape changes the shortcut is ``'A'`` (option A: subsample, zero-pad the new
  channels, no parameters; the CIFAR ResNets of He et al. and TTQ) or ``'projection'``
  (strided 1×1 conv and BatchNorm).
  """

  def __init__(self, cin: int, cout: int, stride: int, quant: QuantConfig, *, shortcut: str,
               dtype=None, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, cout, 3, stride, quant, dtype, rngs)
    self.bn1 = _bn(cout, rngs, dtype)
    self.conv2 = _conv(cout, cout, 3, 1, quant, dtype, rngs)
    self.bn2 = _bn(cout, rngs, dtype)
    self.relu = _relu(quant)
    self.stride, self.pad = stride, cout - cin
    reshape = stride != 1 or cin != cout
    self.projection = nnx.data(nnx.Sequential(_conv(cin, cout, 1, stride, quant, dtype, rngs),
                                              _bn(cout, rngs, dtype))
                               if reshape and shortcut == "projection" else None)

  def shortcut(self, x):
    if self.projection is not None:
      return self.projection(x)
    if self.stride == 1 and self.pad == 0:
      return x
    x = x[:, ::self.stride, ::self.stride]
    return jnp.pad(x, ((0, 0),) * 3 + ((self.pad // 2, self.pad - self.pad // 2),))

  def __call__(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nnx.Module):
  """CIFAR ResNet: 3×3 stem conv-BN-ReLU (no max-pool), stages of :class:`BasicBlock` (the
  first block of every stage after the first has stride 2), global average pool, linear."""

  def __init__(self, widths: tuple[int, ...], depth: int, quant: QuantConfig, *,
               shortcut: str, fp_first: bool = True, fp_last: bool = False,
               num_classes: int = 10, dtype=None, rngs: nnx.Rngs):
    first, inner, last = _cifar_quants(quant, fp_first, fp_last)
    self.stem = _conv(3, widths[0], 3, 1, first, dtype, rngs)
    self.bn = _bn(widths[0], rngs, dtype)
    self.relu = _relu(quant)
    blocks, cin = [], widths[0]
    for i, width in enumerate(widths):
      for j in range(depth):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(BasicBlock(cin, width, stride, inner, shortcut=shortcut, dtype=dtype,
                                 rngs=rngs))
        cin = width
    self.blocks = nnx.List(blocks)
    self.head = TernaryLinear(cin, num_classes, quant=last, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = self.relu(self.bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


def resnet20(quant: QuantConfig, **kwargs) -> ResNet:
  """ResNet-20 (He et al.; TTQ's CIFAR network): 16/32/64 channels, 3 blocks each, option-A
  shortcuts, 0.27 M parameters."""
  return ResNet((16, 32, 64), 3, quant, shortcut="A", **kwargs)


def resnet18(quant: QuantConfig, **kwargs) -> ResNet:
  """ResNet-18, CIFAR variant: 3×3 stem, no max-pool, 64/128/256/512 channels, 2 blocks
  each, 1×1 strided projection shortcuts (ternary like the other inner convs), 11 M params."""
  return ResNet((64, 128, 256, 512), 2, quant, shortcut="projection", **kwargs)


def vgg7(quant: QuantConfig, *, fp_first: bool = True, fp_last: bool = False,
         num_classes: int = 10, dtype=None, rngs: nnx.Rngs) -> nnx.Sequential:
  """VGG-7 (TWN's): 2×128C3-MP2-2×256C3-MP2-2×512C3-MP2-FC1024-FC, BatchNorm after each
  conv and the FC1024."""
  first, inner, last = _cifar_quants(quant, fp_first, fp_last)
  relu = [] if quant.activations == "ternary" else [ReLU()]
  layers, cin = [], 3
  for i, width in enumerate((128, 128, 256, 256, 512, 512)):
    layers += [_conv(cin, width, 3, 1, first if i == 0 else inner, dtype, rngs),
               _bn(width, rngs, dtype), *relu] + ([MaxPool(2)] if i % 2 else [])
    cin = width
  return nnx.Sequential(
      *layers, Flatten(),
      TernaryLinear(512 * 4 * 4, 1024, quant=inner, dtype=dtype, rngs=rngs),
      _bn(1024, rngs, dtype), *relu,
      TernaryLinear(1024, num_classes, quant=last, dtype=dtype, rngs=rngs))


class InvertedResidual(nnx.Module):
  """MobileNetV2's block (Sandler et al. 2018): 1×1 expansion conv-BN-ReLU (none when the
  expansion is 1), 3×3 depthwise conv-BN-ReLU (``feature_group_count`` = channels, stride
  here), 1×1 linear projection conv-BN; the input is added when the shape is kept."""

  def __init__(self, cin: int, cout: int, stride: int, expansion: int, quant: QuantConfig,
               depthwise: QuantConfig, *, dtype=None, rngs: nnx.Rngs):
    hidden = cin * expansion
    self.expand = nnx.data(nnx.Sequential(_conv(cin, hidden, 1, 1, quant, dtype, rngs),
                                          _bn(hidden, rngs, dtype)) if expansion != 1 else None)
    self.depthwise = TernaryConv(hidden, hidden, (3, 3), stride, padding=1, use_bias=False,
                                 feature_group_count=hidden, quant=depthwise, dtype=dtype,
                                 rngs=rngs)
    self.bn = _bn(hidden, rngs, dtype)
    self.project = _conv(hidden, cout, 1, 1, quant, dtype, rngs)
    self.bn_project = _bn(cout, rngs, dtype)
    self.relu = _relu(quant)
    self.residual = stride == 1 and cin == cout

  def __call__(self, x):
    y = x if self.expand is None else self.relu(self.expand(x))
    y = self.bn_project(self.project(self.relu(self.bn(self.depthwise(y)))))
    return x + y if self.residual else y


# (expansion, channels, blocks, stride of the first block): MobileNetV2's table with the CIFAR
# strides (the stem and the second stage keep stride 1: 32×32 inputs end at 4×4, not 1×1).
MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nnx.Module):
  """MobileNetV2 for CIFAR: 3×3 stem conv (32, stride 1), ``stages`` (default
  :data:`MOBILENETV2_STAGES`) of :class:`InvertedResidual`, 1×1 conv to 1280, global average
  pool, linear; 2.2 M parameters.

  ``fp_depthwise`` keeps the depthwise convs float (9 weights per channel: a rule that keeps
  them out of ternarization), else they are ternary like the other inner convs.
  """

  def __init__(self, quant: QuantConfig, *, fp_first: bool = True, fp_last: bool = False,
               fp_depthwise: bool = False, stages=MOBILENETV2_STAGES, num_classes: int = 10,
               dtype=None, rngs: nnx.Rngs):
    first, inner, last = _cifar_quants(quant, fp_first, fp_last)
    depthwise = dataclasses.replace(FP, activations=quant.activations) if fp_depthwise else inner
    self.stem = _conv(3, 32, 3, 1, first, dtype, rngs)
    self.bn = _bn(32, rngs, dtype)
    blocks, cin = [], 32
    for expansion, cout, n, stride in stages:
      for j in range(n):
        blocks.append(InvertedResidual(cin, cout, stride if j == 0 else 1, expansion, inner,
                                       depthwise, dtype=dtype, rngs=rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.last_conv = _conv(cin, 1280, 1, 1, inner, dtype, rngs)
    self.last_bn = _bn(1280, rngs, dtype)
    self.relu = _relu(quant)
    self.head = TernaryLinear(1280, num_classes, quant=last, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = self.relu(self.bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    x = self.relu(self.last_bn(self.last_conv(x)))
    return self.head(x.mean(axis=(1, 2)))


def mobilenetv2(quant: QuantConfig, **kwargs) -> MobileNetV2:
  """MobileNetV2, CIFAR strides (:class:`MobileNetV2`)."""
  return MobileNetV2(quant, **kwargs)


class EncoderBlock(nnx.Module):
  """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)).

  Attention is written out so that its projections are ternjax layers: one ``qkv``
  :class:`~ternjax.TernaryLinear` (dim → 3·dim), scaled dot products and softmax in float32
  (einsums: float code between the ternary layers), an ``out`` projection; the MLP is
  dim → mlp_dim (GELU) → dim, both :class:`~ternjax.TernaryLinear`.
  """

  def __init__(self, dim: int, heads: int, mlp_dim: int, quant: QuantConfig, *, dtype=None,
               rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.qkv = TernaryLinear(dim, 3 * dim, quant=quant, dtype=dtype, rngs=rngs)
    self.out = TernaryLinear(dim, dim, quant=quant, dtype=dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.fc1 = TernaryLinear(dim, mlp_dim, quant=quant, dtype=dtype, rngs=rngs)
    self.fc2 = TernaryLinear(mlp_dim, dim, quant=quant, dtype=dtype, rngs=rngs)

  def attention(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))                        # (B, T, heads, d_head)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(d / self.heads)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d))

  def __call__(self, x):
    x = x + self.attention(self.ln1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class ViT(nnx.Module):
  """Vision Transformer for 32×32 images: a patch embedding (a ``patch``×``patch`` conv with
  stride ``patch``: 64 tokens of 4×4 pixels), learned position embeddings, ``depth``
  :class:`EncoderBlock` s, a final LayerNorm, mean over the tokens, a linear head.

  The patch embedding is the first layer (``fp_first``) and the head the last (``fp_last``,
  float by default here); the LayerNorms are float.
  """

  def __init__(self, quant: QuantConfig, *, dim: int = 192, depth: int = 6, heads: int = 3,
               mlp_dim: int = 768, patch: int = 4, image: int = 32, fp_first: bool = True,
               fp_last: bool = True, num_classes: int = 10, dtype=None, rngs: nnx.Rngs):
    first, inner, last = _cifar_quants(quant, fp_first, fp_last)
    self.embed = TernaryConv(3, dim, (patch, patch), patch, padding="VALID", quant=first,
                             dtype=dtype, rngs=rngs)
    tokens = (image // patch) ** 2
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
    self.blocks = nnx.List([EncoderBlock(dim, heads, mlp_dim, inner, dtype=dtype, rngs=rngs)
                            for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.head = TernaryLinear(dim, num_classes, quant=last, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.position[...].astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x).mean(axis=1))


def vit_tiny(quant: QuantConfig, *, fp_last: bool = True, **kwargs) -> ViT:
  """ViT-tiny for CIFAR-10: 4×4 patches, dim 192, 3 heads, MLP 768, depth 6 (ViT-Ti has 12;
  6 trains in minutes on one H200), 2.7 M parameters; the head float unless ``fp_last=False``."""
  return ViT(quant, fp_last=fp_last, **kwargs)


CIFAR_MODELS = {"resnet20": resnet20, "resnet18": resnet18, "vgg7": vgg7,
                "mobilenetv2": mobilenetv2, "vit_tiny": vit_tiny}


# --------------------------------------------------------------------------------------------
# The airbench94 network (KellerJordan/cifar10-airbench, airbench94_muon.py): a frozen 2×2
# patch-whitening conv, three conv groups, 3×3 max-pool, a bias-free linear head scaled by
# 1/width. Inits follow the original: PyTorch's default uniform conv init with identity
# (Dirac) filters on the first ``cin`` outputs, head weights of standard deviation 1.


def whitening_kernel(images: jax.Array, size: int = 2, eps: float = 5e-4) -> jax.Array:
  """The ``(size, size, C, 2·C·size²)`` HWIO kernel that whitens ``images``' patches.

  The columns are the eigenvectors ``v`` of the (uncentred) covariance of every ``size×size``
  patch of the float NHWC ``images``, scaled by ``1/sqrt(λ + eps)``, then the same negated (so
  a following GELU keeps both signs): the first half of the conv's output has covariance
  ``diag(λ/(λ+eps)) ≈ I`` on these images.
  """
  n, h, w, c = images.shape
  patches = jnp.stack([images[:, i:h - size + 1 + i, j:w - size + 1 + j]
                       for i in range(size) for j in range(size)], axis=3)
  flat = patches.reshape(-1, size * size * c).astype(jnp.float32)  # (h, w, c) order: HWIO's
  eigenvalues, eigenvectors = jnp.linalg.eigh(flat.T @ flat / len(flat))
  scaled = (eigenvectors / jnp.sqrt(eigenvalues + eps)).reshape(size, size, c, -1)
  return jnp.concatenate([scaled, -scaled], axis=-1)


def _uniform(bound: float):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


def _torch_uniform(key, shape, dtype=jnp.float32):
  """PyTorch's default conv / linear init: U(±1/sqrt(fan_in)), fan_in = all axes but the last."""
  return _uniform(1 / math.sqrt(math.prod(shape[:-1])))(key, shape, dtype)


def _dirac_uniform(key, shape, dtype=jnp.float32):
  """:func:`_torch_uniform`, with output ``o < cin`` the identity filter (airbench's implicit
  residual)."""
  *window, cin, cout = shape
  centre = tuple(k // 2 for k in window)
  identity = jnp.zeros(shape, dtype).at[centre].set(jnp.eye(cin, cout, dtype=dtype))
  return jnp.where(jnp.arange(cout) < cin, identity, _torch_uniform(key, shape, dtype))


class ConvGroup(nnx.Module):
  """conv 3×3 → max-pool 2 → BatchNorm → GELU → conv 3×3 → BatchNorm → GELU; BatchNorm with
  running-statistics momentum 0.6, no scale (airbench freezes it at 1), eps 1e-12."""

  def __init__(self, cin: int, cout: int, quant: QuantConfig, *, dtype=None, rngs: nnx.Rngs):
    conv = lambda a, b: TernaryConv(a, b, (3, 3), padding="SAME", use_bias=False, quant=quant,
                                    kernel_init=_dirac_uniform, dtype=dtype, rngs=rngs)
    bn = lambda: nnx.BatchNorm(cout, momentum=0.6, epsilon=1e-12, use_scale=False, rngs=rngs)
    self.conv1, self.bn1, self.conv2, self.bn2 = conv(cin, cout), bn(), conv(cout, cout), bn()

  def __call__(self, x):
    x = self.bn1(nnx.max_pool(self.conv1(x), (2, 2), (2, 2)))
    return _gelu(self.bn2(self.conv2(_gelu(x))))


def _gelu(x):
  return nnx.gelu(x, approximate=False)  # PyTorch's nn.GELU


class Airbench(nnx.Module):
  """airbench94: whitening stem (2×2 VALID conv, 2·3·4 = 24 channels, bias; its kernel is set by
  ``stem.kernel[...] = whitening_kernel(...)`` and kept frozen by the optimizer), GELU, three
  :class:`ConvGroup` of ``widths``, max-pool 3, linear head without bias, logits / width.

  ``quant`` applies to every conv of the groups (the stem and the head stay float).
  """

  def __init__(self, quant: QuantConfig = FP, *, widths: tuple[int, ...] = (64, 256, 256),
               whiten_size: int = 2, num_classes: int = 10, dtype=None, rngs: nnx.Rngs):
    stem_width = 2 * 3 * whiten_size ** 2
    self.stem = nnx.Conv(3, stem_width, (whiten_size,) * 2, padding="VALID", use_bias=True,
                         kernel_init=_torch_uniform,
                         bias_init=_uniform(1 / math.sqrt(3 * whiten_size ** 2)),
                         dtype=dtype, rngs=rngs)
    cins = (stem_width, *widths[:-1])
    self.groups = nnx.List([ConvGroup(a, b, quant, dtype=dtype, rngs=rngs)
                            for a, b in zip(cins, widths)])
    # std 1: airbench rescales the head's default init to unit standard deviation
    self.head = nnx.Linear(widths[-1], num_classes, use_bias=False,
                           kernel_init=_uniform(math.sqrt(3)),
                           dtype=dtype, rngs=rngs)
    self.scale = 1 / widths[-1]

  def __call__(self, x):
    x = _gelu(self.stem(x))
    for group in self.groups:
      x = group(x)
    x = nnx.max_pool(x, (3, 3), (3, 3))
    return self.head(x.reshape(x.shape[0], -1)) * self.scale


def airbench(quant: QuantConfig = FP, **kwargs) -> Airbench:
  """airbench94's network (widths 64/256/256, 1.97 M parameters) with ``quant`` in its convs."""
  return Airbench(quant, **kwargs)
