"""What the Pallas and jax-triton ternary matmul kernels share: tiling, operands, epilogue.

Two kernels compute the same integers as :func:`ternjax.ops.xla_matmul`:

============  ===============================================  ================================
kernel        inner loop (per 32-trit word of K)               good for
============  ===============================================  ================================
popcount      ``popc(x₊&w₊ | x₋&w₋) − popc(x₊&w₋ | x₋&w₊)``    ternary activations, small M
              on bitplanes, CUDA cores
dot           weight planes unpacked to int8 (or to x's float  larger M (tensor cores), int8
              dtype), tensor-core dot                          or float activations
============  ===============================================  ================================

Both accumulate in int32 (float32 for float activations) and leave the scales to
:func:`ternjax.ops.epilogue`. ``split_k > 1`` splits K over programs that add their partial sums
with integer atomics (exact in any order), which gives small-M shapes enough programs to keep
the memory busy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ternjax import ops, packing

KERNELS = ("popcount", "dot")
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
WORD = packing.WORD_BITS


def _is_pow2(v: int) -> bool:
  return v > 0 and v & (v - 1) == 0


def next_pow2(v: int) -> int:
  return 1 << max(v - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Which kernel runs and how it tiles ``(M, K) × (K, N)``; hashable, so a static argument."""

  kernel: str = "dot"    # 'popcount' | 'dot' (see the module docstring)
  block_m: int = 64      # rows of x per program (the dot kernel needs ≥ 16)
  block_n: int = 128     # columns of w per program
  block_k: int = 2       # 32-trit words of K per loop step
  split_k: int = 1       # programs along K, summed with atomic adds (integer outputs only)
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    if self.kernel not in KERNELS:
      raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel=}")
    for name in ("block_m", "block_n", "block_k", "split_k", "num_warps"):
      if not _is_pow2(getattr(self, name)):
        raise ValueError(f"{name} must be a power of 2, got {getattr(self, name)=}")
    if self.kernel == "dot" and self.block_m < 16:
      raise ValueError(f"the dot kernel needs block_m >= 16 (tensor cores), got {self.block_m=}")

  @classmethod
  def get_default(cls, m: int, n: int, k: int, *, x_ternary: bool,
                  integer: bool = True) -> BlockSizes:
    """The fastest measured configuration for the shape (experiments/results/bench_kernels.md).

    ``integer=False`` (float activations) keeps ``split_k = 1``.
    """
    # Measured on an H100 (bench_kernels.md): popcount wins for ternary M <= 16; above, the
    # tensor-core dot, with wider tiles at large M.
    kw = cdiv(k, WORD)
    if x_ternary and m <= 16:
      kernel, block_m, block_n, block_k = "popcount", next_pow2(m), 128, 4
      num_warps = 8 if block_m >= 16 else 4
    elif m <= 256:
      kernel, block_m, block_n, block_k, num_warps = "dot", 16 if m <= 16 else 64, 128, 2, 4
    else:
      kernel, block_m, block_n, block_k, num_warps = "dot", 128, 256, 2, 8
    # About two programs per SM (132): split K while each split keeps ≥ 4 loop steps.
    programs = cdiv(m, block_m) * cdiv(n, block_n)
    split_k = 1
    while integer and programs * split_k < 256 and kw // (2 * split_k) >= 4 * block_k:
      split_k *= 2
    return cls(kernel=kernel, block_m=block_m, block_n=block_n, block_k=block_k,
               split_k=split_k, num_warps=num_warps)


def as_int32(words: jax.Array) -> jax.Array:
  """uint32 bitplanes as int32 (the kernels' popcount and shifts are defined on int32)."""
  return lax.bitcast_convert_type(words, jnp.int32)


def ternary_matmul(popcount_matmul: Callable, dot_matmul: Callable, x: jax.Array,
                   w: packing.Bitplanes, *, x_ternary: bool = False, x_scale=None, w_scale=None,
                   w_scale_neg=None, block_sizes: BlockSizes | None = None,
                   interpret: bool = False) -> jax.Array:
  """:func:`ternjax.ops.ternary_matmul` through one backend's two kernels.

  ``popcount_matmul(xp, xn, wp, wn)`` and ``dot_matmul(x, wp, wn)`` (int32 planes; keywords
  ``two_sums``, ``block_sizes``, ``interpret``) return a tuple of accumulators for
  :func:`ternjax.ops.epilogue`. Raises ``NotImplementedError`` for activations they do not
  take (integers other than int8 codes, float types other than f32/bf16/f16).
  """
  ops.check_operands(x, w)
  m, k = x.shape
  n = w.pos.shape[1]
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  if integer and not x_ternary and x.dtype != jnp.int8:
    raise NotImplementedError(f"integer activations must be int8 codes, got {x.dtype=}")
  if not integer and x.dtype not in FLOAT_DTYPES:
    raise NotImplementedError(f"float activations must be f32, bf16 or f16, got {x.dtype=}")
  bs = block_sizes or BlockSizes.get_default(m, n, k, x_ternary=x_ternary, integer=integer)
  if bs.kernel == "popcount" and not x_ternary:
    raise ValueError(f"the popcount kernel needs ternary activations (x_ternary=True), {bs=}")
  if bs.split_k > 1 and not integer:
    raise ValueError(f"split_k > 1 needs integer activations (float atomics reorder), {bs=}")
  wp, wn = as_int32(w.pos), as_int32(w.neg)
  kwargs = dict(two_sums=w_scale_neg is not None, block_sizes=bs, interpret=interpret)
  if bs.kernel == "popcount":
    xb = packing.pack_bitplanes(x, axis=1)
    accs = popcount_matmul(as_int32(xb.pos), as_int32(xb.neg), wp, wn, **kwargs)
  else:
    accs = dot_matmul(x.astype(jnp.int8) if integer else x, wp, wn, **kwargs)
  return ops.epilogue(*accs, x_scale=x_scale, w_scale=w_scale, w_scale_neg=w_scale_neg)
