"""The XLA reference of the ternary matmul, and the exact building blocks of every XLA form.

All forms are exact and give the same integers. Activation bitplanes are used as
``(x_nonzero, x_neg)``; weight bitplanes as ``(w_nonzero, w_neg)`` for one sum, or
``(w_pos, w_neg)`` for the two sums of asymmetric scales (``two_sums``). Off the CPU, where XLA
serves as the fallback and reference next to the kernels, the ``'xla'`` implementation runs
:func:`reference_matmul`; on the CPU it picks among the formulations of :mod:`ternjax.ops.cpu`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ternjax.packing import WORD_BITS, Bitplanes, pack_bitplanes

FLOAT32_EXACT = (jnp.float32, jnp.bfloat16, jnp.float16)


def pad_to(a: jax.Array, shape) -> jax.Array:
  """``a`` zero-padded at the end of each axis to ``shape`` (zero trits add nothing)."""
  if tuple(shape) == a.shape:
    return a
  return jnp.pad(a, [(0, s - n) for s, n in zip(shape, a.shape)])


def popcount_terms(x, w, two_sums: bool, dtype=jnp.int32) -> tuple[jax.Array, ...]:
  """Per-word sums of ``x = (xz, xn)`` times ``w``: ``Σ x·t``, or ``Σ x·[t=+1]``, ``Σ x·[t=−1]``.

  One sum: ``t·x ≠ 0`` on ``z = xz & wz`` and is negative where exactly one sign is, so
  ``Σ x·t = popc(z) − 2·popc(z & (xn ^ wn))``. Two sums: ``Σ x·[t=±1] = popc(xz & w±) −
  2·popc(xn & w±)``. Each lies in [−32, 32], so ``dtype`` may be int8.
  """
  pc = lambda a: lax.population_count(a).astype(dtype)
  xz, xn = x
  if two_sums:
    return tuple(pc(xz & v) - 2 * pc(xn & v) for v in w)
  z = xz & w[0]
  return (pc(z) - 2 * pc(z & (xn ^ w[1])),)


def x_planes(x: Bitplanes):
  """``(x_nonzero, x_neg)`` words of activations packed along K (``pack_bitplanes(x, 1)``)."""
  return x.pos | x.neg, x.neg


def w_planes(w: Bitplanes, two_sums: bool):
  """``(w_nonzero, w_neg)``, or ``(w_pos, w_neg)`` for two sums, of a packed kernel."""
  return (w.pos, w.neg) if two_sums else (w.pos | w.neg, w.neg)


def popcount_broadcast(xw, ww, two_sums: bool) -> tuple[jax.Array, ...]:
  """Broadcast over ``(M, K/32, N)``, reduced over the words: one fused reduction.

  For one or two rows it streams the weights once; for more it recomputes too much per
  weight word. XLA writes the per-word sums before reducing them; as int8 they stay in L2.
  """
  terms = popcount_terms([a[:, :, None] for a in xw], [a[None] for a in ww], two_sums,
                         jnp.int8)
  return tuple(jnp.sum(t, axis=1, dtype=jnp.int32) for t in terms)


def popcount_matmul(x: Bitplanes, w: Bitplanes, two_sums: bool = False):
  """Reference bitplane GEMM: int32 ``Σ x·t`` (with ``two_sums``, ``(Σ x·[t=+1], Σ x·[t=−1])``)."""
  accs = popcount_broadcast(x_planes(x), w_planes(w, two_sums), two_sums)
  return accs if two_sums else accs[0]


def weight_values(planes, two_sums: bool, dtype, bit: int | None = None):
  """``(t,)`` or ``([t=+1], [t=−1])`` as ``dtype`` from ``(pos, neg)`` words ``(Kw, N)``.

  All ``32·Kw`` rows, or with ``bit`` the ``Kw`` rows of that bit of each word.
  """
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32) if bit is None else jnp.uint32(bit)
  shifts = jnp.reshape(shifts, (-1, 1))
  pos, neg = (((a[:, None] >> shifts) & 1).reshape(-1, a.shape[1]).astype(dtype) for a in planes)
  return (pos, neg) if two_sums else (pos - neg,)


def dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ w`` in ``x``'s dtype, accumulated in int32 (integer ``x``) or float32; float32 at
  ``Precision.HIGHEST``, as the kernels (a GPU's default rounds float32 inputs to TF32)."""
  acc_type = jnp.int32 if jnp.issubdtype(x.dtype, jnp.integer) else jnp.float32
  return lax.dot_general(x, w.astype(x.dtype), (((1,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
                         preferred_element_type=acc_type)


def dot_plain(x, w: Bitplanes, two_sums: bool) -> tuple[jax.Array, ...]:
  """Unpacks all of ``w`` to ``x.dtype`` and contracts with one dot (``x`` zero-padded to whole
  words: unpacking in place is much faster than :func:`unpack_bitplanes`' transposes)."""
  x = pad_to(x, (x.shape[0], w.pos.shape[0] * WORD_BITS))
  return tuple(dot(x, v) for v in weight_values((w.pos, w.neg), two_sums, x.dtype))


def float_exact(dtype, k: int) -> bool:
  """Whether sums of ``k`` products of ``dtype`` integers and trits are exact in float32.

  float32 holds every integer of magnitude up to 2^24, so ``K·max|x| ≤ 2^24`` suffices.
  """
  info = jnp.iinfo(dtype)
  return k * max(-int(info.min), int(info.max)) <= 2 ** 24


def reference_matmul(x, w: Bitplanes, *, x_ternary: bool, two_sums: bool):
  """The accumulators of ``x × w`` in the plain forms: popcount on bitplanes for ternary
  ``x``, else one dot of the unpacked weights in ``x``'s dtype."""
  if x_ternary:
    accs = popcount_matmul(pack_bitplanes(x, axis=1), w, two_sums)
    return accs if two_sums else (accs,)
  return dot_plain(x, w, two_sums)
