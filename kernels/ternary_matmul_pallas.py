"""Ternary matmul as Pallas kernels (Triton lowering on NVIDIA GPUs, ``interpret=True`` on CPU).

The two kernels of :mod:`ternjax.kernels.common`: ``popcount`` on bitplanes and ``dot`` on
weights unpacked in the kernel. Operands are zero-padded to whole blocks (zero trits add
nothing), so every shape is exact; aligned shapes are passed as they are. With ``split_k > 1``
each K range writes its own partial sums, added by XLA (atomic adds into an aliased zero
output gave wrong sums on the H100 with jax 0.11.2). Popcount is
``lax.population_count`` on int32, which the Triton lowering maps to ``__nv_popc`` (on uint32
it emits ``math.ctpop``, which Triton cannot legalize).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ternjax.kernels import common
from ternjax.kernels.common import WORD, BlockSizes
from ternjax.ops.xla import pad_to


def _popcount_kernel(xp_ref, xn_ref, wp_ref, wn_ref, *out_refs, two_sums, block_k):
  pc = lax.population_count

  def step(i, accs):
    for kk in range(block_k):
      word = pl.ds(i * block_k + kk, 1)
      xp, xn = xp_ref[:, word], xn_ref[:, word]  # (bm, 1)
      wp, wn = wp_ref[word, :], wn_ref[word, :]  # (1, bn)
      if two_sums:
        accs = (accs[0] + pc(xp & wp) - pc(xn & wp), accs[1] + pc(xp & wn) - pc(xn & wn))
      else:
        accs = (accs[0] + pc((xp & wp) | (xn & wn)) - pc((xp & wn) | (xn & wp)),)
    return accs

  zeros = jnp.zeros((xp_ref.shape[0], wp_ref.shape[1]), jnp.int32)
  accs = lax.fori_loop(0, wp_ref.shape[0] // block_k, step, (zeros,) * len(out_refs))
  for ref, acc in zip(out_refs, accs):
    ref[...] = acc


def _dot_kernel(x_ref, wp_ref, wn_ref, *out_refs, two_sums, block_k, acc_dtype, precision):
  bits = lax.broadcasted_iota(jnp.int32, (1, WORD, 1), 1)

  def unpack(words):  # (block_k, bn) words -> (block_k·32, bn) bits, trit 32·i + b = bit b
    return ((words[:, None, :] >> bits) & 1).reshape(block_k * WORD, words.shape[1])

  def step(i, accs):
    x = x_ref[:, pl.ds(i * block_k * WORD, block_k * WORD)]
    rows = pl.ds(i * block_k, block_k)
    tp, tn = unpack(wp_ref[rows, :]), unpack(wn_ref[rows, :])
    dot = lambda t: jnp.dot(x, t.astype(x.dtype), precision=precision,
                            preferred_element_type=acc_dtype)
    if two_sums:
      return accs[0] + dot(tp), accs[1] + dot(tn)
    return (accs[0] + dot(tp - tn),)

  zeros = jnp.zeros((x_ref.shape[0], wp_ref.shape[1]), acc_dtype)
  accs = lax.fori_loop(0, wp_ref.shape[0] // block_k, step, (zeros,) * len(out_refs))
  for ref, acc in zip(out_refs, accs):
    ref[...] = acc


def _call(kernel, name, x_ops, w_ops, *, m, n, x_block_k, acc_dtype, two_sums, bs: BlockSizes,
          interpret):
  """Pads, builds the ``pallas_call`` over ``(M/bm, N/bn, split_k)`` and crops the outputs."""
  kw = w_ops[0].shape[0]
  kw_pad = common.cdiv(kw, bs.split_k * bs.block_k) * bs.split_k * bs.block_k
  mp, np_ = common.cdiv(m, bs.block_m) * bs.block_m, common.cdiv(n, bs.block_n) * bs.block_n
  x_ops = [pad_to(a, (mp, kw_pad * x_block_k)) for a in x_ops]
  w_ops = [pad_to(a, (kw_pad, np_)) for a in w_ops]
  kws = kw_pad // bs.split_k
  n_out = 2 if two_sums else 1
  in_specs = ([pl.BlockSpec((bs.block_m, kws * x_block_k), lambda i, j, s: (i, s))] * len(x_ops)
              + [pl.BlockSpec((kws, bs.block_n), lambda i, j, s: (s, j))] * len(w_ops))
  outs = pl.pallas_call(
      functools.partial(kernel, two_sums=two_sums, block_k=bs.block_k),
      out_shape=[jax.ShapeDtypeStruct((bs.split_k, mp, np_), acc_dtype)] * n_out,
      grid=(mp // bs.block_m, np_ // bs.block_n, bs.split_k), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bs.block_m, bs.block_n), lambda i, j, s: (s, i, j))] * n_out,
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret, name=name)(*x_ops, *w_ops)
  return tuple(jnp.sum(o, axis=0)[:m, :n] for o in outs)


def _popcount(xp, xn, wp, wn, *, two_sums, block_sizes: BlockSizes, interpret):
  return _call(_popcount_kernel, "ternary_popcount", [xp, xn], [wp, wn], m=xp.shape[0],
               n=wp.shape[1], x_block_k=1, acc_dtype=jnp.int32, two_sums=two_sums,
               bs=block_sizes, interpret=interpret)


def _dot(x, wp, wn, *, two_sums, block_sizes: BlockSizes, interpret):
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  kernel = functools.partial(
      _dot_kernel, acc_dtype=jnp.int32 if integer else jnp.float32,
      precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
  return _call(kernel, "ternary_dot", [x], [wp, wn], m=x.shape[0], n=wp.shape[1],
               x_block_k=WORD, acc_dtype=jnp.int32 if integer else jnp.float32,
               two_sums=two_sums, bs=block_sizes, interpret=interpret)


BACKEND = common.Backend("pallas", _popcount, _dot, interpret=True)
popcount_matmul = BACKEND.popcount_matmul
dot_matmul = BACKEND.dot_matmul
ternary_matmul = BACKEND.ternary_matmul
