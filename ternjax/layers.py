"""Flax NNX ternary layers: ``nnx.Linear`` / ``nnx.Conv`` with a quantizing contraction.

The layers are the Flax layers themselves; only the contraction is replaced (AQT style): the
``dot_general`` / ``conv_general_dilated`` they call is a :class:`TernaryOperands` module that
quantizes the kernel and the inputs before contracting, with the quantizer objects that
:class:`QuantConfig` names (:mod:`ternjax.quantizers`). The float kernel stays the
``nnx.Param`` (the shadow weights) and learned scales are ``nnx.Param`` too, so a plain
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains a model mixing these with ordinary layers.
``QuantConfig(weights='fp')`` gives the float layer, so baseline and ternary model are one class.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax import lax

from ternjax import ops, packing
from ternjax import quantizers as q


def __getattr__(name: str):
  """``WEIGHT_METHODS`` / ``ACTIVATION_METHODS``: the registered quantizer names, now."""
  if name == "WEIGHT_METHODS":
    return tuple(q.WEIGHT_QUANTIZERS)
  if name == "ACTIVATION_METHODS":
    return tuple(q.ACTIVATION_QUANTIZERS)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _names(table, flag: str) -> str:
  return " or ".join(repr(n) for n, cls in table.items() if getattr(cls, flag))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """How a layer quantizes its kernel and its inputs."""

  weights: str = "twn"           # a WEIGHT_QUANTIZERS name: 'fp' | 'twn' | 'ttq' | 'stochastic'
                                 # | 'admm'
  per_channel: bool = True       # one scale (and threshold) per output channel
  delta: float = 0.7             # TWN threshold factor: Δ = delta·mean|w|
  ttq_threshold: float = 0.05    # TTQ threshold factor: Δ = ttq_threshold·max|w|
  ste: str = "identity"          # weight STE: 'identity' | 'clipped' (|w| ≤ 1)
  activations: str = "none"      # an ACTIVATION_QUANTIZERS name: 'none' | 'ternary' | 'int8'
  act_threshold: float = 0.5     # ternary activation: t = sign(x)·[|x| > act_threshold·s]
  act_scale_init: float = 1.0    # initial learned activation scale s
  kernel_forward: bool = False   # twn/ttq weights + ternary inputs only: forward through
                                 # ops.ternary_matmul / ternary_conv on codes, STE backward
  implementation: str | None = None  # kernel_forward: the ops implementation(s), e.g.
                                     # 'pallas,xla' (None: the dispatch's default)
  admm_rho: float = 1e-4         # ADMM: initial penalty ρ of (ρ/2)·‖W − G + U‖²
  admm_growth: float = 1.07      # ADMM: ρ is multiplied by this at every dual update
  admm_every: int = 100          # ADMM: optimizer steps between dual updates (k)
  admm_forward: str = "float"    # ADMM training forward: 'float' W (the paper's) |
                                 # 'projected' Π(W), straight-through backward
  stochastic_anneal: int = 0     # stochastic: optimizer steps over which the draws' noise
                                 # falls linearly to the deterministic rounding (0: never)

  def __post_init__(self):
    weights, activations = tuple(q.WEIGHT_QUANTIZERS), tuple(q.ACTIVATION_QUANTIZERS)
    if self.weights not in weights:
      raise ValueError(f"weights must be one of {weights}, got {self.weights!r}")
    if self.activations not in activations:
      raise ValueError(f"activations must be one of {activations}, got {self.activations!r}")
    if self.ste not in q.STE_MODES:
      raise ValueError(f"ste must be one of {q.STE_MODES}, got {self.ste!r}")
    if self.kernel_forward and not (q.WEIGHT_QUANTIZERS[self.weights].kernel_forward
                                    and q.ACTIVATION_QUANTIZERS[self.activations].kernel_forward):
      raise ValueError(
          f"kernel_forward needs weights {_names(q.WEIGHT_QUANTIZERS, 'kernel_forward')} and "
          f"activations {_names(q.ACTIVATION_QUANTIZERS, 'kernel_forward')}, "
          f"got {self.weights=} {self.activations=}")
    if self.implementation is not None:
      if not self.kernel_forward:
        raise ValueError("implementation selects the op of kernel_forward layers; "
                         "set kernel_forward=True")
      ops.candidates(self.implementation)  # unknown names: ValueError
    if self.admm_forward not in q.ADMM_FORWARDS:
      raise ValueError(f"admm_forward must be one of {q.ADMM_FORWARDS}, "
                       f"got {self.admm_forward!r}")
    if not (isinstance(self.admm_every, int) and self.admm_every >= 1):
      raise ValueError(f"admm_every must be a positive integer, got {self.admm_every!r}")
    if not (isinstance(self.stochastic_anneal, int) and self.stochastic_anneal >= 0):
      raise ValueError("stochastic_anneal must be a non-negative integer (steps), "
                       f"got {self.stochastic_anneal!r}")
    for name in ("delta", "ttq_threshold", "act_threshold", "act_scale_init", "admm_rho",
                 "admm_growth"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

  @property
  def ternary_weights(self) -> bool:
    return q.WEIGHT_QUANTIZERS[self.weights].ternary


class TernaryOperands(nnx.Module):
  """Quantizes a layer's kernel and inputs with the quantizers its :class:`QuantConfig` names.

  ``weight_quantizer`` and ``input_quantizer`` hold the quantization state (e.g. TTQ's
  ``alpha_pos``/``alpha_neg``, the ternary activation ``act_scale``, an RNG stream for
  stochastic weights), reachable from here by name too (``quant.act_scale``). In eval mode
  (``deterministic=True``) stochastic weights use the deterministic rounding.
  ``weight_dtype``: the dtype the kernel is quantized in (None: the kernel's, i.e. the layer's
  compute dtype, to which Flax promotes it); an export's float32 copy of a bfloat16 model sets
  it to bfloat16, so that it has the model's codes and scales.
  """

  def __init__(self, config: QuantConfig, kernel: jax.Array, *, rngs: nnx.Rngs):
    self.config = config
    self.deterministic = False
    self.weight_dtype = None
    self.weight_quantizer = q.WEIGHT_QUANTIZERS[config.weights](config, kernel, rngs=rngs)
    self.input_quantizer = q.ACTIVATION_QUANTIZERS[config.activations](config, rngs=rngs)

  def __getattr__(self, name: str):
    if not name.startswith("_"):
      for part in ("weight_quantizer", "input_quantizer"):
        quantizer = vars(self).get(part)
        if quantizer is not None and name in vars(quantizer):
          return getattr(quantizer, name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  def weights(self, kernel: jax.Array) -> jax.Array:
    """The kernel used in the forward pass (dequantized ternary, or float for 'fp')."""
    w = self.weight_quantizer(self._quantized_kernel(kernel), deterministic=self.deterministic)
    return w.astype(kernel.dtype)

  def weight_codes(self, kernel: jax.Array):
    """Inference form of the kernel: ``(t, scale_pos, scale_neg)``, scales of shape ``(N,)``.

    ``scale_neg`` is None when both signs share one scale. Deterministic in every mode.
    """
    t, scale_pos, scale_neg = self.weight_quantizer.codes(self._quantized_kernel(kernel))
    cast = lambda s: None if s is None else s.astype(kernel.dtype)
    return t, cast(scale_pos), cast(scale_neg)

  def _quantized_kernel(self, kernel: jax.Array) -> jax.Array:
    return kernel if self.weight_dtype is None else kernel.astype(self.weight_dtype)

  def inputs(self, x: jax.Array) -> jax.Array:
    """The inputs used in the forward pass (quantized as configured)."""
    return self.input_quantizer(x)

  def input_codes(self, x: jax.Array):
    """Inference form of the inputs: ``(codes, scale)``; ``(x, None)`` when not quantized."""
    return self.input_quantizer.codes(x)

  def kernel_forward(self, x, kernel, contract, packed_contract):
    """``packed_contract(codes, x_scale, t, w_scale, w_scale_neg)`` forward, STE backward.

    The forward is the packed inference op (``config.implementation``, else the dispatch's
    default: the kernels on a GPU, which equal the ``'xla'`` implementation's integers); the
    backward is ``jax.vjp`` of the float forward ``contract(inputs(x), weights(kernel))``, as
    without ``kernel_forward``.
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

  def _op_options(self) -> dict:
    return dict(x_ternary=self.input_quantizer.x_ternary,
                implementation=self.config.implementation)


class TernaryDotGeneral(TernaryOperands):
  """Drop-in ``dot_general`` for ``nnx.Linear`` that quantizes both operands."""

  def __call__(self, x, kernel, dimension_numbers, precision=None, **kwargs):
    contract = lambda a, b: lax.dot_general(a, b, dimension_numbers, precision=precision,
                                            **kwargs)
    if self.config.kernel_forward:
      def packed(codes, xs, t, ws, wsn):
        out = ops.ternary_matmul(codes.reshape(-1, codes.shape[-1]),
                                 packing.pack_bitplanes(t, axis=0), x_scale=xs, w_scale=ws,
                                 w_scale_neg=wsn, **self._op_options())
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
            rhs_dilation=kwargs.get("rhs_dilation"), x_scale=xs, w_scale=ws, w_scale_neg=wsn,
            **self._op_options())
      return self.kernel_forward(x, kernel, contract, packed)
    return contract(self.inputs(x), self.weights(kernel))


def quantized_layers(model: nnx.Module):
  """``(layer, quant)`` for every layer of ``model`` with a :class:`TernaryOperands`."""
  for _, module in nnx.iter_modules(model):
    quant = getattr(module, "quant", None)
    if isinstance(quant, TernaryOperands):
      yield module, quant


def quant_penalty(model: nnx.Module) -> jax.Array | None:
  """The sum of the weight quantizers' loss terms (``WeightQuantizer.penalty``) over
  ``model``'s layers, or None when no quantizer has one (nothing to add to the loss)."""
  terms = [t for layer, quant in quantized_layers(model)
           if (t := quant.weight_quantizer.penalty(layer.kernel[...])) is not None]
  return sum(terms) if terms else None


def quant_update(model: nnx.Module, step: jax.Array) -> None:
  """Calls every weight quantizer's ``update(kernel, step)``: its non-trained state after
  optimizer step ``step`` (e.g. ADMM's projection and dual update every k steps)."""
  for layer, quant in quantized_layers(model):
    quant.weight_quantizer.update(layer.kernel[...], step)


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
