"""The public entry points, :func:`ternary_matmul` and :func:`ternary_conv`, and the ``'xla'``
implementation that is always registered.

Each entry point checks its operands once, then tries the candidate names in order (see
:func:`ternjax.ops.base.candidates`), falling through on ``NotImplementedError``. A policy
name (``'gpu'``) first chooses an implementation for the call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ternjax.ops import base, conv, cpu, xla
from ternjax.packing import Bitplanes


@functools.partial(jax.jit, static_argnames=("x_ternary", "tuning"))
def xla_matmul(x, w, *, x_ternary=False, x_scale=None, w_scale=None, w_scale_neg=None,
               tuning: cpu.CpuTuning = cpu.CPU_TUNING):
  """The XLA implementation (and reference) of :func:`ternary_matmul`: on the CPU the
  formulation for the shape (:func:`ternjax.ops.cpu.matmul`), elsewhere the plain forms
  (:func:`ternjax.ops.xla.reference_matmul`). Jitted: eager calls compile once per shape.
  """
  two_sums = w_scale_neg is not None
  if jax.default_backend() == "cpu":
    accs = cpu.matmul(x, w, x_ternary=x_ternary, two_sums=two_sums,
                      scaled=x_scale is not None or w_scale is not None, tuning=tuning)
  else:
    accs = xla.reference_matmul(x, w, x_ternary=x_ternary, two_sums=two_sums)
  return base.epilogue(*accs, x_scale=x_scale, w_scale=w_scale, w_scale_neg=w_scale_neg)


base.register("xla", xla_matmul, conv=conv.xla_conv)


def _matmul(name: str, x, w, **kwargs) -> jax.Array:
  """``x × w`` by implementation or policy ``name`` (operands checked)."""
  if x.shape[0] == 0:  # an empty batch: nothing to compute (kernels need a grid)
    return jnp.zeros((0, w.pos.shape[1]), base.output_dtype(x, kwargs["x_scale"],
                                                            kwargs["w_scale"]))
  if name in base.POLICIES:
    policy = base.POLICIES[name]
    base.check_platform(name, policy.platforms)
    name, x, x_ternary = policy.choose(x, w, x_ternary=kwargs.pop("x_ternary"))
    kwargs["x_ternary"] = x_ternary
  impl = base.IMPLEMENTATIONS[name]
  base.check_platform(name, impl.platforms)
  return impl.matmul(x, w, **kwargs)


def _first(names: Sequence[str], run) -> jax.Array:
  """``run(name, errors)`` for the first name that does not raise ``NotImplementedError``
  (``run`` may add the errors it recovered from)."""
  errors = []
  for name in names:
    try:
      return run(name, errors)
    except NotImplementedError as e:
      errors.append(f"{name}: {e}")
  raise NotImplementedError("no implementation handles this call: " + "; ".join(errors))


def ternary_matmul(x: jax.Array, w: Bitplanes, *, x_ternary: bool = False, x_scale=None,
                   w_scale=None, w_scale_neg=None,
                   implementation: str | Sequence[str] | None = None) -> jax.Array:
  """``(M, K) × ternary (K, N)``: exact integer sums, then the scales (:func:`epilogue`).

  What it computes depends on ``x``: ternary codes with ``x_ternary=True`` (bitplane AND +
  popcount, int32), other integer codes (int8, W2A8: an exact integer dot, int32), floats (the
  weights unpacked to ``x.dtype``, a float dot).

  Args:
    x: activations; int codes in {-1, 0, 1} with ``x_ternary=True``, other integer codes
      (int8, W2A8), or floats.
    w: the ternary kernel as ``pack_bitplanes(t, axis=0)``.
    x_scale: per-row (``(M, 1)``) or scalar activation scale, or None.
    w_scale: per-column (``(N,)``) or scalar weight scale, or None.
    w_scale_neg: scale of the −1 weights when it differs from ``w_scale`` (TTQ's ``αn``).
    implementation: a name, a sequence of names tried in order, or None (environment
      variable ``TERNJAX_IMPLEMENTATION``, else the backend's default).

  Returns:
    int32 ``(M, N)`` for integer ``x`` without scales, float32 otherwise.
  """
  base.check_operands(x, w)
  base.check_scales(w_scale, w_scale_neg)
  kwargs = dict(x_ternary=x_ternary, x_scale=x_scale, w_scale=w_scale, w_scale_neg=w_scale_neg)
  return _first(base.candidates(implementation), lambda name, _: _matmul(name, x, w, **kwargs))


def ternary_conv(x: jax.Array, w: Bitplanes, *, window: Sequence[int],
                 strides: Sequence[int] | None = None, padding="SAME", rhs_dilation=None,
                 x_ternary: bool = False, x_scale=None, w_scale=None, w_scale_neg=None,
                 implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Convolution of NHWC ``x`` with a ternary kernel (exact integer sums, then the scales).

  ``w`` is ``pack_bitplanes(kernel_to_matrix(t), axis=0)``; ``x_scale`` is per example
  (broadcastable to ``(N, 1, ..., 1)``) or scalar. Implementations are tried as in
  :func:`ternary_matmul`: one with a direct convolution runs it, falling back (on
  ``NotImplementedError``) to patches + its matmul, as do the others.
  """
  window = tuple(window)
  geometry = dict(window=window, strides=tuple(strides or (1,) * len(window)), padding=padding,
                  rhs_dilation=tuple(rhs_dilation or (1,) * len(window)))
  base.check_weights(w)
  if x.ndim != len(window) + 2 or w.length != x.shape[-1] * math.prod(window):
    raise ValueError(f"x must be (N, *spatial, C) with C·prod(window) = {w.length} "
                     f"({window=}), got {x.shape=}")
  base.check_scales(w_scale, w_scale_neg)
  kwargs = dict(x_ternary=x_ternary, x_scale=x_scale, w_scale=w_scale, w_scale_neg=w_scale_neg)

  def run(name, errors):
    impl = base.IMPLEMENTATIONS.get(name) or base.POLICIES.get(name)
    if impl is not None and impl.conv is not None and x.shape[0] > 0:
      try:
        base.check_platform(name, impl.platforms)
        return impl.conv(x, w, **geometry, **kwargs)
      except NotImplementedError as e:
        errors.append(f"{name} conv: {e}")
    return conv.patches_conv(x, w, **geometry, **kwargs,
                             matmul=functools.partial(_matmul, name))

  return _first(base.candidates(implementation), run)
