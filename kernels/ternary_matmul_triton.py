"""Ternary matmul as raw Triton kernels called through ``jax_triton.triton_call`` (GPU only).

The kernels of :mod:`ternjax.kernels.common`, written against Triton directly: masked loads
handle every shape without padding copies, and popcount is libdevice's ``popc``. Outputs are
one int32/float32 array of shape ``(1 or 2, M, N)`` (two accumulators for asymmetric scales),
zeroed by jax-triton when ``split_k > 1`` adds partial sums atomically; with
``BlockSizes.atomic=False`` (and always for float ``mma`` sums, so that they do not depend on
atomic order) each K range writes its own partial sums, added by XLA.
Pointer offsets are int32: operands up to 2³¹ elements.

``mma`` is the Hopper kernel: the 2-bit weight planes are expanded in registers, four int8
(two bf16/f16) trits per 32-bit shift-and-mask, straight into the register operand of wgmma;
the shapes are compile-time constants, so the loads are vectorized and software-pipelined.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax_triton
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ternjax.kernels import common
from ternjax.kernels.common import WORD, BlockSizes
from ternjax.ops.xla import pad_to


@triton.jit
def _store(ptr, acc, mask, ATOMIC: tl.constexpr):
  if ATOMIC:
    tl.atomic_add(ptr, acc, mask=mask, sem="relaxed")
  else:
    tl.store(ptr, acc, mask=mask)


@triton.jit
def _split_out(out_ptr, m, n, TWO_SUMS: tl.constexpr, ATOMIC: tl.constexpr):
  """Where this program's sums go: the output, or without ``ATOMIC`` its K range's partial."""
  if ATOMIC:
    return out_ptr
  return out_ptr + tl.program_id(2) * (2 if TWO_SUMS else 1) * m * n


@triton.jit
def _popcount_kernel(xp_ptr, xn_ptr, wp_ptr, wn_ptr, m, n, kw, split_words, out_ptr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     TWO_SUMS: tl.constexpr, ATOMIC: tl.constexpr):
  rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
  cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
  k_lo = tl.program_id(2) * split_words
  k_hi = tl.minimum(k_lo + split_words, kw)
  row_ok, col_ok = rows < m, cols < n
  acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
  acc_neg = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
  for k0 in range(k_lo, k_hi, BLOCK_K):
    for kk in tl.static_range(BLOCK_K):
      k = k0 + kk
      x_ok, w_ok = row_ok & (k < k_hi), col_ok & (k < k_hi)
      xp = tl.load(xp_ptr + rows * kw + k, mask=x_ok, other=0)[:, None]
      xn = tl.load(xn_ptr + rows * kw + k, mask=x_ok, other=0)[:, None]
      wp = tl.load(wp_ptr + k * n + cols, mask=w_ok, other=0)[None, :]
      wn = tl.load(wn_ptr + k * n + cols, mask=w_ok, other=0)[None, :]
      if TWO_SUMS:
        acc += libdevice.popc(xp & wp) - libdevice.popc(xn & wp)
        acc_neg += libdevice.popc(xp & wn) - libdevice.popc(xn & wn)
      else:
        acc += libdevice.popc((xp & wp) | (xn & wn)) - libdevice.popc((xp & wn) | (xn & wp))
  out_ptr = _split_out(out_ptr, m, n, TWO_SUMS, ATOMIC)
  offsets = rows[:, None] * n + cols[None, :]
  mask = row_ok[:, None] & col_ok[None, :]
  _store(out_ptr + offsets, acc, mask, ATOMIC)
  if TWO_SUMS:
    _store(out_ptr + m * n + offsets, acc_neg, mask, ATOMIC)


@triton.jit
def _dot_kernel(x_ptr, wp_ptr, wn_ptr, m, n, k, kw, split_words, out_ptr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                TWO_SUMS: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr):
  rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
  cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
  k_lo = tl.program_id(2) * split_words
  k_hi = tl.minimum(k_lo + split_words, kw)
  row_ok, col_ok = rows < m, cols < n
  bits = tl.arange(0, 32)
  acc_type = tl.int32 if x_ptr.dtype.element_ty.is_int() else tl.float32
  acc = tl.zeros((BLOCK_M, BLOCK_N), acc_type)
  acc_neg = tl.zeros((BLOCK_M, BLOCK_N), acc_type)
  for k0 in range(k_lo, k_hi, BLOCK_K):
    words = k0 + tl.arange(0, BLOCK_K)
    w_off = words[:, None] * n + cols[None, :]
    w_ok = (words < k_hi)[:, None] & col_ok[None, :]
    wp = tl.load(wp_ptr + w_off, mask=w_ok, other=0)
    wn = tl.load(wn_ptr + w_off, mask=w_ok, other=0)
    # trit 32·word + b is bit b of the word: (BLOCK_K, 32, BLOCK_N) -> (BLOCK_K·32, BLOCK_N)
    tp = tl.reshape((wp[:, None, :] >> bits[None, :, None]) & 1, (BLOCK_K * 32, BLOCK_N))
    tn = tl.reshape((wn[:, None, :] >> bits[None, :, None]) & 1, (BLOCK_K * 32, BLOCK_N))
    trits = k0 * 32 + tl.arange(0, BLOCK_K * 32)
    x_ok = row_ok[:, None] & (trits < tl.minimum(k_hi * 32, k))[None, :]
    x = tl.load(x_ptr + rows[:, None] * k + trits[None, :], mask=x_ok, other=0)
    if TWO_SUMS:
      acc = tl.dot(x, tp.to(x.dtype), acc, input_precision=PRECISION, out_dtype=acc_type)
      acc_neg = tl.dot(x, tn.to(x.dtype), acc_neg, input_precision=PRECISION, out_dtype=acc_type)
    else:
      acc = tl.dot(x, (tp - tn).to(x.dtype), acc, input_precision=PRECISION, out_dtype=acc_type)
  out_ptr = _split_out(out_ptr, m, n, TWO_SUMS, ATOMIC)
  offsets = rows[:, None] * n + cols[None, :]
  mask = row_ok[:, None] & col_ok[None, :]
  _store(out_ptr + offsets, acc, mask, ATOMIC)
  if TWO_SUMS:
    _store(out_ptr + m * n + offsets, acc_neg, mask, ATOMIC)


@triton.jit
def _trits(wp, wn, x, PACK: tl.constexpr, HAS_NEG: tl.constexpr):
  """``(BN, BK)`` weight words -> ``(BN, BK·32)`` trits in ``x``'s dtype (``[t = +1]`` without
  ``HAS_NEG``).

  ``PACK = 0``: one trit per shift, trit ``32·w + b`` at column ``32·w + b``. ``PACK = 4``
  (int8) or 2 (16-bit floats): one shift and mask give ``PACK`` trits at once, lane ``r`` of
  word ``w`` holding trits ``32/PACK·i + r`` (``i < PACK``) as the ``PACK`` values of a 32-bit
  register, at columns ``32·w + PACK·r + i``: x comes in that order (:func:`permute_x`).
  """
  if PACK == 0:
    bits = tl.arange(0, 32)[None, None, :]
    t = (wp[:, :, None] >> bits) & 1
    if HAS_NEG:
      t = t - ((wn[:, :, None] >> bits) & 1)
    t = t.to(x.dtype)
  elif PACK == 4:  # int8 bytes: +1 = 0x01, -1 = 0xFF
    r = tl.arange(0, 8)[None, None, :]
    c = (wp[:, :, None] >> r) & 0x01010101
    if HAS_NEG:
      c = c | ((wn[:, :, None] >> r) & 0x01010101) * 0xFF
    c = tl.join(tl.join(c, c), tl.join(c, c))
    t = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r,r,r", [c], dtype=x.dtype,
                                  is_pure=True, pack=4)
  else:  # 16-bit float halves: the bit patterns of +1 and -1
    r = tl.arange(0, 16)[None, None, :]
    if x.dtype == tl.bfloat16:
      c = ((wp[:, :, None] >> r) & 0x00010001) * 0x3F80
      if HAS_NEG:
        c = c | ((wn[:, :, None] >> r) & 0x00010001) * 0xBF80
    else:
      c = ((wp[:, :, None] >> r) & 0x00010001) * 0x3C00
      if HAS_NEG:
        c = c | ((wn[:, :, None] >> r) & 0x00010001) * 0xBC00
    c = tl.join(c, c)
    t = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [c], dtype=x.dtype,
                                  is_pure=True, pack=2)
  return tl.reshape(t, (wp.shape[0], wp.shape[1] * 32))


@triton.jit
def _mma_kernel(x_ptr, wp_ptr, wn_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr,
                K: tl.constexpr, KW: tl.constexpr, SPLIT_WORDS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                TWO_SUMS: tl.constexpr, ATOMIC: tl.constexpr, PACK: tl.constexpr,
                PRECISION: tl.constexpr):
  """Transposed tiles, ``out^T (BN, BM) += t^T (BN, BK·32) · x^T (BK·32, BM)``: the unpacked
  weights are wgmma's register operand (no shared-memory round trip) and x rows its N side,
  which may be as small as 16."""
  rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
  cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
  k_lo = tl.program_id(2) * SPLIT_WORDS
  k_hi = tl.minimum(k_lo + SPLIT_WORDS, KW)
  row_ok, col_ok = rows < M, cols < N
  acc_type = tl.int32 if x_ptr.dtype.element_ty.is_int() else tl.float32
  acc = tl.zeros((BLOCK_N, BLOCK_M), acc_type)
  acc_neg = tl.zeros_like(acc)
  for k0 in range(k_lo, k_hi, BLOCK_K):
    words = k0 + tl.arange(0, BLOCK_K)
    w_off = words[None, :] * N + cols[:, None]
    w_ok = col_ok[:, None] & (words < k_hi)[None, :]
    wp = tl.load(wp_ptr + w_off, mask=w_ok, other=0)
    wn = tl.load(wn_ptr + w_off, mask=w_ok, other=0)
    trits = k0 * 32 + tl.arange(0, BLOCK_K * 32)
    t_ok = trits < tl.minimum(k_hi * 32, K)
    x = tl.load(x_ptr + rows[None, :] * K + trits[:, None],
                mask=t_ok[:, None] & row_ok[None, :], other=0)
    if TWO_SUMS:
      acc = tl.dot(_trits(wp, wn, x, PACK, False), x, acc, input_precision=PRECISION,
                   out_dtype=acc_type)
      acc_neg = tl.dot(_trits(wn, wp, x, PACK, False), x, acc_neg, input_precision=PRECISION,
                       out_dtype=acc_type)
    else:
      acc = tl.dot(_trits(wp, wn, x, PACK, True), x, acc, input_precision=PRECISION,
                   out_dtype=acc_type)
  out_ptr = _split_out(out_ptr, M, N, TWO_SUMS, ATOMIC)
  offsets = rows[None, :] * N + cols[:, None]
  mask = row_ok[None, :] & col_ok[:, None]
  _store(out_ptr + offsets, acc, mask, ATOMIC)
  if TWO_SUMS:
    _store(out_ptr + M * N + offsets, acc_neg, mask, ATOMIC)


def _launch(kernel, arrays, sizes: dict, *, m, n, kw, acc_dtype, two_sums, bs: BlockSizes,
            partials=False, static=False, **meta):
  """Launches over ``(M/bm, N/bn, split_k)``: split sums are added atomically into a zeroed
  output (jax-triton zeroes it with a memset kernel), or with ``partials`` (float sums, whose
  atomic order would vary, and integer ones with ``BlockSizes.atomic=False``) written one per
  K range and added by XLA, which fuses the sum into the epilogue. ``sizes`` (and the words
  per split) are scalar arguments, or with ``static`` upper-case constants (one compile per
  shape; the compiler then knows the row strides' alignment and vectorizes and pipelines the
  loads)."""
  if max(m, n) * kw * WORD >= 2**31:
    raise NotImplementedError(f"operands over 2**31 elements (int32 offsets): {m=} {n=} {kw=}")
  split_words = common.cdiv(common.cdiv(kw, bs.split_k), bs.block_k) * bs.block_k
  splits = common.cdiv(kw, split_words)
  atomic = bs.split_k > 1 and not partials
  sizes = dict(sizes, split_words=split_words)
  if static:
    meta.update({name.upper(): v for name, v in sizes.items()})
  else:
    arrays = (*arrays, *sizes.values())
  out = jax_triton.triton_call(
      *arrays, kernel=kernel,
      out_shape=jax.ShapeDtypeStruct((splits if partials else 1, 2 if two_sums else 1, m, n),
                                     acc_dtype),
      grid=(common.cdiv(m, bs.block_m), common.cdiv(n, bs.block_n), splits),
      zeroed_outputs=(0,) if atomic else (), num_warps=bs.num_warps,
      num_stages=bs.num_stages, BLOCK_M=bs.block_m, BLOCK_N=bs.block_n, BLOCK_K=bs.block_k,
      TWO_SUMS=two_sums, ATOMIC=atomic, **meta)
  return tuple(jnp.sum(out, axis=0) if splits > 1 and partials else out[0])


def _popcount(xp, xn, wp, wn, *, two_sums, block_sizes: BlockSizes, interpret):
  del interpret  # Backend refuses it
  (m, kw), n = xp.shape, wp.shape[1]
  return _launch(_popcount_kernel, (xp, xn, wp, wn), dict(m=m, n=n, kw=kw), m=m, n=n, kw=kw,
                 acc_dtype=jnp.int32, two_sums=two_sums, bs=block_sizes,
                 partials=not block_sizes.atomic)


def _dot(x, wp, wn, *, two_sums, block_sizes: BlockSizes, interpret):
  del interpret  # Backend refuses it
  (m, k), (kw, n) = x.shape, wp.shape
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  return _launch(_dot_kernel, (x, wp, wn), dict(m=m, n=n, k=k, kw=kw), m=m, n=n, kw=kw,
                 acc_dtype=jnp.int32 if integer else jnp.float32, two_sums=two_sums,
                 bs=block_sizes, partials=not block_sizes.atomic,
                 PRECISION="ieee" if x.dtype == jnp.float32 else None)


def permute_x(x, kw: int, pack: int):
  """``x`` zero-padded to ``32·kw`` columns, each word's 32 in the order of :func:`_trits`'
  ``pack`` trits per lane: column ``32·w + pack·r + i`` holds trit ``32·w + 32/pack·i + r``.
  (One XLA transpose: measured faster than permuting in the kernel's registers or loading x
  in this order, runs 2 and 3 of experiments/results/sweep_gpu_kernels_h200.md.)"""
  m = x.shape[0]
  x = pad_to(x, (m, kw * WORD)).reshape(m, kw, pack, WORD // pack)
  return jnp.swapaxes(x, 2, 3).reshape(m, kw * WORD)


def _mma(x, wp, wn, *, two_sums, block_sizes: BlockSizes, interpret):
  del interpret  # Backend refuses it
  (m, k), (kw, n) = x.shape, wp.shape
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  pack = (4 if integer else 2 if x.dtype.itemsize == 2 else 0) if block_sizes.pack else 0
  if pack:
    x, k = permute_x(x, kw, pack), kw * WORD
  return _launch(_mma_kernel, (x, wp, wn), dict(m=m, n=n, k=k, kw=kw), m=m, n=n, kw=kw,
                 acc_dtype=jnp.int32 if integer else jnp.float32, two_sums=two_sums,
                 bs=block_sizes, partials=not (integer and block_sizes.atomic), static=True,
                 PACK=pack,
                 PRECISION="ieee" if x.dtype == jnp.float32 else None)


BACKEND = common.Backend("triton", _popcount, _dot, interpret=False, mma=_mma)
popcount_matmul = BACKEND.popcount_matmul
dot_matmul = BACKEND.dot_matmul
ternary_matmul = BACKEND.ternary_matmul
