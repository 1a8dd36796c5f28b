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

import functools
import itertools
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ternjax.packing import WORD_BITS, Bitplanes, pack_bitplanes, unpack_bitplanes

ENV_VAR = "TERNJAX_IMPLEMENTATION"

# name -> fn(x, w, *, x_ternary, x_scale, w_scale, w_scale_neg) -> array
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {}
# name -> conv fn(x, w, *, window, strides, padding, rhs_dilation, x_ternary, scales) -> array,
# for implementations with a direct convolution (else ternary_conv uses patches + matmul)
CONVOLUTIONS: dict[str, Callable[..., jax.Array]] = {}
# backend -> implementation names tried in order when none is requested
DEFAULTS: dict[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}


def register(name: str, fn: Callable[..., jax.Array], *, backends: Sequence[str] = (),
             conv: Callable[..., jax.Array] | None = None) -> None:
  """Registers an implementation (and optionally its direct convolution); it is put first in
  the defaults of ``backends``."""
  IMPLEMENTATIONS[name] = fn
  if conv is not None:
    CONVOLUTIONS[name] = conv
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
# XLA implementation
#
# All formulations are exact and give the same integers; they differ in speed. On CPU,
# xla_matmul picks one by shape (the CPU_* thresholds); other backends, where XLA only serves as
# the fallback and reference next to the kernels, use the plain forms (popcount_matmul,
# _dot_plain). Activation bitplanes are used as (x_nonzero, x_neg); weight bitplanes as
# (w_nonzero, w_neg) for one sum, or (w_pos, w_neg) for the two sums of asymmetric scales.

def _popcount_terms(x, w, two_sums: bool, dtype=jnp.int32) -> tuple[jax.Array, ...]:
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


def _planes(x: Bitplanes, w: Bitplanes, two_sums: bool):
  return _x_planes(x), _w_planes(w, two_sums)


def _x_planes(x: Bitplanes):
  return x.pos | x.neg, x.neg


def _w_planes(w: Bitplanes, two_sums: bool):
  return (w.pos, w.neg) if two_sums else (w.pos | w.neg, w.neg)


def _pack_activations(x: jax.Array):
  """``(x_nonzero, x_neg)`` words of ternary codes ``(M, K)``, as ``pack_bitplanes(x, axis=1)``.

  A faster route for the large ``x`` of convolution patches: four int8 codes (``0x01``, ``0xFF``
  or 0) are read as one uint32, their flag bits (bit 0: nonzero, bit 7: negative) sit at bits
  0, 8, 16, 24, and multiplying by ``2^28 + 2^21 + 2^14 + 2^7`` gathers them into bits 28–31
  (the other partial products land below bit 24 or above bit 31, without carries).
  """
  m, k = x.shape
  x = _pad_to(x.astype(jnp.int8), (m, -(-k // WORD_BITS) * WORD_BITS))
  quads = lax.bitcast_convert_type(x.reshape(m, -1, WORD_BITS // 4, 4), jnp.uint32)

  def pack(flags):
    nibbles = (flags & 0x01010101) * jnp.uint32(0x10204080) >> 28
    return sum(nibbles[..., q] << (4 * q) for q in range(WORD_BITS // 4))

  return pack(quads), pack(quads >> 7)


def popcount_matmul(x: Bitplanes, w: Bitplanes, two_sums: bool = False):
  """Reference bitplane GEMM: int32 ``Σ x·t`` (with ``two_sums``, ``(Σ x·[t=+1], Σ x·[t=−1])``)."""
  accs = _popcount_broadcast(*_planes(x, w, two_sums), two_sums)
  return accs if two_sums else accs[0]


def _popcount_broadcast(xw, ww, two_sums):
  """Broadcast over ``(M, K/32, N)``, reduced over the words: one fused reduction.

  For one or two rows it streams the weights once, for more it recomputes too much per weight
  word (see :func:`_popcount_tiled`). XLA writes the per-word sums before reducing them; as
  int8 they stay in L2 (by hand, 4096², M = 1: 0.22–0.29 ms vs 0.33–0.36 ms as int32, warm).
  """
  terms = _popcount_terms([a[:, :, None] for a in xw], [a[None] for a in ww], two_sums,
                          jnp.int8)
  return tuple(jnp.sum(t, axis=1, dtype=jnp.int32) for t in terms)


def _pad_to(a: jax.Array, shape) -> jax.Array:
  return jnp.pad(a, [(0, s - n) for s, n in zip(shape, a.shape)])


def _popcount_tiled(xw, ww, two_sums, k_words: int, n_tile: int):
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
  xg = [_pad_to(a, (m, g * k_words)).reshape(m, g, k_words).transpose(1, 0, 2) for a in xw]
  wg = [_pad_to(a, (g * k_words, t * n_tile)).reshape(g, k_words, t, n_tile)
        .transpose(0, 2, 1, 3) for a in ww]

  def step(i, accs):
    xi, wi = [a[i] for a in xg], [a[i] for a in wg]
    for j in range(k_words):
      terms = _popcount_terms([a[None, :, j, None] for a in xi], [a[:, None, j] for a in wi],
                              two_sums)
      accs = tuple(acc + term for acc, term in zip(accs, terms))
    return accs

  zeros = jnp.zeros((t, m, n_tile), jnp.int32)
  accs = lax.fori_loop(0, g, step, (zeros,) * (2 if two_sums else 1))
  return tuple(a.transpose(1, 0, 2).reshape(m, t * n_tile)[:, :n] for a in accs)


def _weight_values(planes, two_sums: bool, dtype, bit: int | None = None):
  """``(t,)`` or ``([t=+1], [t=−1])`` as ``dtype`` from ``(pos, neg)`` words ``(Kw, N)``.

  All ``32·Kw`` rows, or with ``bit`` the ``Kw`` rows of that bit of each word.
  """
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32) if bit is None else jnp.uint32(bit)
  shifts = jnp.reshape(shifts, (-1, 1))
  pos, neg = (((a[:, None] >> shifts) & 1).reshape(-1, a.shape[1]).astype(dtype) for a in planes)
  return (pos, neg) if two_sums else (pos - neg,)


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
  acc_type = jnp.int32 if jnp.issubdtype(x.dtype, jnp.integer) else jnp.float32
  return lax.dot_general(x, w.astype(x.dtype), (((1,), (0,)), ((), ())),
                         preferred_element_type=acc_type)


def _dot_plain(x, w: Bitplanes, two_sums: bool):
  """Unpacks all of ``w`` to ``x.dtype`` and contracts with one dot (``x`` zero-padded to whole
  words: unpacking in place is much faster than :func:`unpack_bitplanes`' transposes)."""
  x = _pad_to(x, (x.shape[0], w.pos.shape[0] * WORD_BITS))
  return tuple(_dot(x, v) for v in _weight_values((w.pos, w.neg), two_sums, x.dtype))


def _dot_blocked(x, w: Bitplanes, two_sums: bool, k_words: int, select: bool):
  """Float32 ``x`` by ternary ``w``, unpacking ``32·k_words`` rows of ``w`` per loop step.

  The unpacked block stays in cache (all of ``w`` unpacked to float32 is 16× its packed size).
  Each step is a dot, or with ``select`` multiply-adds of single unpacked rows fused into one
  elementwise loop (for a few rows of ``x``, where a dot is bound by reading its weights).
  """
  m = x.shape[0]
  kw, n = w.pos.shape
  k_words = min(k_words, kw)
  g = -(-kw // k_words)
  xg = _pad_to(x, (m, g * k_words * WORD_BITS)).reshape(m, g, -1).transpose(1, 0, 2)
  wg = [_pad_to(a, (g * k_words, n)).reshape(g, k_words, n) for a in (w.pos, w.neg)]

  def step(i, accs):
    xi, planes = xg[i], [a[i] for a in wg]
    if not select:
      return tuple(acc + _dot(xi, v)
                   for acc, v in zip(accs, _weight_values(planes, two_sums, jnp.float32)))
    for r in range(xi.shape[1]):
      row = [a[r // WORD_BITS, None] for a in planes]
      values = _weight_values(row, two_sums, jnp.float32, bit=r % WORD_BITS)
      accs = tuple(acc + xi[:, r, None] * v for acc, v in zip(accs, values))
    return accs

  zeros = jnp.zeros((m, n), jnp.float32)
  return lax.fori_loop(0, g, step, (zeros,) * (2 if two_sums else 1))


def _float_exact(dtype, k: int) -> bool:
  """Whether sums of ``k`` products of ``dtype`` integers and trits are exact in float32.

  float32 holds every integer of magnitude up to 2^24, so ``K·max|x| ≤ 2^24`` suffices.
  """
  info = jnp.iinfo(dtype)
  return k * max(-int(info.min), int(info.max)) <= 2 ** 24


_FLOAT32_EXACT = (jnp.float32, jnp.bfloat16, jnp.float16)

# CPU formulation by shape, from `experiments/bench_cpu.py --sweep` (each formulation timed
# warm at M = 1..64 on 784×256 and 4096×4096; experiments/results/bench_cpu.md) on the 2-core
# AMD EPYC (Zen 4, AVX-512 VPOPCNTDQ) dev VM, load ≈ 1.5–2 (differences < ~20 % are noise).
#
# Ternary x, by the size of the (M, N) accumulators: a loop over the words of K, one word (32
# rows of w) per step, unless they are mid-sized. XLA:CPU splits a fusion that reads more than
# ~20 KB across its threads, and on this VM each hand-over to the other core costs tens of µs:
# up to SERIAL_MAX_MN the loop's steps run on one thread (784×256, M = 1 / 2 / 4: 14 / 26 / 32
# µs vs 54–142 µs for the others and 44–145 µs for the float32 dot); from LOOP_MIN_MN each
# step's work is worth the split (4096², M = 4 / 16 / 64: 0.42 / 1.23 / 3.0 ms vs tiles 0.79 /
# 1.57 / 3.5); in between, split steps are too small: the broadcast at M ≤ 2 (4096², M = 1:
# 0.23 ms vs 0.30 loop, 0.70 tiles) and tiles above (784×256, M = 8: 0.11 ms vs 0.20 loop).
# Past LOOP_MAX_M (convolution patches) the accumulators leave the cache: tiles (1024×512,
# M = 256, by hand: loop 0.60–0.75 ms, tiles 2.5 ms) of 32 words × 128 columns (ahead of 16 /
# 64 words and 64 / 256 / 512 columns, tried by hand).
CPU_POPCOUNT_SERIAL_MAX_MN = 1024
CPU_POPCOUNT_LOOP_MIN_MN = 16384
CPU_POPCOUNT_LOOP_MAX_M = 256
CPU_POPCOUNT_BROADCAST_MAX_M = 2
CPU_POPCOUNT_TILE = dict(k_words=32, n_tile=128)
# int / float x: one dot when w unpacked to float32 fits 4 MiB (784×256: within noise of the
# others; conv layers: patches of up to 10^5 rows × a small w); larger w: single-row
# multiply-adds at M ≤ 2 (4096², M = 1: 1.6 ms vs 2.5 ms for blocked dots; M = 2: 3.1 vs 3.0;
# behind from M = 4), dots of 256-row unpacked blocks above (4096², M = 8: 3.9 ms vs 29 ms for
# one dot of all of w unpacked).
CPU_DOT_PLAIN_MAX_BYTES = 4 << 20
CPU_SELECT_MAX_M = 2
CPU_SELECT_K_WORDS = 1
CPU_DOT_K_WORDS = 8
# int8 x from this many rows: w unpacked to int8 and one int8 dot with int32 accumulation (XLA's
# int8 dot is 4–6× slower than float32 at M = 1, ahead from M ≈ 32–64: 4096², M = 32 / 64,
# 10.4 / 13.5 ms vs 8.8 / 15.5 ms for blocked float32 dots; an earlier run 14.6 / 15.9 vs 17.0 /
# 22.4 ms).
CPU_INT8_DOT_MIN_M = 32
# Float x: the single-row multiply-adds also for small products, up to this M·N (M = 1, by hand:
# 256×128 49 µs vs 101 µs unpacking all of w, 512×10 30 vs 140; but 1024×512 236 vs 166; the
# float32 dots: 25, 13, 89 µs).
CPU_SELECT_SERIAL_MAX_MN = 256


def _integer_sums(accs, integer: bool, x_scale, w_scale):
  """Exact float32 sums of integer ``x`` as int32, unless the epilogue scales them (it would
  convert back: the round trip breaks XLA's fusion of a convolution with what follows)."""
  if integer and x_scale is None and w_scale is None:
    return tuple(a.astype(jnp.int32) for a in accs)
  return accs


def _popcount_cpu(xw, ww, two_sums):
  """The CPU bitplane GEMM for the shape of ``xw (M, K/32) × ww (K/32, N)``."""
  m, n = xw[0].shape[0], ww[0].shape[1]
  if m <= CPU_POPCOUNT_LOOP_MAX_M and not (CPU_POPCOUNT_SERIAL_MAX_MN < m * n
                                           < CPU_POPCOUNT_LOOP_MIN_MN):
    return _popcount_tiled(xw, ww, two_sums, k_words=1, n_tile=n)
  if m <= CPU_POPCOUNT_BROADCAST_MAX_M:
    return _popcount_broadcast(xw, ww, two_sums)
  return _popcount_tiled(xw, ww, two_sums, **CPU_POPCOUNT_TILE)


@functools.partial(jax.jit, static_argnames="x_ternary")
def xla_matmul(x, w, *, x_ternary=False, x_scale=None, w_scale=None, w_scale_neg=None):
  """The XLA implementation (and reference) of :func:`ternary_matmul` (jitted: eager calls
  compile once per shape rather than op by op).

  On CPU the formulation depends on the shape (the ``CPU_*`` constants above); small products
  run as a loop over the words of K, on one thread. Integer ``x`` is contracted in float32
  where that is exact (:func:`_float_exact`), except int8 ``x`` of many rows (an int8 dot), and
  so are float16 / bfloat16 ``x`` (products with trits are exact; float32 accumulation).
  """
  two_sums = w_scale_neg is not None
  m, k = x.shape
  cpu = jax.default_backend() == "cpu"
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  if x_ternary and not cpu:
    accs = popcount_matmul(pack_bitplanes(x, axis=1), w, two_sums)
    accs = accs if two_sums else (accs,)
  elif x_ternary:
    accs = _popcount_cpu(_pack_activations(x), _w_planes(w, two_sums), two_sums)
  elif (not cpu or (x.dtype == jnp.int8 and m >= CPU_INT8_DOT_MIN_M)
        or not (_float_exact(x.dtype, k) if integer else x.dtype in _FLOAT32_EXACT)):
    accs = _dot_plain(x, w, two_sums)
  else:
    xf = x.astype(jnp.float32)
    n = w.pos.shape[1]
    small = m * n <= CPU_SELECT_SERIAL_MAX_MN
    if 4 * k * n <= CPU_DOT_PLAIN_MAX_BYTES and not small:
      accs = _dot_plain(xf, w, two_sums)
    elif m <= CPU_SELECT_MAX_M or small:
      accs = _dot_blocked(xf, w, two_sums, CPU_SELECT_K_WORDS, select=True)
    else:
      accs = _dot_blocked(xf, w, two_sums, CPU_DOT_K_WORDS, select=False)
    accs = _integer_sums(accs, integer, x_scale, w_scale)
  return epilogue(*accs, x_scale=x_scale, w_scale=w_scale, w_scale_neg=w_scale_neg)


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


def _window_patches(x: jax.Array, window: Sequence[int], strides: Sequence[int], padding,
                    rhs_dilation: Sequence[int] | None = None) -> jax.Array:
  """Patches of an NHWC input, ``(N, H', W', kh·kw·C)`` in (kh, kw, C) order.

  One strided slice per window offset, concatenated along channels: data movement only (exact
  for every dtype, ``M·K`` work where ``lax.conv_general_dilated_patches``, a convolution with
  an identity kernel, does ``M·K²``), and the order that copies channel runs whole.
  """
  spatial = x.shape[1:-1]
  dilation = tuple(rhs_dilation or (1,) * len(window))
  span = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
  pads = (lax.padtype_to_pads(spatial, span, strides, padding) if isinstance(padding, str)
          else [tuple(p) for p in padding])
  x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  out = [(n - s) // st + 1 for n, s, st in zip(x.shape[1:-1], span, strides)]
  patches = []
  for offset in itertools.product(*map(range, window)):
    start = [o * d for o, d in zip(offset, dilation)]
    limit = [b + (n - 1) * st + 1 for b, n, st in zip(start, out, strides)]
    patches.append(lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]),
                             (1, *strides, 1)))
  return jnp.concatenate(patches, axis=-1)


def _c_major(patches: jax.Array, channels: int) -> jax.Array:
  """Window-major patches reordered to (C, kh, kw)."""
  shape = patches.shape[:-1]
  return jnp.swapaxes(patches.reshape(*shape, -1, channels), -1, -2).reshape(*shape, -1)


def conv_patches(x: jax.Array, window: Sequence[int], strides: Sequence[int], padding,
                 rhs_dilation: Sequence[int] | None = None) -> jax.Array:
  """Patches of an NHWC input, ``(N, H', W', C·kh·kw)`` in (C, kh, kw) order (exact)."""
  return _c_major(_window_patches(x, window, strides, padding, rhs_dilation), x.shape[-1])


def _window_major_trits(w: Bitplanes, channels: int, dtype=jnp.int8) -> jax.Array:
  """The trits of a :func:`kernel_to_matrix` matrix, rows reordered from (C, *window) to
  (*window, C): ``(prod(window), C, O)``."""
  t = unpack_bitplanes(w, dtype).reshape(channels, -1, w.pos.shape[1])
  return jnp.swapaxes(t, 0, 1)


# ternary_conv reorders the patches (not the weights) up to M = this × N rows (measured with
# LeNet-5's convolutions at batch 1 and 256, experiments/bench_cpu.py).
CONV_REORDER_PATCHES_MAX_M = 64


def kernel_to_matrix(kernel: jax.Array) -> jax.Array:
  """A ``(*window, C, O)`` conv kernel as the ``(C·prod(window), O)`` matrix of :func:`conv_patches`."""
  ndim = kernel.ndim - 2
  return jnp.moveaxis(kernel, ndim, 0).reshape(-1, kernel.shape[-1])


def _conv_kernel(w: Bitplanes, channels: int, window: Sequence[int], dtype,
                 two_sums: bool) -> jax.Array:
  """The ``(*window, C, O)`` kernel of a :func:`kernel_to_matrix` matrix as ``dtype``; with
  ``two_sums`` its ``[t = +1]`` and ``[t = −1]`` kernels concatenated along ``O``."""
  t = _window_major_trits(w, channels, dtype).reshape(*window, channels, -1)
  return jnp.concatenate([(t == 1).astype(dtype), (t == -1).astype(dtype)], -1) if two_sums else t


def _conv_popcount(x, w: Bitplanes, window, strides, padding, rhs_dilation, two_sums):
  """Ternary ``x``: channels packed into words per pixel first, then patches of words.

  The patches are ``prod(window)·⌈C/32⌉`` words per output instead of ``prod(window)·C``
  codes; the kernel is repacked to match (per window offset, channels zero-padded to words).
  """
  *batch_spatial, c = x.shape
  xw = [a.reshape(*batch_spatial, -1) for a in _pack_activations(x.reshape(-1, c))]
  patches = [_window_patches(a, window, strides, padding, rhs_dilation) for a in xw]
  out_spatial = patches[0].shape[:-1]
  rows = [a.reshape(-1, a.shape[-1]) for a in patches]
  cw = xw[0].shape[-1]
  t = jnp.pad(_window_major_trits(w, c), [(0, 0), (0, cw * WORD_BITS - c), (0, 0)])
  planes = _w_planes(pack_bitplanes(t.reshape(-1, t.shape[-1]), axis=0), two_sums)
  return tuple(a.reshape(*out_spatial, -1) for a in _popcount_cpu(rows, planes, two_sums))


# xla_conv packs ternary activations per pixel from this many channels and about this many
# output rows (LeNet-5's 12×12×32 → 8×8×64 conv, batch 1 / 4 / 16 / 64: 0.29 / 0.41 / 0.49 /
# 1.23 ms vs 0.20 / 0.41 / 1.44 / 7.20 ms for the float32 convolution of the unpacked kernel and
# 0.23 / 0.52 / 1.10 / 5.00 ms for patches + popcount; at batch 1 repacking the kernel
# dominates); with fewer channels (an image's 1–3) most bits of each word would be padding.
CPU_CONV_PACK_MIN_C = 16
CPU_CONV_PACK_MIN_ROWS = 256


def xla_conv(x, w, *, window, strides, padding, rhs_dilation, x_ternary=False, x_scale=None,
             w_scale=None, w_scale_neg=None):
  """Direct CPU convolutions (no patch matrix): channel-packed popcount for ternary ``x`` with
  many channels, else an XLA convolution of the unpacked kernel in float32 where that is exact
  (as in :func:`xla_matmul`). Raises ``NotImplementedError`` otherwise (and off CPU), so that
  :func:`ternary_conv` falls back to patches + :func:`xla_matmul`.
  """
  two_sums = w_scale_neg is not None
  c = x.shape[-1]
  k = w.length
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  if jax.default_backend() != "cpu":
    raise NotImplementedError("direct convolutions are for CPU")
  out_rows = x.shape[0] * math.prod(-(-n // s) for n, s in zip(x.shape[1:-1], strides))
  if x_ternary and c >= CPU_CONV_PACK_MIN_C and out_rows >= CPU_CONV_PACK_MIN_ROWS:
    accs = _conv_popcount(x, w, window, strides, padding, rhs_dilation, two_sums)
  elif (k <= 2 ** 24 if x_ternary else
        _float_exact(x.dtype, k) if integer else x.dtype in _FLOAT32_EXACT):
    sp = "HWD"[:len(window)]
    out = lax.conv_general_dilated(
        x.astype(jnp.float32), _conv_kernel(w, c, window, jnp.float32, two_sums), strides,
        padding, rhs_dilation=rhs_dilation,
        dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"))
    accs = jnp.split(out, 2, axis=-1) if two_sums else (out,)
    accs = _integer_sums(accs, integer, x_scale, w_scale)
  else:
    raise NotImplementedError(f"no exact direct convolution of {x.dtype} inputs over K = {k}")
  if x_scale is not None and jnp.ndim(x_scale) > 0:
    x_scale = jnp.reshape(x_scale, (-1,) + (1,) * (x.ndim - 1))
  return epilogue(*accs, x_scale=x_scale, w_scale=w_scale, w_scale_neg=w_scale_neg)


register("xla", xla_matmul, conv=xla_conv)


def _patches_conv(x, w, *, window, strides, padding, rhs_dilation, x_scale, implementation,
                  **kwargs):
  """Convolution as patches + :func:`ternary_matmul` with ``implementation``."""
  patches = _window_patches(x, window, strides, padding, rhs_dilation)
  out_spatial = patches.shape[:-1]
  rows = patches.reshape(-1, patches.shape[-1])
  check_operands(rows, w)
  # Window-major patches are cheaper to build than (C, kh, kw) ones, so where the patches are
  # large next to the weights, the weight rows are reordered to match; else the patches.
  if x.shape[-1] > 1 and rows.shape[0] <= CONV_REORDER_PATCHES_MAX_M * w.pos.shape[1]:
    rows = _c_major(patches, x.shape[-1]).reshape(rows.shape)
  elif x.shape[-1] > 1:
    w = pack_bitplanes(_window_major_trits(w, x.shape[-1]).reshape(w.length, -1), axis=0)
  if x_scale is not None and jnp.ndim(x_scale) > 0:
    x_scale = jnp.broadcast_to(jnp.reshape(x_scale, (-1,) + (1,) * (len(out_spatial) - 1)),
                               out_spatial).reshape(-1, 1)
  out = ternary_matmul(rows, w, x_scale=x_scale, implementation=implementation, **kwargs)
  return out.reshape(*out_spatial, -1)


def ternary_conv(x: jax.Array, w: Bitplanes, *, window: Sequence[int],
                 strides: Sequence[int] | None = None, padding="SAME", rhs_dilation=None,
                 x_ternary: bool = False, x_scale=None, w_scale=None, w_scale_neg=None,
                 implementation=None) -> jax.Array:
  """Convolution of NHWC ``x`` with a ternary kernel (exact integer sums, then the scales).

  ``w`` is ``pack_bitplanes(kernel_to_matrix(t), axis=0)``; ``x_scale`` is per example
  (broadcastable to ``(N, 1, ..., 1)``) or scalar. Implementations are tried as in
  :func:`ternary_matmul`: one registered with a ``conv`` runs it, falling back (on
  ``NotImplementedError``) to patches + its matmul, as do the others.
  """
  window = tuple(window)
  strides = tuple(strides or (1,) * len(window))
  rhs_dilation = tuple(rhs_dilation or (1,) * len(window))
  if not isinstance(w, Bitplanes) or w.axis != 0 or w.pos.ndim != 2:
    check_operands(x, w)  # its message
  if x.ndim != len(window) + 2 or w.length != x.shape[-1] * math.prod(window):
    raise ValueError(f"x must be (N, *spatial, C) with C·prod(window) = {w.length} "
                     f"({window=}), got {x.shape=}")
  if w_scale_neg is not None and w_scale is None:
    raise ValueError("w_scale_neg needs w_scale (the scale of the +1 weights)")
  kwargs = dict(window=window, strides=strides, padding=padding, rhs_dilation=rhs_dilation,
                x_ternary=x_ternary, x_scale=x_scale, w_scale=w_scale, w_scale_neg=w_scale_neg)
  errors = []
  for name in _candidates(implementation):
    try:
      if name in CONVOLUTIONS:
        try:
          return CONVOLUTIONS[name](x, w, **kwargs)
        except NotImplementedError as e:
          errors.append(f"{name} conv: {e}")
      return _patches_conv(x, w, implementation=name, **kwargs)
    except NotImplementedError as e:
      errors.append(f"{name}: {e}")
  raise NotImplementedError("no implementation handles this call: " + "; ".join(errors))


# GPU implementations register themselves on import (they need jax-triton / a GPU to run).
try:
  import ternjax.kernels  # noqa: E402,F401
except ImportError:  # pragma: no cover - the kernels package is part of every install
  pass
