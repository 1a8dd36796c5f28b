"""Flax NNX ternary layers: ``nnx.Linear`` / ``nnx.Conv`` with a quantizing contraction.

The layers are the Flax layers themselves; only the contraction is replaced (AQT style): the
``dot_general`` / ``conv_general_dilated`` they call is a :class:`TernaryOperands` module that
quantizes the kernel and the inputs before contracting. The float kernel stays the
``nnx.Param`` (the shadow weights) and learned scales are ``nnx.Param`` too, so a plain
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains a model mixing these with ordinary layers.
``QuantConfig(weights='fp')`` gives the float layer, so baseline and ternary model are one class.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from ternjax import ops, packing
from ternjax import quantizers as q

WEIGHT_METHODS = ("fp", "twn", "ttq", "stochastic")
ACTIVATION_METHODS = ("none", "ternary", "int8")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """How a layer quantizes its kernel and its inputs."""

  weights: str = "twn"           # 'fp' | 'twn' | 'ttq' | 'stochastic'
  per_channel: bool = True       # one scale (and threshold) per output channel
  delta: float = 0.7             # TWN threshold factor: Δ = delta·mean|w|
  ttq_threshold: float = 0.05    # TTQ threshold factor: Δ = ttq_threshold·max|w|
  ste: str = "identity"          # weight STE: 'identity' | 'clipped' (|w| ≤ 1)
  activations: str = "none"      # input quantization: 'none' | 'ternary' | 'int8'
  act_threshold: float = 0.5     # ternary activation: t = sign(x)·[|x| > act_threshold·s]
  act_scale_init: float = 1.0    # initial learned activation scale s
  kernel_forward: bool = False   # twn/ttq weights + ternary inputs only: forward through
                                 # ops.ternary_matmul / ternary_conv on codes, STE backward

  def __post_init__(self):
    if self.weights not in WEIGHT_METHODS:
      raise ValueError(f"weights must be one of {WEIGHT_METHODS}, got {self.weights!r}")
    if self.activations not in ACTIVATION_METHODS:
      raise ValueError(
          f"activations must be one of {ACTIVATION_METHODS}, got {self.activations!r}")
    if self.ste not in q.STE_MODES:
      raise ValueError(f"ste must be one of {q.STE_MODES}, got {self.ste!r}")
    if self.kernel_forward and (self.weights not in ("twn", "ttq")
                                or self.activations != "ternary"):
      raise ValueError("kernel_forward needs weights 'twn' or 'ttq' and activations 'ternary', "
                       f"got {self.weights=} {self.activations=}")
    for name in ("delta", "ttq_threshold", "act_threshold", "act_scale_init"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

  @property
  def ternary_weights(self) -> bool:
    return self.weights != "fp"


class TernaryOperands(nnx.Module):
  """Quantizes a layer's kernel and inputs as its :class:`QuantConfig` says.

  Holds the learned quantization state: TTQ's ``alpha_pos``/``alpha_neg`` and the ternary
  activation ``act_scale`` (``nnx.Param``), and an RNG stream for stochastic weights. In eval
  mode (``deterministic=True``) stochastic weights use the deterministic rounding.
  """

  def __init__(self, config: QuantConfig, kernel: jax.Array, *, rngs: nnx.Rngs):
    self.config = config
    self.deterministic = False
    if config.weights == "ttq":
      t = q.ttq_codes(kernel, config.ttq_threshold, config.per_channel)
      axes = q._reduce_axes(kernel, config.per_channel)
      shape = kernel.shape[-1:] if config.per_channel else ()

      def mean_abs(mask):
        total = jnp.sum(jnp.abs(kernel) * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axes), 1)
        return jnp.maximum(total, 1e-3).reshape(shape)

      self.alpha_pos = nnx.Param(mean_abs(t > 0))
      self.alpha_neg = nnx.Param(mean_abs(t < 0))
    if config.activations == "ternary":
      self.act_scale = nnx.Param(jnp.asarray(config.act_scale_init, jnp.float32))
    self.rngs = rngs["quant"].fork() if config.weights == "stochastic" else nnx.data(None)

  def _ttq_scales(self, kernel):
    shape = (1,) * (kernel.ndim - 1) + (-1,) if self.config.per_channel else ()
    return self.alpha_pos[...].reshape(shape), self.alpha_neg[...].reshape(shape)

  def weights(self, kernel: jax.Array) -> jax.Array:
    """The kernel used in the forward pass (dequantized ternary, or float for 'fp')."""
    c = self.config
    if c.weights == "twn":
      return q.twn(kernel, c.delta, c.per_channel, c.ste)
    if c.weights == "ttq":
      return q.ttq(kernel, *self._ttq_scales(kernel), c.ttq_threshold, c.per_channel)
    if c.weights == "stochastic":
      key = None if self.deterministic else self.rngs()
      return q.stochastic(kernel, key, c.per_channel, c.ste)
    return kernel

  def weight_codes(self, kernel: jax.Array):
    """Inference form of the kernel: ``(t, scale_pos, scale_neg)``, scales of shape ``(N,)``.

    ``scale_neg`` is None when both signs share one scale. Deterministic in every mode.
    """
    c = self.config
    n = kernel.shape[-1]
    if c.weights == "twn":
      t, alpha = q.twn_codes(kernel, c.delta, c.per_channel)
      return t, jnp.broadcast_to(alpha.reshape(-1), (n,)), None
    if c.weights == "ttq":
      t = q.ttq_codes(kernel, c.ttq_threshold, c.per_channel)
      ap, an = (jnp.broadcast_to(a.reshape(-1), (n,)) for a in self._ttq_scales(kernel))
      return t, ap, an
    if c.weights == "stochastic":
      t, scale = q.stochastic_codes(kernel, None, c.per_channel)
      return t, jnp.broadcast_to(scale.reshape(-1), (n,)), None
    raise ValueError("weight_codes() needs ternary weights; this layer is float ('fp')")

  def inputs(self, x: jax.Array) -> jax.Array:
    """The inputs used in the forward pass (quantized as configured)."""
    if self.config.activations == "ternary":
      return q.ternary_activation(x, self.act_scale[...], self.config.act_threshold)
    if self.config.activations == "int8":
      return q.int8(x)
    return x

  def input_codes(self, x: jax.Array):
    """Inference form of the inputs: ``(codes, scale)``; ``(x, None)`` when not quantized."""
    scale = self.act_scale[...] if self.config.activations == "ternary" else None
    return q.activation_codes(self.config.activations, x, scale, self.config.act_threshold)

  def kernel_forward(self, x, kernel, contract, packed_contract):
    """``packed_contract(codes, x_scale, t, w_scale, w_scale_neg)`` forward, STE backward.

    The forward is the packed inference op (the dispatch's kernels on a GPU, so it equals the
    ``'xla'`` implementation's integers); the backward is ``jax.vjp`` of the float forward
    ``contract(inputs(x), weights(kernel))``, as without ``kernel_forward``.
    """
    graphdef, state = nnx.split(self)

    def float_forward(x, kernel, state):
      m = nnx.merge(graphdef, state)
      return contract(m.inputs(x), m.weights(kernel))

    def packed_forward(x, kernel, state):
      m = nnx.merge(graphdef, state)
      return packed_contract(*m.input_codes(x), *m.weight_codes(kernel))

    f = jax.custom_vjp(packed_forward)
    f.defvjp(lambda *a: (packed_forward(*a), a), lambda a, g: jax.vjp(float_forward, *a)[1](g))
    return f(x, kernel, state)


class TernaryDotGeneral(TernaryOperands):
  """Drop-in ``dot_general`` for ``nnx.Linear`` that quantizes both operands."""

  def __call__(self, x, kernel, dimension_numbers, precision=None, **kwargs):
    contract = lambda a, b: lax.dot_general(a, b, dimension_numbers, precision=precision,
                                            **kwargs)
    if self.config.kernel_forward:
      def packed(codes, xs, t, ws, wsn):
        out = ops.ternary_matmul(codes.reshape(-1, codes.shape[-1]),
                                 packing.pack_bitplanes(t, axis=0), x_ternary=True,
                                 x_scale=xs, w_scale=ws, w_scale_neg=wsn)
        return out.reshape(*codes.shape[:-1], -1)
      return self.kernel_forward(x, kernel, contract, packed)
    return contract(self.inputs(x), self.weights(kernel))


class TernaryConvGeneral(TernaryOperands):
  """Drop-in ``conv_general_dilated`` for ``nnx.Conv`` that quantizes both operands."""

  def __call__(self, x, kernel, window_strides, padding, *args, **kwargs):
    contract = lambda a, b: lax.conv_general_dilated(a, b, window_strides, padding, *args,
                                                     **kwargs)
    if self.config.kernel_forward:
      if args or kwargs.get("feature_group_count", 1) != 1 or any(
          d != 1 for d in kwargs.get("lhs_dilation") or ()):
        raise NotImplementedError("kernel_forward convs: no groups or input dilation")
      def packed(codes, xs, t, ws, wsn):
        return ops.ternary_conv(
            codes, packing.pack_bitplanes(ops.kernel_to_matrix(t), axis=0),
            window=t.shape[:-2], strides=window_strides, padding=padding,
            rhs_dilation=kwargs.get("rhs_dilation"), x_ternary=True, x_scale=xs, w_scale=ws,
            w_scale_neg=wsn)
      return self.kernel_forward(x, kernel, contract, packed)
    return contract(self.inputs(x), self.weights(kernel))


class TernaryLinear(nnx.Linear):
  """``nnx.Linear`` with ternary weights (and optionally quantized inputs).

  Takes ``nnx.Linear``'s arguments plus ``quant`` (a :class:`QuantConfig`).

  >>> layer = TernaryLinear(4, 3, quant=QuantConfig(weights='twn'), rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((2, 4))).shape
  (2, 3)
  """

  def __init__(self, in_features: int, out_features: int, *,
               quant: QuantConfig = QuantConfig(), rngs: nnx.Rngs, **kwargs):
    super().__init__(in_features, out_features, rngs=rngs, **kwargs)
    self.dot_general = nnx.data(TernaryDotGeneral(quant, self.kernel[...], rngs=rngs))

  @property
  def quant(self) -> TernaryOperands:
    return self.dot_general


class TernaryConv(nnx.Conv):
  """``nnx.Conv`` with ternary weights (and optionally quantized inputs).

  Takes ``nnx.Conv``'s arguments plus ``quant`` (a :class:`QuantConfig`).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size, strides=1, *,
               quant: QuantConfig = QuantConfig(), rngs: nnx.Rngs, **kwargs):
    super().__init__(in_features, out_features, kernel_size, strides, rngs=rngs, **kwargs)
    self.conv_general_dilated = nnx.data(
        TernaryConvGeneral(quant, self.kernel[...], rngs=rngs))

  @property
  def quant(self) -> TernaryOperands:
    return self.conv_general_dilated
