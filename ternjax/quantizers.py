r"""Ternary and low-bit quantizers as straight-through estimators (STE).

Each quantizer comes in two forms:

* ``*_codes(...)`` is the plain forward: it returns the integer codes (``int8``) and the scales,
  which packing, export and the integer ops consume;
* the function without the suffix is a ``jax.custom_vjp`` returning the dequantized values
  (codes times scales) for training; its backward pass is documented in one line.

Scales keep the reduced axes (``keepdims``) so that ``codes * scale`` broadcasts. "Per channel"
means one scale per output channel, the last axis of a kernel (``nnx.Linear``: ``(in, out)``,
``nnx.Conv``: ``(*window, in, out)``).

==============  ======================================================  ===========================
quantizer       forward                                                 backward
==============  ======================================================  ===========================
``twn``         Δ = δ·mean|w|; t = sign(w)·[|w| > Δ]; α = mean|w| over  STE: g (identity) or
                |w| > Δ; returns α·t                                    g·[|w| ≤ 1] (clipped)
``ttq``         Δ = t·max|w|; returns αp on w > Δ, −αn on w < −Δ, else  w: g·αp / g / g·αn on the
                0                                                       +, 0, − sets; αp: Σ g over
                                                                        +; αn: −Σ g over −
``stochastic``  s = α of TWN; t = sign(w)·Bernoulli(min(|w|/s, 1));     STE (identity or clipped)
                returns s·t
``admm``        training: the float w (or its projection, STE); the     the loss gradient plus
                penalty pulls w to ternary; eval: :func:`ternary_fit`   ρ(w − G + U) (penalty)
``ternary_      t = sign(x)·[|x| > θ·s]; returns s·t                    x: g·[|x| ≤ s]; s: LSQ
activation``                                                            gradient (below)
``int8``        s = max|x|/127 per example; returns s·round(x/s)        identity (no clipping
                                                                        occurs: s covers max|x|)
==============  ======================================================  ===========================

References: TWN, Li et al. 2016 (arXiv:1605.04711); TTQ, Zhu et al. 2017 (arXiv:1612.01064);
LSQ, Esser et al. 2020 (arXiv:1902.08153); ADMM, Leng et al. 2018 (arXiv:1707.09870).

Each method is also one small ``nnx.Module`` (:class:`WeightQuantizer`,
:class:`InputQuantizer`) that owns its state, its training forward and its inference form,
registered by name (:func:`register`, :data:`WEIGHT_QUANTIZERS`,
:data:`ACTIVATION_QUANTIZERS`): the names of ``QuantConfig(weights=..., activations=...)``.
A new method is one subclass and one ``@register("name")`` line.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

STE_MODES = ("identity", "clipped")
ADMM_FORWARDS = ("float", "projected")


def _reduce_axes(x: jax.Array, per_channel: bool) -> tuple[int, ...]:
  """Axes reduced to get a scale: all of them, or all but the last (output channel)."""
  return tuple(range(x.ndim - 1)) if per_channel and x.ndim > 1 else tuple(range(x.ndim))


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums ``x`` over the axes that were broadcast from ``shape`` (the adjoint of broadcasting)."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def _ternary_from_threshold(w: jax.Array, threshold: jax.Array) -> jax.Array:
  return jnp.where(w > threshold, 1, jnp.where(w < -threshold, -1, 0)).astype(jnp.int8)


def ste_mask(w: jax.Array, ste: str) -> jax.Array:
  """Gradient mask of an STE: ones (``identity``) or ``|w| <= 1`` (``clipped``)."""
  if ste == "identity":
    return jnp.ones_like(w)
  return (jnp.abs(w) <= 1).astype(w.dtype)


def straight_through(w: jax.Array, q: jax.Array, ste: str = "identity") -> jax.Array:
  """Returns ``q`` exactly; backward: ``g * ste_mask(w)`` to ``w`` and nothing to ``q``."""
  if ste not in STE_MODES:
    raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")
  return _straight_through(w, q, ste)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _straight_through(w, q, ste):
  del w, ste
  return q


def _straight_through_fwd(w, q, ste):
  return q, w


def _straight_through_bwd(ste, w, g):
  return g * ste_mask(w, ste), jnp.zeros_like(g)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


# --------------------------------------------------------------------------------------------
# TWN


def twn_codes(w: jax.Array, delta: float = 0.7, per_channel: bool = False):
  r"""TWN ternarization: codes ``t`` in {-1, 0, 1} (int8) and scale ``α`` (keepdims).

  .. math::
    Δ = δ · \mathrm{mean}|w|, \quad t = \mathrm{sign}(w)·[|w| > Δ], \quad
    α = \frac{Σ |w|·|t|}{Σ |t|}

  >>> t, a = twn_codes(jnp.array([0.9, -0.1, -1.1, 0.4]))
  >>> t.tolist(), round(float(a[0]), 4)
  ([1, 0, -1, 0], 1.0)
  """
  axes = _reduce_axes(w, per_channel)
  absw = jnp.abs(w)
  t = _ternary_from_threshold(w, delta * jnp.mean(absw, axis=axes, keepdims=True))
  nonzero = jnp.abs(t).astype(w.dtype)
  count = jnp.sum(nonzero, axis=axes, keepdims=True)
  alpha = jnp.sum(absw * nonzero, axis=axes, keepdims=True) / jnp.maximum(count, 1)
  return t, alpha


def twn(w: jax.Array, delta: float = 0.7, per_channel: bool = False,
        ste: str = "identity") -> jax.Array:
  """TWN forward ``α·t`` (see :func:`twn_codes`); backward: ``g·ste_mask(w)``."""
  t, alpha = twn_codes(w, delta, per_channel)
  return straight_through(w, jax.lax.stop_gradient(alpha * t), ste)


# --------------------------------------------------------------------------------------------
# TTQ


def ttq_codes(w: jax.Array, threshold: float = 0.05, per_channel: bool = False) -> jax.Array:
  """TTQ ternarization codes: ``t = sign(w)·[|w| > threshold·max|w|]`` (int8)."""
  axes = _reduce_axes(w, per_channel)
  return _ternary_from_threshold(w, threshold * jnp.max(jnp.abs(w), axis=axes, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def ttq(w: jax.Array, alpha_pos: jax.Array, alpha_neg: jax.Array, threshold: float = 0.05,
        per_channel: bool = False) -> jax.Array:
  r"""Trained ternary quantization with learned scales ``αp, αn`` (positive numbers).

  Forward: ``αp`` where ``w > Δ``, ``−αn`` where ``w < −Δ``, 0 elsewhere, ``Δ = threshold·max|w|``.
  Backward (TTQ paper, eq. 6–7): ``∂L/∂αp = Σ_{I+} g``, ``∂L/∂αn = −Σ_{I−} g`` (the chain rule
  through ``−αn``), and the latent weight gets ``αp·g`` on ``I+``, ``g`` on the zero set and
  ``αn·g`` on ``I−``. ``alpha_pos``/``alpha_neg`` are scalars, or per output channel.
  """
  t = ttq_codes(w, threshold, per_channel)
  return jnp.where(t > 0, alpha_pos, jnp.where(t < 0, -alpha_neg, 0)).astype(w.dtype)


def _ttq_fwd(w, alpha_pos, alpha_neg, threshold, per_channel):
  t = ttq_codes(w, threshold, per_channel)
  out = jnp.where(t > 0, alpha_pos, jnp.where(t < 0, -alpha_neg, 0)).astype(w.dtype)
  return out, (t, alpha_pos, alpha_neg)


def _ttq_bwd(threshold, per_channel, res, g):
  del threshold, per_channel
  t, alpha_pos, alpha_neg = res
  pos, neg = (t > 0).astype(g.dtype), (t < 0).astype(g.dtype)
  g_w = g * jnp.where(t > 0, alpha_pos, jnp.where(t < 0, alpha_neg, 1)).astype(g.dtype)
  g_pos = _sum_to_shape(g * pos, jnp.shape(alpha_pos)).astype(jnp.result_type(alpha_pos))
  g_neg = _sum_to_shape(-g * neg, jnp.shape(alpha_neg)).astype(jnp.result_type(alpha_neg))
  return g_w, g_pos, g_neg


ttq.defvjp(_ttq_fwd, _ttq_bwd)


# --------------------------------------------------------------------------------------------
# Stochastic ternarization


def stochastic_codes(w: jax.Array, key: jax.Array | None, delta: float = 0.7,
                     per_channel: bool = False, noise: jax.Array | float = 1.0):
  """Stochastic ternary codes and scale ``s``, TWN's ``α`` (:func:`twn_codes`, threshold ``δ``).

  ``t = sign(w)`` with probability ``min(|w|/s, 1)``, else 0: ``E[s·t] = w`` wherever
  ``|w| ≤ s``, and the larger weights, a few, are clipped to ``±s``. (``s = max|w|`` would keep
  every weight unbiased but draws codes with a variance up to ``max|w|·|w|``, and its rounding
  zeroes ~90% of a Gaussian's weights.) With ``key=None`` the codes are the deterministic
  rounding ``sign(w)·[|w| ≥ s/2]``, the nearest point of ``{−s, 0, s}`` (eval and export).
  In between, ``noise`` ν ∈ [0, 1] keeps ``|w|/s > 1/2 + ν·(u − 1/2)``, u uniform: a threshold
  drawn from ``s/2 ± ν·s/2``, the draws above at ν = 1, the rounding at ν = 0 (annealing).
  """
  _, scale = twn_codes(w, delta, per_channel)
  p = jnp.abs(w) / jnp.maximum(scale, jnp.finfo(w.dtype).tiny)
  if key is None:
    keep = p >= 0.5
  else:
    keep = p > 0.5 + noise * (jax.random.uniform(key, w.shape, w.dtype) - 0.5)
  return (jnp.sign(w) * keep).astype(jnp.int8), scale


def stochastic(w: jax.Array, key: jax.Array | None, delta: float = 0.7,
               per_channel: bool = False, ste: str = "identity",
               noise: jax.Array | float = 1.0) -> jax.Array:
  """Stochastic ternarization ``s·t`` (see :func:`stochastic_codes`); backward: STE."""
  t, scale = stochastic_codes(w, key, delta, per_channel, noise)
  return straight_through(w, jax.lax.stop_gradient(scale * t), ste)


# --------------------------------------------------------------------------------------------
# Ternary projection (ADMM)


def ternary_fit(w: jax.Array, per_channel: bool = False, iterations: int = 10):
  r"""Ternary projection of ``w``: codes ``t`` and scale ``α`` (keepdims) fitting ``α·t`` to ``w``.

  The alternation of Leng et al. 2018 (the projection step of their ADMM), from TWN's codes:
  for a fixed support the optimal scale is ``α = Σ|w|·|t| / Σ|t|``; for a fixed ``α`` the
  nearest codes are ``t = sign(w)·[|w| > α/2]``. Neither half-step can raise ``‖w − α·t‖²``;
  the returned ``α`` is the optimal one for the returned codes.

  >>> t, a = ternary_fit(jnp.array([1.0, 0.9, 0.2, -1.1]))
  >>> t.tolist(), round(float(a[0]), 4)
  ([1, 1, 0, -1], 1.0)
  """
  axes = _reduce_axes(w, per_channel)
  absw = jnp.abs(w)

  def scale(t):
    nonzero = jnp.abs(t).astype(w.dtype)
    count = jnp.sum(nonzero, axis=axes, keepdims=True)
    return jnp.sum(absw * nonzero, axis=axes, keepdims=True) / jnp.maximum(count, 1)

  t, alpha = twn_codes(w, per_channel=per_channel)
  for _ in range(iterations):
    t = _ternary_from_threshold(w, alpha / 2)
    alpha = scale(t)
  return t, alpha


# --------------------------------------------------------------------------------------------
# Activations


def ternary_activation_codes(x: jax.Array, scale: jax.Array, threshold: float = 0.5):
  """Balanced ternary activation codes ``sign(x)·[|x| > threshold·scale]`` (int8)."""
  return _ternary_from_threshold(x, threshold * scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def ternary_activation(x: jax.Array, scale: jax.Array, threshold: float = 0.5) -> jax.Array:
  r"""Balanced ternary activation ``s·t`` with a learned scale ``s`` (LSQ-style STE).

  Backward: ``∂/∂x = g·[|x| ≤ s]``; with ``v = x/s``,
  ``∂/∂s = Σ g·(t − v)`` inside ``|v| ≤ 1`` and ``Σ g·sign(v)`` outside, times LSQ's gradient
  scale ``1/\sqrt{N}`` which keeps the scale's step comparable to the weights'. ``N`` counts the
  elements per scale of one example (LSQ's features; axis 0 is the batch when ``x.ndim > 1``):
  the batch already enters through the loss's mean. The result has ``x``'s dtype (a bfloat16
  layer stays bfloat16).
  """
  return _ternary_activation_fwd(x, scale, threshold)[0]


def _ternary_activation_fwd(x, scale, threshold):
  t = ternary_activation_codes(x, scale, threshold).astype(x.dtype)
  return (scale.astype(x.dtype) * t), (x, scale, t)


def _ternary_activation_bwd(threshold, res, g):
  del threshold
  x, scale, t = res
  v = x.astype(jnp.result_type(scale)) / scale
  inside = jnp.abs(v) <= 1
  g_x = (g * inside.astype(g.dtype)).astype(x.dtype)
  g = g.astype(v.dtype)
  examples = x.shape[0] if x.ndim > 1 else 1
  per_scale = max(x.size // (examples * max(jnp.size(scale), 1)), 1)
  g_s = jnp.where(inside, t - v, jnp.sign(v)) * g / jnp.sqrt(per_scale)
  return g_x, _sum_to_shape(g_s, jnp.shape(scale)).astype(jnp.result_type(scale))


ternary_activation.defvjp(_ternary_activation_fwd, _ternary_activation_bwd)


def int8_codes(x: jax.Array):
  """Symmetric int8 codes per example (axis 0): ``s = max|x|/127``, ``q = round(x/s)``."""
  axes = tuple(range(1, x.ndim)) if x.ndim > 1 else (0,)
  scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0).astype(x.dtype)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def int8(x: jax.Array) -> jax.Array:
  """Symmetric int8 fake quantization ``s·q`` (W2A8 activations); backward: identity."""
  q, scale = int8_codes(x)
  return straight_through(x, jax.lax.stop_gradient(scale * q.astype(x.dtype)), "identity")


def activation_codes(method: str, x: jax.Array, scale=None, threshold: float = 0.5):
  """Inference form of a layer's inputs: ``(codes, scale)``, or ``(x, None)`` for ``'none'``.

  ``method`` names an input quantizer ('ternary': learned ``scale``; 'int8': per-example
  scale; 'none'); this is its :meth:`InputQuantizer.inference` on stored arrays (the export's).
  """
  return ACTIVATION_QUANTIZERS[method].inference(x, scale, threshold)


# --------------------------------------------------------------------------------------------
# Quantizer objects and their registry


class Scale(nnx.Param):
  """A learned quantizer scale whose gradient sums over a whole channel or tensor (TTQ's
  ``alpha_pos`` / ``alpha_neg``): trained like any ``nnx.Param``, at ``TrainConfig.scale_lr``
  times the learning rate. (The ternary inputs' ``act_scale`` is a plain ``nnx.Param``: LSQ's
  gradient scale already normalizes its gradient.)"""


class QuantState(nnx.Variable):
  """Quantizer state that is not trained: ``nnx.Optimizer(..., wrt=nnx.Param)`` leaves it
  alone, checkpoints keep it (e.g. ADMM's auxiliary and dual variables subclass it)."""


class WeightQuantizer(nnx.Module):
  """A kernel quantization method: its state, training forward and inference form.

  Built as ``cls(config, kernel, rngs=rngs)`` from the layer's ``QuantConfig`` and initial
  kernel; learned state is ``nnx.Param``, other state :class:`QuantState`. ``ternary``: the
  method has codes (:meth:`codes`); ``kernel_forward``: its codes are its training forward's,
  so a layer may run the packed op forward (``QuantConfig.kernel_forward``); ``eval_differs``:
  eval mode's kernel (the codes) is so unlike the training forward's (stochastic draws, ADMM's
  float forward) that the BatchNorm statistics gathered in training do not fit it, so the
  training loop re-estimates them after the last epoch (``train.recalibrate_batchnorm``).
  """

  ternary: ClassVar[bool] = True
  kernel_forward: ClassVar[bool] = False
  eval_differs: ClassVar[bool] = False

  def __init__(self, config, kernel: jax.Array, *, rngs: nnx.Rngs):
    del kernel, rngs
    self.config = config

  def __call__(self, kernel: jax.Array, *, deterministic: bool = False) -> jax.Array:
    """The kernel of the training forward (straight-through backward)."""
    raise NotImplementedError

  def codes(self, kernel: jax.Array):
    """Inference form: ``(t, scale_pos, scale_neg)``, int8 codes and scales of shape ``(N,)``;
    ``scale_neg`` is None when both signs share one scale. Deterministic."""
    raise NotImplementedError

  def penalty(self, kernel: jax.Array) -> jax.Array | None:
    """A term the training loss adds (e.g. ADMM's augmented Lagrangian), or None: no term."""
    del kernel
    return None

  def update(self, kernel: jax.Array, step: jax.Array) -> None:
    """Updates non-trained state after optimizer step ``step`` (a traced count, inside the
    jitted step: gate on it with ``lax.cond``, not Python); by default nothing."""
    del kernel, step


class InputQuantizer(nnx.Module):
  """An input (activation) quantization method, built as ``cls(config, rngs=rngs)``.

  ``x_ternary``: its codes are trits (the ops' popcount path); ``kernel_forward``: as for
  :class:`WeightQuantizer`.
  """

  x_ternary: ClassVar[bool] = False
  kernel_forward: ClassVar[bool] = False

  def __init__(self, config, *, rngs: nnx.Rngs):
    del rngs
    self.config = config

  def __call__(self, x: jax.Array) -> jax.Array:
    """The inputs of the training forward."""
    raise NotImplementedError

  def codes(self, x: jax.Array):
    """Inference form: ``(codes, scale)``, or ``(x, None)`` when not quantized."""
    return self.inference(x, None, self.config.act_threshold)

  @staticmethod
  def inference(x: jax.Array, scale, threshold: float):
    """:meth:`codes` from stored arrays (the learned ``scale``, or None)."""
    raise NotImplementedError


WEIGHT_QUANTIZERS: dict[str, type[WeightQuantizer]] = {}
ACTIVATION_QUANTIZERS: dict[str, type[InputQuantizer]] = {}


def register(name: str):
  """Class decorator: registers a :class:`WeightQuantizer` or :class:`InputQuantizer` under
  ``name`` (the ``QuantConfig`` and CLI string)."""
  def add(cls):
    table = WEIGHT_QUANTIZERS if issubclass(cls, WeightQuantizer) else ACTIVATION_QUANTIZERS
    table[name] = cls
    return cls
  return add


def _per_column(scale: jax.Array, kernel: jax.Array) -> jax.Array:
  """A per-tensor or per-channel (keepdims) scale as ``(N,)``."""
  return jnp.broadcast_to(scale.reshape(-1), kernel.shape[-1:])


@register("fp")
class FloatWeights(WeightQuantizer):
  """No quantization: the float kernel (the baseline layer)."""

  ternary = False

  def __call__(self, kernel, *, deterministic=False):
    return kernel

  def codes(self, kernel):
    raise ValueError("weight_codes() needs ternary weights; this layer is float ('fp')")


@register("twn")
class TWN(WeightQuantizer):
  """:func:`twn`: threshold ``delta·mean|w|``, scale from the kernel (``QuantConfig.delta``)."""

  kernel_forward = True

  def __call__(self, kernel, *, deterministic=False):
    c = self.config
    return twn(kernel, c.delta, c.per_channel, c.ste)

  def codes(self, kernel):
    t, alpha = twn_codes(kernel, self.config.delta, self.config.per_channel)
    return t, _per_column(alpha, kernel), None


@register("ttq")
class TTQ(WeightQuantizer):
  """:func:`ttq`: learned scales ``alpha_pos`` / ``alpha_neg`` (:class:`Scale`, per channel or
  scalar), initialized to the mean ``|w|`` of the kernel's positive / negative codes (at least
  1e-3)."""

  kernel_forward = True

  def __init__(self, config, kernel, *, rngs):
    super().__init__(config, kernel, rngs=rngs)
    t = ttq_codes(kernel, config.ttq_threshold, config.per_channel)
    axes = _reduce_axes(kernel, config.per_channel)
    shape = kernel.shape[-1:] if config.per_channel else ()

    def mean_abs(mask):
      total = jnp.sum(jnp.abs(kernel) * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axes), 1)
      return jnp.maximum(total, 1e-3).reshape(shape)

    self.alpha_pos = Scale(mean_abs(t > 0))
    self.alpha_neg = Scale(mean_abs(t < 0))

  def _scales(self, kernel):
    shape = (1,) * (kernel.ndim - 1) + (-1,) if self.config.per_channel else ()
    return self.alpha_pos[...].reshape(shape), self.alpha_neg[...].reshape(shape)

  def __call__(self, kernel, *, deterministic=False):
    c = self.config
    return ttq(kernel, *self._scales(kernel), c.ttq_threshold, c.per_channel)

  def codes(self, kernel):
    t = ttq_codes(kernel, self.config.ttq_threshold, self.config.per_channel)
    ap, an = (_per_column(a, kernel) for a in self._scales(kernel))
    return t, ap, an


class NoiseState(QuantState):
  """The stochastic draws' noise level ν (1: the plain draws, 0: the deterministic rounding)."""


@register("stochastic")
class Stochastic(WeightQuantizer):
  """:func:`stochastic`, drawing from the ``'quant'`` RNG stream; the deterministic rounding
  when ``deterministic`` (eval mode) and for the codes. With ``QuantConfig.stochastic_anneal``
  = S, the draws' noise ν (a :class:`NoiseState`) falls as ``1 − step/S`` to 0 at step S: the
  network ends its training on the weights it deploys."""

  def __init__(self, config, kernel, *, rngs):
    super().__init__(config, kernel, rngs=rngs)
    self.rngs = rngs["quant"].fork()
    if config.stochastic_anneal:
      self.noise = NoiseState(jnp.ones((), jnp.float32))

  eval_differs = True  # random draws in training, the deterministic rounding in eval

  def __call__(self, kernel, *, deterministic=False):
    key = None if deterministic else self.rngs()
    c = self.config
    noise = self.noise[...].astype(kernel.dtype) if c.stochastic_anneal else 1.0
    return stochastic(kernel, key, c.delta, c.per_channel, c.ste, noise)

  def update(self, kernel, step):
    if self.config.stochastic_anneal:
      self.noise[...] = jnp.clip(1.0 - step / self.config.stochastic_anneal, 0.0, 1.0)

  def codes(self, kernel):
    t, scale = stochastic_codes(kernel, None, self.config.delta, self.config.per_channel)
    return t, _per_column(scale, kernel), None


class ADMMState(QuantState):
  """ADMM's auxiliary ternary variable ``G``, dual variable ``U`` and penalty ``ρ``."""


@register("admm")
class ADMM(WeightQuantizer):
  r"""ADMM ternary training (Leng et al. 2018): the float kernel ``W`` trains under the
  augmented-Lagrangian term ``(ρ/2)·‖W − G + U‖²`` (:meth:`penalty`).

  ``G`` is a ternary projection (:func:`ternary_fit`, α re-fitted each time) and ``U`` the
  scaled dual variable, both :class:`ADMMState` (kept in checkpoints, not trained). Every
  ``admm_every`` optimizer steps (:meth:`update`): ``G ← Π(W + U)``, ``U ← U + W − G``,
  ``ρ ← ρ·admm_growth`` (starting from ``admm_rho``). The training forward uses the float
  ``W`` (``admm_forward='float'``, the paper's proximal step) or ``Π(W)`` with a
  straight-through backward (``'projected'``: the ternary network trains, the penalty keeps
  ``W`` near its projection); eval mode and the codes use the hard projection ``Π(W)``, so the
  test accuracy of the training loop is always the ternary model's.
  """

  def __init__(self, config, kernel, *, rngs):
    super().__init__(config, kernel, rngs=rngs)
    self.g = ADMMState(self._project(kernel))
    self.u = ADMMState(jnp.zeros_like(kernel))
    self.rho = ADMMState(jnp.asarray(config.admm_rho, jnp.float32))

  @property
  def eval_differs(self):
    """The float forward trains other weights than eval's projection."""
    return self.config.admm_forward == "float"

  def _project(self, kernel):
    t, alpha = ternary_fit(kernel, self.config.per_channel)
    return alpha * t.astype(alpha.dtype)

  def __call__(self, kernel, *, deterministic=False):
    if deterministic:
      return self._project(kernel)
    if self.config.admm_forward == "projected":
      return straight_through(kernel, jax.lax.stop_gradient(self._project(kernel)),
                              self.config.ste)
    return kernel

  def codes(self, kernel):
    t, alpha = ternary_fit(kernel, self.config.per_channel)
    return t, _per_column(alpha, kernel), None

  def penalty(self, kernel):
    r = kernel - self.g[...] + self.u[...]
    return 0.5 * self.rho[...] * jnp.sum(r * r)

  def update(self, kernel, step):
    def dual_step(state):
      _, u, rho = state
      g = self._project(kernel + u)
      return g, u + kernel - g, rho * self.config.admm_growth

    state = (self.g[...], self.u[...], self.rho[...])
    self.g[...], self.u[...], self.rho[...] = jax.lax.cond(
        step % self.config.admm_every == 0, dual_step, lambda s: s, state)


@register("none")
class FloatInputs(InputQuantizer):
  """No input quantization."""

  def __call__(self, x):
    return x

  @staticmethod
  def inference(x, scale, threshold):
    return x, None


@register("ternary")
class TernaryInputs(InputQuantizer):
  """:func:`ternary_activation` with a learned scale ``act_scale`` (an ``nnx.Param`` trained at
  the learning rate, as LSQ's: its gradient is normalized; initially
  ``QuantConfig.act_scale_init``)."""

  x_ternary = True
  kernel_forward = True

  def __init__(self, config, *, rngs):
    super().__init__(config, rngs=rngs)
    self.act_scale = nnx.Param(jnp.asarray(config.act_scale_init, jnp.float32))

  def __call__(self, x):
    return ternary_activation(x, self.act_scale[...], self.config.act_threshold)

  def codes(self, x):
    return self.inference(x, self.act_scale[...], self.config.act_threshold)

  @staticmethod
  def inference(x, scale, threshold):
    return ternary_activation_codes(x, scale, threshold), scale


@register("int8")
class Int8Inputs(InputQuantizer):
  """:func:`int8`: symmetric int8 codes with a per-example scale (W2A8)."""

  def __call__(self, x):
    return int8(x)

  @staticmethod
  def inference(x, scale, threshold):
    return int8_codes(x)
