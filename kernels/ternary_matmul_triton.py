"""Ternary matmul as raw Triton kernels called through ``jax_triton.triton_call`` (GPU only).

The two kernels of :mod:`ternjax.kernels.common`, written against Triton directly: masked
loads handle every shape without padding copies, and popcount is libdevice's ``popc``.
Outputs are one int32/float32 array of shape ``(1 or 2, M, N)`` (two accumulators for
asymmetric scales), zeroed by jax-triton when ``split_k > 1`` adds partial sums atomically.
Pointer offsets are int32: operands up to 2³¹ elements.
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


@triton.jit
def _store(ptr, acc, mask, ATOMIC: tl.constexpr):
  if ATOMIC:
    tl.atomic_add(ptr, acc, mask=mask, sem="relaxed")
  else:
    tl.store(ptr, acc, mask=mask)


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
  offsets = rows[:, None] * n + cols[None, :]
  mask = row_ok[:, None] & col_ok[None, :]
  _store(out_ptr + offsets, acc, mask, ATOMIC)
  if TWO_SUMS:
    _store(out_ptr + m * n + offsets, acc_neg, mask, ATOMIC)


def _launch(kernel, args, *, m, n, kw, acc_dtype, two_sums, bs: BlockSizes, **meta):
  if max(m, n) * kw * WORD >= 2**31:
    raise NotImplementedError(f"operands over 2**31 elements (int32 offsets): {m=} {n=} {kw=}")
  split_words = common.cdiv(common.cdiv(kw, bs.split_k), bs.block_k) * bs.block_k
  out = jax_triton.triton_call(
      *args, split_words, kernel=kernel,
      out_shape=jax.ShapeDtypeStruct((2 if two_sums else 1, m, n), acc_dtype),
      grid=(common.cdiv(m, bs.block_m), common.cdiv(n, bs.block_n), common.cdiv(kw, split_words)),
      zeroed_outputs=(0,) if bs.split_k > 1 else (), num_warps=bs.num_warps,
      num_stages=bs.num_stages, BLOCK_M=bs.block_m, BLOCK_N=bs.block_n, BLOCK_K=bs.block_k,
      TWO_SUMS=two_sums, ATOMIC=bs.split_k > 1, **meta)
  return tuple(out)


def _popcount(xp, xn, wp, wn, *, two_sums, block_sizes: BlockSizes, interpret):
  del interpret  # Backend refuses it
  (m, kw), n = xp.shape, wp.shape[1]
  return _launch(_popcount_kernel, (xp, xn, wp, wn, m, n, kw), m=m, n=n, kw=kw,
                 acc_dtype=jnp.int32, two_sums=two_sums, bs=block_sizes)


def _dot(x, wp, wn, *, two_sums, block_sizes: BlockSizes, interpret):
  del interpret  # Backend refuses it
  (m, k), (kw, n) = x.shape, wp.shape
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  return _launch(_dot_kernel, (x, wp, wn, m, n, k, kw), m=m, n=n, kw=kw,
                 acc_dtype=jnp.int32 if integer else jnp.float32, two_sums=two_sums,
                 bs=block_sizes, PRECISION="ieee" if x.dtype == jnp.float32 else None)


BACKEND = common.Backend("triton", _popcount, _dot, interpret=False)
popcount_matmul = BACKEND.popcount_matmul
dot_matmul = BACKEND.dot_matmul
ternary_matmul = BACKEND.ternary_matmul
