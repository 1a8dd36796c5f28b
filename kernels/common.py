"""What the Pallas and jax-triton ternary matmul kernels share: tiling, operands, epilogue.

The kernels compute the same integers as :func:`ternjax.ops.xla_matmul`:

============  ===============================================  ================================
kernel        inner loop (per 32-trit word of K)               good for
============  ===============================================  ================================
popcount      ``popc(x₊&w₊ | x₋&w₋) − popc(x₊&w₋ | x₋&w₊)``    ternary activations, small M
              on bitplanes, CUDA cores
dot           weight planes unpacked to int8 (or to x's float  larger M (tensor cores), int8
              dtype), tensor-core dot                          or float activations
mma           (jax-triton only) 4 int8 / 2 bf16 trits per      Hopper, M up to a few hundred:
              32-bit op into wgmma's register operand,         W2A8 (int8 or ternary codes)
              transposed tiles (x rows on wgmma's N side)      and W2A16 (bf16)
============  ===============================================  ================================

Both accumulate in int32 (float32 for float activations) and leave the scales to
:func:`ternjax.ops.epilogue`. ``split_k > 1`` splits K over programs that add their partial sums
with integer atomics (exact in any order), which gives small-M shapes enough programs to keep
the memory busy. A :class:`Backend` holds one backend's two kernel launches and gives them the
checks and the wrapper they share; :class:`GpuTuning` is the one table of measured GPU choices
(which implementation, which tiles).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ternjax import ops, packing

KERNELS = ("popcount", "dot", "mma")
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

  kernel: str = "dot"    # 'popcount' | 'dot' | 'mma' (see the module docstring)
  block_m: int = 64      # rows of x per program (the dot and mma kernels need ≥ 16)
  block_n: int = 128     # columns of w per program
  block_k: int = 2       # 32-trit words of K per loop step
  split_k: int = 1       # programs along K, summed with atomic adds (integer outputs only)
  num_warps: int = 4
  num_stages: int = 3
  pack: bool = True      # mma: 4 int8 (2 16-bit) trits per 32-bit unpack operation
  atomic: bool = True    # jax-triton integer split-K: atomic adds into a zeroed output (a
                         # memset kernel), else one partial sum per K range added by XLA

  def __post_init__(self):
    if self.kernel not in KERNELS:
      raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel=}")
    for name in ("block_m", "block_n", "block_k", "split_k", "num_warps"):
      if not _is_pow2(getattr(self, name)):
        raise ValueError(f"{name} must be a power of 2, got {getattr(self, name)=}")
    if self.kernel != "popcount" and self.block_m < 16:
      raise ValueError(f"the {self.kernel} kernel needs block_m >= 16 (tensor cores), got "
                       f"{self.block_m=}")

  @classmethod
  def get_default(cls, m: int, n: int, k: int, *, x_ternary: bool, integer: bool = True,
                  mma: bool = False) -> BlockSizes:
    """The configuration :data:`GPU_TUNING` gives the shape (:meth:`GpuTuning.block_sizes`)."""
    return GPU_TUNING.block_sizes(m, n, k, x_ternary=x_ternary, integer=integer, mma=mma)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuTuning:
  """The GPU choices, measured on an H200 (experiments/results/sweep_gpu_kernels_h200.md;
  the Pallas tiles on an H100, bench_kernels.md).

  Implementation (the ``'gpu'`` policy, :meth:`choose`): ternary ``x`` up to
  ``xla_popcount_max_mkn = M·K·N`` runs XLA's fused popcount (the kernels' split-K reduction
  and launch cost more than the work); up to ``mma_max_m`` rows jax-triton's ``mma`` where
  jax-triton is installed (ternary ``x`` as int8 codes; not float32 ``x``), else below
  ``kernels_max_m`` rows Pallas; above, XLA's unpack + cuBLAS int8 dot (float ``x``: XLA's
  dot of unpacked weights). Tiles (:meth:`block_sizes`): ``mma`` with 16-row tiles and
  ``mma_small_split`` K splits up to ``mma_small_m`` rows (integer splits added atomically up
  to ``mma_atomic_max_m`` rows, as partial sums above), 64-row tiles up to ``mma_wide_m`` and
  128-row tiles above; without it the popcount kernel for ternary ``x``
  up to ``popcount_max_m`` rows, else the tensor-core dot, ``block_m = 16`` up to
  ``dot_small_m`` rows and wider tiles above ``dot_wide_m``; K is split while there are fewer
  than ``split_k_programs`` programs (about two per SM) and each split keeps
  ``split_k_min_steps`` loop steps.
  """

  xla_popcount_max_mkn: int = 2 ** 26
  kernels_max_m: int = 512
  popcount_max_m: int = 16
  dot_small_m: int = 16
  dot_wide_m: int = 256
  split_k_programs: int = 256
  split_k_min_steps: int = 4
  mma_max_m: int = 2048
  mma_small_m: int = 16
  mma_small_split: int = 4
  mma_atomic_max_m: int = 1
  mma_wide_m: int = 256

  def block_sizes(self, m: int, n: int, k: int, *, x_ternary: bool, integer: bool = True,
                  mma: bool = False) -> BlockSizes:
    """The fastest measured configuration for the shape; ``mma``: the backend has the mma
    kernel; ``integer=False`` (float activations) keeps ``split_k = 1`` outside it."""
    if mma:
      return self._mma_block_sizes(m, integer)
    kw = cdiv(k, WORD)
    if x_ternary and m <= self.popcount_max_m:
      kernel, block_m, block_n, block_k = "popcount", next_pow2(m), 128, 4
      num_warps = 8 if block_m >= 16 else 4
    elif m <= self.dot_wide_m:
      block_m = 16 if m <= self.dot_small_m else 64
      kernel, block_n, block_k, num_warps = "dot", 128, 2, 4
    else:
      kernel, block_m, block_n, block_k, num_warps = "dot", 128, 256, 2, 8
    programs = cdiv(m, block_m) * cdiv(n, block_n)
    split_k = 1
    while (integer and programs * split_k < self.split_k_programs
           and kw // (2 * split_k) >= self.split_k_min_steps * block_k):
      split_k *= 2
    return BlockSizes(kernel=kernel, block_m=block_m, block_n=block_n, block_k=block_k,
                      split_k=split_k, num_warps=num_warps)

  def _mma_block_sizes(self, m: int, integer: bool) -> BlockSizes:
    if m <= self.mma_small_m:  # int8: 16x64 tiles of 8 words; bf16: 16x128 of 4 words
      return BlockSizes(kernel="mma", block_m=16, block_n=64 if integer else 128,
                        block_k=8 if integer else 4, split_k=self.mma_small_split,
                        atomic=m <= self.mma_atomic_max_m)
    if m > self.mma_wide_m:
      return BlockSizes(kernel="mma", block_m=128, block_n=128, block_k=4, num_warps=8)
    if integer:  # 64x64 tiles measured best at M = 256 (more programs than 128-wide ones)
      return BlockSizes(kernel="mma", block_m=min(64, next_pow2(m)), block_n=64, block_k=4)
    return BlockSizes(kernel="mma", block_m=min(128, next_pow2(m)), block_n=128, block_k=4,
                      split_k=2, num_warps=8)

  def choose(self, x: jax.Array, w: packing.Bitplanes, *, x_ternary: bool):
    """``(implementation, x, x_ternary)`` for the shape: ternary codes go to the int8 dots
    as int8 codes."""
    m, k = x.shape
    if x_ternary and m * k * w.pos.shape[1] <= self.xla_popcount_max_mkn:
      return "xla", x, True
    codes = x.astype(jnp.int8) if x_ternary else x
    mma = "triton" in ops.IMPLEMENTATIONS and x.dtype != jnp.float32  # int8 and 16-bit
    if (m > self.mma_max_m) if mma else (m >= self.kernels_max_m):
      return "xla", codes, False
    if mma:
      return "triton", codes, False
    if "pallas" not in ops.IMPLEMENTATIONS:
      return "xla", codes, False
    return "pallas", x, x_ternary


GPU_TUNING = GpuTuning()


def as_int32(words: jax.Array) -> jax.Array:
  """uint32 bitplanes as int32 (the kernels' popcount and shifts are defined on int32)."""
  return lax.bitcast_convert_type(words, jnp.int32)


@dataclasses.dataclass(frozen=True)
class Backend:
  """One kernel backend: its launches and what they share (checks, operands, epilogue).

  ``popcount(xp, xn, wp, wn, *, two_sums, block_sizes, interpret)`` and ``dot(x, wp, wn, ...)``
  take int32 planes whose shapes agree and return a tuple of accumulators for
  :func:`ternjax.ops.epilogue`; ``mma(x, wp, wn, ...)``, where the backend has it, is the
  Hopper kernel of the same signature as ``dot``. ``interpret``: whether they run off a GPU
  with ``interpret=True``.
  """

  name: str
  popcount: Callable[..., tuple[jax.Array, ...]]
  dot: Callable[..., tuple[jax.Array, ...]]
  interpret: bool
  mma: Callable[..., tuple[jax.Array, ...]] | None = None

  def check_interpret(self, interpret: bool) -> None:
    if interpret and not self.interpret:
      raise NotImplementedError(f"{self.name} kernels have no interpret mode (use the Pallas "
                                "ones)")

  def popcount_matmul(self, xp, xn, wp, wn, *, two_sums=False, block_sizes: BlockSizes,
                      interpret=False):
    """Bitplane GEMM: int32 planes ``xp, xn: (M, Kw)`` and ``wp, wn: (Kw, N)`` -> int32 sums."""
    self.check_interpret(interpret)
    if xp.shape[1] != wp.shape[0]:
      raise ValueError(f"x and w planes disagree on K words: {xp.shape=} {wp.shape=}")
    return self.popcount(xp, xn, wp, wn, two_sums=two_sums, block_sizes=block_sizes,
                         interpret=interpret)

  def dot_matmul(self, x, wp, wn, *, two_sums=False, block_sizes: BlockSizes, interpret=False):
    """``x: (M, K)`` (int8 or float) times the int32 planes ``wp, wn: (⌈K/32⌉, N)``."""
    self.check_interpret(interpret)
    if cdiv(x.shape[1], WORD) != wp.shape[0]:
      raise ValueError(f"x and w planes disagree on K: {x.shape=} {wp.shape=}")
    return self.dot(x, wp, wn, two_sums=two_sums, block_sizes=block_sizes, interpret=interpret)

  def ternary_matmul(self, x: jax.Array, w: packing.Bitplanes, *, x_ternary: bool = False,
                     x_scale=None, w_scale=None, w_scale_neg=None,
                     block_sizes: BlockSizes | None = None, interpret: bool = False):
    """:func:`ternjax.ops.ternary_matmul` with this backend's kernels (operands checked)."""
    ops.check_operands(x, w)
    return self.matmul(x, w, x_ternary=x_ternary, x_scale=x_scale, w_scale=w_scale,
                       w_scale_neg=w_scale_neg, block_sizes=block_sizes, interpret=interpret)

  def matmul(self, x, w, *, x_ternary=False, x_scale=None, w_scale=None, w_scale_neg=None,
             block_sizes: BlockSizes | None = None, interpret: bool = False):
    """:meth:`ternary_matmul` on checked operands (what the dispatch calls), jitted: eager
    calls compile once per shape. Raises ``NotImplementedError`` for activations the kernels
    do not take (integers other than int8 codes, float types other than f32/bf16/f16)."""
    return _matmul(self, x, w, x_ternary=x_ternary, x_scale=x_scale, w_scale=w_scale,
                   w_scale_neg=w_scale_neg, block_sizes=block_sizes, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("backend", "x_ternary", "block_sizes", "interpret"))
def _matmul(backend: Backend, x, w, *, x_ternary, x_scale, w_scale, w_scale_neg, block_sizes,
            interpret):
  backend.check_interpret(interpret)
  m, k = x.shape
  n = w.pos.shape[1]
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  if integer and not x_ternary and x.dtype != jnp.int8:
    raise NotImplementedError(f"integer activations must be int8 codes, got {x.dtype=}")
  if not integer and x.dtype not in FLOAT_DTYPES:
    raise NotImplementedError(f"float activations must be f32, bf16 or f16, got {x.dtype=}")
  bs = block_sizes or GPU_TUNING.block_sizes(m, n, k, x_ternary=x_ternary, integer=integer,
                                             mma=backend.mma is not None)
  if bs.kernel == "popcount" and not x_ternary:
    raise ValueError(f"the popcount kernel needs ternary activations (x_ternary=True), {bs=}")
  if bs.split_k > 1 and not integer and bs.kernel != "mma":
    raise ValueError(f"split_k > 1 needs integer activations (float atomics reorder), {bs=}")
  if bs.kernel == "mma" and backend.mma is None:
    raise NotImplementedError(f"the {backend.name} backend has no mma kernel")
  wp, wn = as_int32(w.pos), as_int32(w.neg)
  kwargs = dict(two_sums=w_scale_neg is not None, block_sizes=bs, interpret=interpret)
  if bs.kernel == "popcount":
    xb = packing.pack_bitplanes(x, axis=1)
    accs = backend.popcount(as_int32(xb.pos), as_int32(xb.neg), wp, wn, **kwargs)
  else:
    launch = backend.mma if bs.kernel == "mma" else backend.dot
    accs = launch(x.astype(jnp.int8) if integer else x, wp, wn, **kwargs)
  return ops.epilogue(*accs, x_scale=x_scale, w_scale=w_scale, w_scale_neg=w_scale_neg)
