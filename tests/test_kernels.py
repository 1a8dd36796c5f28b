"""GPU kernels equal the XLA reference: Pallas in interpret mode on CPU, jax-triton on a GPU."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ternjax import kernels, ops, packing
from ternjax.kernels import BlockSizes, ternary_matmul_pallas
from ternjax.ops import arg_specs

ON_GPU = jax.default_backend() == "gpu"
SHAPES = arg_specs.KERNEL  # small: interpret mode is slow
CONFIGS = [  # grids of more than one program along M, N and K (split_k)
    BlockSizes(kernel="popcount", block_m=2, block_n=16, block_k=1, split_k=2),
    BlockSizes(kernel="dot", block_m=16, block_n=16, block_k=1, split_k=2),
    BlockSizes(kernel="dot", block_m=16, block_n=32, block_k=2),
]
# The Hopper mma kernel (jax-triton only): K split over programs, float split-K partial sums,
# one int8 plane per shift (pack=False), 64-row tiles, integer partial sums instead of atomic
# adds.
MMA_CONFIGS = [
    BlockSizes(kernel="mma", block_m=16, block_n=64, block_k=1, split_k=2),
    BlockSizes(kernel="mma", block_m=16, block_n=64, block_k=2, pack=False),
    BlockSizes(kernel="mma", block_m=64, block_n=64, block_k=4),
    BlockSizes(kernel="mma", block_m=16, block_n=64, block_k=2, split_k=2, atomic=False),
]


def _operands(m, k, n, seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(-1, 2, (m, k)), jnp.int8)
  t = jnp.asarray(rng.integers(-1, 2, (k, n)), jnp.int8)
  x8 = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
  scales = jnp.asarray(rng.random((2, n)), jnp.float32)
  return x, packing.pack_bitplanes(t, axis=0), x8, scales


def _check(matmul, m, k, n, bs, seed):
  x, w, x8, (ws, wsn) = _operands(m, k, n, seed)
  out = matmul(x, w, x_ternary=True, block_sizes=bs)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, ops.xla_matmul(x, w, x_ternary=True))
  # TTQ: the two integer sums are exact; the float epilogue may round an FMA differently.
  np.testing.assert_allclose(
      matmul(x, w, x_ternary=True, w_scale=ws, w_scale_neg=wsn, block_sizes=bs),
      ops.xla_matmul(x, w, x_ternary=True, w_scale=ws, w_scale_neg=wsn), rtol=1e-6, atol=1e-5)
  if bs is None or bs.kernel != "popcount":
    np.testing.assert_array_equal(matmul(x8, w, block_sizes=bs), ops.xla_matmul(x8, w))


# M = 1 with every configuration; the other shapes with one each (interpret mode is slow).
INTERPRET_CASES = [(SHAPES[0], bs) for bs in CONFIGS] + [(SHAPES[1], CONFIGS[0]),
                                                         (SHAPES[2], CONFIGS[1])]


@pytest.mark.parametrize("shape,bs", INTERPRET_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else f"{v.kernel}-s{v.split_k}-k{v.block_k}")
def test_pallas_interpret_exact(shape, bs):
  m, k, n = shape
  matmul = functools.partial(ternary_matmul_pallas.ternary_matmul, interpret=True)
  _check(matmul, m, k, n, bs, seed=m * 100 + k)


def test_pallas_two_sums_are_the_reference_integers():
  x, w, _, _ = _operands(9, 77, 21, 3)
  xb = packing.pack_bitplanes(x, axis=1)
  planes = [kernels.common.as_int32(a) for a in (xb.pos, xb.neg, w.pos, w.neg)]
  got = ternary_matmul_pallas.popcount_matmul(
      *planes, two_sums=True, interpret=True,
      block_sizes=BlockSizes(kernel="popcount", block_m=4, block_n=8, block_k=1, split_k=2))
  for a, b in zip(got, ops.popcount_matmul(xb, w, two_sums=True)):
    np.testing.assert_array_equal(a, b)


def test_pallas_bf16_activations():
  _, w, _, _ = _operands(3, 45, 20, 4)
  x = jax.random.normal(jax.random.key(0), (3, 45), jnp.bfloat16)
  out = ternary_matmul_pallas.ternary_matmul(x, w, interpret=True, block_sizes=CONFIGS[2])
  np.testing.assert_allclose(out, ops.xla_matmul(x, w), rtol=1e-5, atol=1e-5)


def test_block_sizes_validation_and_defaults():
  with pytest.raises(ValueError, match="block_n"):
    BlockSizes(block_n=100)
  with pytest.raises(ValueError, match="block_m"):
    BlockSizes(kernel="dot", block_m=8)
  with pytest.raises(ValueError, match="mma kernel needs block_m"):
    BlockSizes(kernel="mma", block_m=8)
  assert BlockSizes.get_default(1, 4096, 4096, x_ternary=True).kernel == "popcount"
  assert BlockSizes.get_default(4096, 4096, 4096, x_ternary=True).kernel == "dot"
  assert BlockSizes.get_default(1, 4096, 4096, x_ternary=False, integer=False).split_k == 1
  # With the mma kernel: 16-row tiles and a K split at small M, 64-row tiles above.
  small = BlockSizes.get_default(1, 4096, 4096, x_ternary=True, mma=True)
  assert (small.kernel, small.block_m, small.split_k) == ("mma", 16, 4)
  assert BlockSizes.get_default(256, 4096, 4096, x_ternary=False, mma=True).block_m == 64
  assert BlockSizes.get_default(1024, 4096, 4096, x_ternary=False, mma=True).block_m == 128
  assert BlockSizes.get_default(1, 4096, 4096, x_ternary=False, mma=True).atomic
  assert not BlockSizes.get_default(16, 4096, 4096, x_ternary=False, mma=True).atomic


def test_unsupported_inputs_raise():
  x, w, _, _ = _operands(2, 40, 8, 5)
  matmul = functools.partial(ternary_matmul_pallas.ternary_matmul, interpret=True)
  with pytest.raises(NotImplementedError, match="int8"):
    matmul(x.astype(jnp.int32), w)
  with pytest.raises(ValueError, match="x_ternary"):
    matmul(x, w, block_sizes=BlockSizes(kernel="popcount", block_m=2))
  with pytest.raises(ValueError, match="split_k"):
    matmul(x.astype(jnp.float32), w, block_sizes=BlockSizes(block_m=16, split_k=2))
  with pytest.raises(NotImplementedError, match="no mma kernel"):
    matmul(x.astype(jnp.int8), w, block_sizes=MMA_CONFIGS[0])


@pytest.mark.skipif(ON_GPU, reason="checks the CPU fallback")
def test_dispatch_falls_through_to_xla_on_cpu():
  assert "pallas" in ops.IMPLEMENTATIONS and "gpu" in ops.POLICIES
  x, w, _, _ = _operands(4, 50, 9, 6)
  for names in ("pallas,xla", "gpu,xla"):
    np.testing.assert_array_equal(
        ops.ternary_matmul(x, w, x_ternary=True, implementation=names),
        ops.xla_matmul(x, w, x_ternary=True))


def test_gpu_policy_choices(monkeypatch):
  """Without jax-triton, the 'gpu' policy: XLA popcount for small ternary products, Pallas in
  between, XLA's int8 dot from ``kernels_max_m`` rows (ternary codes as int8); other integers
  unchanged."""
  monkeypatch.delitem(ops.IMPLEMENTATIONS, "triton", raising=False)
  w = packing.pack_bitplanes(jnp.zeros((64, 8), jnp.int8), axis=0)
  tuning = dataclasses.replace(kernels.GPU_TUNING, xla_popcount_max_mkn=4 * 64 * 8)

  def choose(m, x_ternary):
    name, x, xt = tuning.choose(jnp.zeros((m, 64), jnp.int32), w, x_ternary=x_ternary)
    return name, x.dtype, xt

  big = tuning.kernels_max_m
  assert choose(4, True) == ("xla", jnp.int32, True)         # M·K·N up to the threshold
  assert choose(5, True) == ("pallas", jnp.int32, True)
  assert choose(big, True) == ("xla", jnp.int8, False)       # ternary codes as int8 codes
  assert choose(big, False) == ("xla", jnp.int32, False)     # int32 stays int32


def test_gpu_policy_prefers_the_mma_kernel(monkeypatch):
  """With jax-triton registered, the kernels' range goes to its mma kernel (ternary codes as
  int8), except float32 activations (not measured there), which stay on Pallas."""
  monkeypatch.setitem(ops.IMPLEMENTATIONS, "triton", ops.IMPLEMENTATIONS["pallas"])
  w = packing.pack_bitplanes(jnp.zeros((64, 8), jnp.int8), axis=0)
  tuning = dataclasses.replace(kernels.GPU_TUNING, xla_popcount_max_mkn=0)
  choose = lambda x, xt: (lambda r: (r[0], r[1].dtype, r[2]))(tuning.choose(x, w, x_ternary=xt))
  assert choose(jnp.zeros((5, 64), jnp.int32), True) == ("triton", jnp.int8, False)
  assert choose(jnp.zeros((5, 64), jnp.bfloat16), False) == ("triton", jnp.bfloat16, False)
  assert choose(jnp.zeros((5, 64), jnp.float32), False) == ("pallas", jnp.float32, False)
  assert choose(jnp.zeros((tuning.kernels_max_m, 64), jnp.int8), False)[0] == "triton"
  assert choose(jnp.zeros((tuning.mma_max_m, 64), jnp.int8), False)[0] == "triton"
  assert choose(jnp.zeros((tuning.mma_max_m + 1, 64), jnp.int8), False)[0] == "xla"


@pytest.mark.skipif(not ON_GPU, reason="compiled kernels need a GPU")
@pytest.mark.parametrize("backend", ["pallas", "triton"])
@pytest.mark.parametrize("bs", [None] + CONFIGS + MMA_CONFIGS + [  # jax-triton split-K partials
    dataclasses.replace(bs, atomic=False) for bs in CONFIGS[:2]])
@pytest.mark.parametrize("m,k,n", SHAPES + arg_specs.GPU_CHECK[-1:])
def test_gpu_kernels_exact(backend, m, k, n, bs):
  module = getattr(kernels, f"ternary_matmul_{backend}")
  if module is None:
    pytest.skip(f"{backend} is not available (jax-triton needs a GPU jax and triton)")
  if bs is not None and bs.kernel == "mma" and module.BACKEND.mma is None:
    pytest.skip(f"{backend} has no mma kernel")
  _check(module.ternary_matmul, m, k, n, bs, seed=m + k + n)
  if bs is None or bs.kernel == "mma":  # W2A16: bf16 activations, to float32 rounding
    _, w, _, _ = _operands(m, k, n, seed=m)
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    out, want = module.ternary_matmul(x, w, block_sizes=bs), ops.xla_matmul(x, w)
    assert float(jnp.max(jnp.abs(out - want)) / jnp.max(jnp.abs(want))) < 1e-5
