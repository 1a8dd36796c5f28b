"""The CPU formulations of the XLA implementation and the one table that picks among them.

Each formulation is exact (the same integers as :func:`ternjax.ops.xla.reference_matmul`);
they differ in speed by shape. :data:`POPCOUNT` (ternary ``x``) and :data:`DOT` (integer or
float ``x``) name them, with one signature each, so that tests and ``experiments/bench_cpu.py
--sweep`` run every one directly; :func:`matmul` chooses by the thresholds of
:class:`CpuTuning`, measured with that sweep (figures and machine:
``experiments/results/cpu_tuning.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ternjax.ops import xla
from ternjax.packing import WORD_BITS, Bitplanes


@dataclasses.dataclass(frozen=True, kw_only=True)
class CpuTuning:
  """Where the CPU formulations change (hashable: a static argument of the jitted ops).

  Ternary ``x``, by the size ``M·N`` of the accumulators: the word loop on one thread up to
  ``popcount_serial_max_mn`` and from ``popcount_loop_min_mn`` (each step worth splitting
  across threads), in between the broadcast up to ``popcount_broadcast_max_m`` rows, else
  tiles; past ``popcount_loop_max_m`` rows (convolution patches) tiles of
  ``popcount_tile_k_words`` words × ``popcount_tile_n`` columns.
  Integer / float ``x``: one dot while ``w`` unpacked to float32 fits ``dot_plain_max_bytes``
  (and ``M·N > select_serial_max_mn``); else single-row multiply-adds up to
  ``select_max_m`` rows (``select_k_words`` words per step) or ``M·N ≤ select_serial_max_mn``,
  else dots of ``dot_k_words``-word blocks; int8 ``x`` of ``int8_dot_min_m`` rows or more: one
  int8 dot. Convolutions: channel-packed popcount from ``conv_pack_min_c`` channels and
  ``conv_pack_min_rows`` output rows; patches + matmul reorders the patches (not the weights)
  up to ``conv_reorder_patches_max_m × N`` rows (on every backend).
  """

  popcount_serial_max_mn: int = 1024
  popcount_loop_min_mn: int = 16384
  popcount_loop_max_m: int = 256
  popcount_broadcast_max_m: int = 2
  popcount_tile_k_words: int = 32
  popcount_tile_n: int = 128
  dot_plain_max_bytes: int = 4 << 20
  select_max_m: int = 2
  select_k_words: int = 1
  select_serial_max_mn: int = 256
  dot_k_words: int = 8
  int8_dot_min_m: int = 32
  conv_pack_min_c: int = 16
  conv_pack_min_rows: int = 256
  conv_reorder_patches_max_m: int = 64


CPU_TUNING = CpuTuning()


def activation_planes(x: jax.Array):
  """``(x_nonzero, x_neg)`` words of ternary codes ``(M, K)``, as ``pack_bitplanes(x, axis=1)``.

  A faster route for the large ``x`` of convolution patches: four int8 codes (``0x01``, ``0xFF``
  or 0) are read as one uint32, their flag bits (bit 0: nonzero, bit 7: negative) sit at bits
  0, 8, 16, 24, and multiplying by ``2^28 + 2^21 + 2^14 + 2^7`` gathers them into bits 28–31
  (the other partial products land below bit 24 or above bit 31, without carries).
  """
  m, k = x.shape
  x = xla.pad_to(x.astype(jnp.int8), (m, -(-k // WORD_BITS) * WORD_BITS))
  quads = lax.bitcast_convert_type(x.reshape(m, -1, WORD_BITS // 4, 4), jnp.uint32)

  def pack(flags):
    nibbles = (flags & 0x01010101) * jnp.uint32(0x10204080) >> 28
    return sum(nibbles[..., q] << (4 * q) for q in range(WORD_BITS // 4))

  return pack(quads), pack(quads >> 7)


def popcount_tiled(xw, ww, two_sums: bool, k_words: int, n_tile: int):
  """Blocked bitplane GEMM: a loop over groups of ``k_words`` words of K, unrolled inside.

  Each step is one vectorized elementwise fusion adding ``k_words`` words' popcounts into
  ``(N/n_tile, M, n_tile)`` accumulators, weights laid out as contiguous ``(k_words, n_tile)``
  tiles (strided rows alias in L1). Nothing of size ``M·N·K/32`` is materialized. XLA stops
  vectorizing a fusion of about 100 unrolled words; the loop keeps each one short.
  """
  m, kw = xw[0].shape
  n = ww[0].shape[1]
  k_words, n_tile = min(k_words, kw), min(n_tile, n)
  g, t = -(-kw // k_words), -(-n // n_tile)
  xg = [xla.pad_to(a, (m, g * k_words)).reshape(m, g, k_words).transpose(1, 0, 2) for a in xw]
  wg = [xla.pad_to(a, (g * k_words, t * n_tile)).reshape(g, k_words, t, n_tile)
        .transpose(0, 2, 1, 3) for a in ww]

  def step(i, accs):
    xi, wi = [a[i] for a in xg], [a[i] for a in wg]
    for j in range(k_words):
      terms = xla.popcount_terms([a[None, :, j, None] for a in xi],
                                 [a[:, None, j] for a in wi], two_sums)
      accs = tuple(acc + term for acc, term in zip(accs, terms))
    return accs

  zeros = jnp.zeros((t, m, n_tile), jnp.int32)
  accs = lax.fori_loop(0, g, step, (zeros,) * (2 if two_sums else 1))
  return tuple(a.transpose(1, 0, 2).reshape(m, t * n_tile)[:, :n] for a in accs)


def dot_blocked(x, w: Bitplanes, two_sums: bool, k_words: int, select: bool):
  """Float32 ``x`` by ternary ``w``, unpacking ``32·k_words`` rows of ``w`` per loop step.

  The unpacked block stays in cache (all of ``w`` unpacked to float32 is 16× its packed size).
  Each step is a dot, or with ``select`` multiply-adds of single unpacked rows fused into one
  elementwise loop (for a few rows of ``x``, where a dot is bound by reading its weights).
  """
  m = x.shape[0]
  kw, n = w.pos.shape
  k_words = min(k_words, kw)
  g = -(-kw // k_words)
  xg = xla.pad_to(x, (m, g * k_words * WORD_BITS)).reshape(m, g, -1).transpose(1, 0, 2)
  wg = [xla.pad_to(a, (g * k_words, n)).reshape(g, k_words, n) for a in (w.pos, w.neg)]

  def step(i, accs):
    xi, planes = xg[i], [a[i] for a in wg]
    if not select:
      return tuple(acc + xla.dot(xi, v)
                   for acc, v in zip(accs, xla.weight_values(planes, two_sums, jnp.float32)))
    for r in range(xi.shape[1]):
      row = [a[r // WORD_BITS, None] for a in planes]
      values = xla.weight_values(row, two_sums, jnp.float32, bit=r % WORD_BITS)
      accs = tuple(acc + xi[:, r, None] * v for acc, v in zip(accs, values))
    return accs

  zeros = jnp.zeros((m, n), jnp.float32)
  return lax.fori_loop(0, g, step, (zeros,) * (2 if two_sums else 1))


# name -> fn(activation planes (xz, xn), weight planes, two_sums, tuning) -> int32 accumulators
POPCOUNT: dict[str, Callable] = {
    "loop": lambda xw, ww, ts, tuning: popcount_tiled(xw, ww, ts, 1, ww[0].shape[1]),
    "broadcast": lambda xw, ww, ts, tuning: xla.popcount_broadcast(xw, ww, ts),
    "tiled": lambda xw, ww, ts, tuning: popcount_tiled(
        xw, ww, ts, tuning.popcount_tile_k_words, tuning.popcount_tile_n),
}
# name -> fn(float32 x, packed w, two_sums, tuning) -> float32 accumulators
DOT: dict[str, Callable] = {
    "plain": lambda x, w, ts, tuning: xla.dot_plain(x, w, ts),
    "select": lambda x, w, ts, tuning: dot_blocked(x, w, ts, tuning.select_k_words, True),
    "blocked": lambda x, w, ts, tuning: dot_blocked(x, w, ts, tuning.dot_k_words, False),
}


def popcount_formulation(m: int, n: int, tuning: CpuTuning = CPU_TUNING) -> str:
  """The :data:`POPCOUNT` formulation for ``(M, K) × (K, N)``."""
  mid = tuning.popcount_serial_max_mn < m * n < tuning.popcount_loop_min_mn
  if m <= tuning.popcount_loop_max_m and not mid:
    return "loop"
  return "broadcast" if m <= tuning.popcount_broadcast_max_m else "tiled"


def dot_formulation(m: int, k: int, n: int, tuning: CpuTuning = CPU_TUNING) -> str:
  """The :data:`DOT` formulation for float32 ``(M, K) × (K, N)``."""
  small = m * n <= tuning.select_serial_max_mn
  if 4 * k * n <= tuning.dot_plain_max_bytes and not small:
    return "plain"
  return "select" if m <= tuning.select_max_m or small else "blocked"


def popcount(xw, ww, two_sums: bool, tuning: CpuTuning = CPU_TUNING):
  """The CPU bitplane GEMM for the shape of ``xw (M, K/32) × ww (K/32, N)``."""
  name = popcount_formulation(xw[0].shape[0], ww[0].shape[1], tuning)
  return POPCOUNT[name](xw, ww, two_sums, tuning)


def float_route_exact(x: jax.Array, k: int) -> bool:
  """Whether ``x × trits`` over ``k`` terms is exact with float32 accumulation."""
  if jnp.issubdtype(x.dtype, jnp.integer):
    return xla.float_exact(x.dtype, k)
  return x.dtype in xla.FLOAT32_EXACT


def integer_sums(accs, integer: bool, scaled: bool):
  """Exact float32 sums of integer ``x`` as int32, unless the epilogue scales them (it would
  convert back: the round trip breaks XLA's fusion of a convolution with what follows)."""
  if integer and not scaled:
    return tuple(a.astype(jnp.int32) for a in accs)
  return accs


def matmul(x, w: Bitplanes, *, x_ternary: bool, two_sums: bool, scaled: bool,
           tuning: CpuTuning = CPU_TUNING) -> tuple[jax.Array, ...]:
  """The accumulators of ``x × w`` in the CPU formulation for the shape.

  Integer ``x`` is contracted in float32 where that is exact (:func:`float_route_exact`),
  except int8 ``x`` of many rows (an int8 dot), and so are float16 / bfloat16 ``x`` (products
  with trits are exact; float32 accumulation). ``scaled``: the epilogue applies scales.
  """
  m, k = x.shape
  if x_ternary:
    return popcount(activation_planes(x), xla.w_planes(w, two_sums), two_sums, tuning)
  if (x.dtype == jnp.int8 and m >= tuning.int8_dot_min_m) or not float_route_exact(x, k):
    return xla.dot_plain(x, w, two_sums)
  name = dot_formulation(m, k, w.pos.shape[1], tuning)
  accs = DOT[name](x.astype(jnp.float32), w, two_sums, tuning)
  return integer_sums(accs, jnp.issubdtype(x.dtype, jnp.integer), scaled)
