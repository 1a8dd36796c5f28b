"""Ternary matmul and convolution behind one dispatch point.

``ternary_matmul(x, w)`` contracts activations ``x`` of shape ``(M, K)`` with ternary weights
``w`` packed as :class:`~ternjax.packing.Bitplanes` along ``K`` (planes of shape ``(⌈K/32⌉, N)``).
What it computes depends on ``x``:

* ``x_ternary=True`` (int codes in {-1, 0, 1}): bitplane AND + popcount, int32;
* an integer ``x`` (e.g. int8 codes, W2A8): an exact integer dot, int32;
* a float ``x``: the weights are unpacked to ``x.dtype`` and contracted with a float dot.

Scales are applied in one epilogue shared by every implementation (:func:`epilogue`).
Implementations are registered by name; the dispatcher tries them in order (the call's
``implementation``, else the ``TERNJAX_IMPLEMENTATION`` environment variable, a comma-separated
list, else the default for the backend) and falls through on ``NotImplementedError``. ``'xla'``
is always present, runs everywhere and is the reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ternjax.packing import Bitplanes, pack_bitplanes, unpack_bitplanes

ENV_VAR = "TERNJAX_IMPLEMENTATION"

# name -> fn(x, w, *, x_ternary, x_scale, w_scale, w_scale_neg) -> array
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {}
# backend -> implementation names tried in order when none is requested
DEFAULTS: dict[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}


def register(name: str, fn: Callable[..., jax.Array], *, backends: Sequence[str] = ()) -> None:
  """Registers an implementation; it is put first in the defaults of ``backends``."""
  IMPLEMENTATIONS[name] = fn
  for backend in backends:
    DEFAULTS[backend] = (name,) + tuple(n for n in DEFAULTS.get(backend, ()) if n != name)


def epilogue(acc: jax.Array, acc_neg: jax.Array | None = None, *, x_scale=None, w_scale=None,
             w_scale_neg=None) -> jax.Array:
  """Scales accumulators: ``((acc·w_scale) [− acc_neg·w_scale_neg])·x_scale``.

  ``acc`` is ``Σ x·t``, or ``Σ x·[t = +1]`` when ``acc_neg = Σ x·[t = −1]`` is given
  (asymmetric scales, TTQ). ``w_scale`` broadcasts to ``(N,)``, ``x_scale`` to ``(M, 1)``.
  Without scales the accumulator is returned unchanged (int32 for integer inputs).
  """
  if w_scale is None and x_scale is None:
    return acc if acc_neg is None else acc - acc_neg
  out = acc.astype(jnp.float32)
  if w_scale is not None:
    out = out * w_scale
  if acc_neg is not None:
    neg = acc_neg.astype(jnp.float32)
    out = out - (neg * w_scale_neg if w_scale_neg is not None else neg)
  if x_scale is not None:
    out = out * x_scale
  return out


def check_operands(x: jax.Array, w: Bitplanes) -> None:
  """Raises ``ValueError`` with the shapes when ``x`` and ``w`` cannot be contracted."""
  if not isinstance(w, Bitplanes) or w.axis != 0 or w.pos.ndim != 2:
    raise ValueError("w must be Bitplanes of a (K, N) kernel packed along axis 0 "
                     f"(pack_bitplanes(t, axis=0)), got {w!r:.120}")
  if x.ndim != 2 or x.shape[1] != w.length:
    raise ValueError(f"x must be (M, K) with K = {w.length}, got {x.shape=}")


# --------------------------------------------------------------------------------------------
# XLA reference implementation


def popcount_matmul(x: Bitplanes, w: Bitplanes, two_sums: bool = False):
  """Reference bitplane GEMM: int32 ``Σ popc(x₊&w₊ | x₋&w₋) − popc(x₊&w₋ | x₋&w₊)``.

  With ``two_sums`` returns ``(Σ x·[t=+1], Σ x·[t=−1])`` instead of their difference.
  """
  xp, xn = x.pos[:, :, None], x.neg[:, :, None]
  wp, wn = w.pos[None], w.neg[None]
  pc = lambda a: jnp.sum(lax.population_count(a).astype(jnp.int32), axis=1)
  if two_sums:
    return pc(xp & wp) - pc(xn & wp), pc(xp & wn) - pc(xn & wn)
  return pc((xp & wp) | (xn & wn)) - pc((xp & wn) | (xn & wp))


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
  acc_type = jnp.int32 if jnp.issubdtype(x.dtype, jnp.integer) else jnp.float32
  return lax.dot_general(x, w.astype(x.dtype), (((1,), (0,)), ((), ())),
                         preferred_element_type=acc_type)


def xla_matmul(x, w, *, x_ternary=False, x_scale=None, w_scale=None, w_scale_neg=None):
  """The XLA implementation (and reference) of :func:`ternary_matmul`."""
  two_sums = w_scale_neg is not None
  if x_ternary:
    accs = popcount_matmul(pack_bitplanes(x, axis=1), w, two_sums)
    accs = accs if two_sums else (accs,)
  else:
    t = unpack_bitplanes(w, x.dtype)
    accs = (_dot(x, t == 1), _dot(x, t == -1)) if two_sums else (_dot(x, t),)
  return epilogue(*accs, x_scale=x_scale, w_scale=w_scale, w_scale_neg=w_scale_neg)


register("xla", xla_matmul)


# --------------------------------------------------------------------------------------------
# Dispatch


def _candidates(implementation: str | Sequence[str] | None) -> tuple[str, ...]:
  if implementation is None:
    implementation = os.environ.get(ENV_VAR) or DEFAULTS.get(jax.default_backend(), ("xla",))
  if isinstance(implementation, str):
    implementation = tuple(n.strip() for n in implementation.split(",") if n.strip())
  unknown = [n for n in implementation if n not in IMPLEMENTATIONS]
  if unknown or not implementation:
    raise ValueError(f"unknown implementation(s) {unknown or implementation}; "
                     f"available: {sorted(IMPLEMENTATIONS)}")
  return tuple(implementation)


def ternary_matmul(x: jax.Array, w: Bitplanes, *, x_ternary: bool = False, x_scale=None,
                   w_scale=None, w_scale_neg=None,
                   implementation: str | Sequence[str] | None = None) -> jax.Array:
  """``(M, K) × ternary (K, N)``: exact integer sums, then the scales (:func:`epilogue`).

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
  check_operands(x, w)
  if w_scale_neg is not None and w_scale is None:
    raise ValueError("w_scale_neg needs w_scale (the scale of the +1 weights)")
  errors = []
  for name in _candidates(implementation):
    try:
      return IMPLEMENTATIONS[name](x, w, x_ternary=x_ternary, x_scale=x_scale,
                                   w_scale=w_scale, w_scale_neg=w_scale_neg)
    except NotImplementedError as e:
      errors.append(f"{name}: {e}")
  raise NotImplementedError("no implementation handles this call: " + "; ".join(errors))


def conv_patches(x: jax.Array, window: Sequence[int], strides: Sequence[int], padding,
                 rhs_dilation: Sequence[int] | None = None) -> jax.Array:
  """Patches of an NHWC input, ``(N, H', W', C·kh·kw)`` in (C, kh, kw) order (exact for ints)."""
  ndim = len(window)
  spatial = "HWD"[:ndim]
  dn = ("N" + spatial + "C", "OI" + spatial, "N" + spatial + "C")
  patches = lax.conv_general_dilated_patches(
      x.astype(jnp.float32), tuple(window), tuple(strides), padding,
      rhs_dilation=rhs_dilation, dimension_numbers=dn)
  return patches.astype(x.dtype)


def kernel_to_matrix(kernel: jax.Array) -> jax.Array:
  """A ``(*window, C, O)`` conv kernel as the ``(C·prod(window), O)`` matrix of :func:`conv_patches`."""
  ndim = kernel.ndim - 2
  return jnp.moveaxis(kernel, ndim, 0).reshape(-1, kernel.shape[-1])


def ternary_conv(x: jax.Array, w: Bitplanes, *, window: Sequence[int],
                 strides: Sequence[int] | None = None, padding="SAME", rhs_dilation=None,
                 x_ternary: bool = False, x_scale=None, w_scale=None, w_scale_neg=None,
                 implementation=None) -> jax.Array:
  """Convolution of NHWC ``x`` with a ternary kernel, as patches + :func:`ternary_matmul`.

  ``w`` is ``pack_bitplanes(kernel_to_matrix(t), axis=0)``; ``x_scale`` is per example
  (broadcastable to ``(N, 1, ..., 1)``) or scalar.
  """
  strides = strides or (1,) * len(window)
  patches = conv_patches(x, window, strides, padding, rhs_dilation)
  out_spatial = patches.shape[:-1]
  rows = patches.reshape(-1, patches.shape[-1])
  if x_scale is not None and jnp.ndim(x_scale) > 0:
    x_scale = jnp.broadcast_to(jnp.reshape(x_scale, (-1,) + (1,) * (len(out_spatial) - 1)),
                               out_spatial).reshape(-1, 1)
  out = ternary_matmul(rows, w, x_ternary=x_ternary, x_scale=x_scale, w_scale=w_scale,
                       w_scale_neg=w_scale_neg, implementation=implementation)
  return out.reshape(*out_spatial, -1)


# GPU implementations register themselves on import (they need jax-triton / a GPU to run).
try:
  import ternjax.kernels  # noqa: E402,F401
except ImportError:  # pragma: no cover - the kernels package is part of every install
  pass
