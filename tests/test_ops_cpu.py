"""Every formulation of the XLA implementation equals an integer NumPy dot exactly.

The CPU path of :func:`ternjax.ops.xla_matmul` picks a formulation by shape; each is checked
directly here (block sizes small enough that K and N need padding and the loops run several
steps), and the dispatch is checked on both sides of every threshold.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ternjax import ops, packing

# (M, K, N): M = 1, K from 1 to 100 not a multiple of 32, odd N, and a few larger ones.
SHAPES = [(1, 1, 1), (1, 31, 7), (2, 33, 5), (3, 100, 9), (5, 97, 17), (1, 64, 130),
          (9, 65, 3), (4, 300, 33)]


def _ternary(rng, shape):
  return rng.integers(-1, 2, shape).astype(np.int8)


def _reference(x, t, two_sums):
  x, t = x.astype(np.int64), t.astype(np.int64)
  return (x @ (t == 1), x @ (t == -1)) if two_sums else (x @ t,)


def _check(accs, ref):
  assert len(accs) == len(ref)
  for a, r in zip(accs, ref):
    np.testing.assert_array_equal(np.asarray(a), r.astype(np.asarray(a).dtype))


POPCOUNT = {
    "reference": lambda xb, w, ts: (lambda a: a if ts else (a,))(ops.popcount_matmul(xb, w, ts)),
    "rows": lambda xb, w, ts: ops._popcount_rows(*ops._planes(xb, w, ts), ts),
    "tiled": lambda xb, w, ts: ops._popcount_tiled(*ops._planes(xb, w, ts), ts, k_words=3,
                                                   n_tile=8),
    "tiled_default": lambda xb, w, ts: ops._popcount_tiled(*ops._planes(xb, w, ts), ts,
                                                           **ops.CPU_POPCOUNT_TILE),
}

DOT = {
    "plain": lambda x, w, ts: ops._dot_plain(x, w, ts),
    "select": lambda x, w, ts: ops._dot_blocked(x, w, ts, k_words=2, select=True),
    "blocked": lambda x, w, ts: ops._dot_blocked(x, w, ts, k_words=3, select=False),
    "blocked_default": lambda x, w, ts: ops._dot_blocked(x, w, ts, ops.CPU_DOT_K_WORDS, False),
}


@pytest.mark.parametrize("name", POPCOUNT)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_popcount_formulations_exact(name, m, k, n):
  rng = np.random.default_rng(k * 100 + n)
  x, t = _ternary(rng, (m, k)), _ternary(rng, (k, n))
  xb = packing.pack_bitplanes(jnp.asarray(x), axis=1)
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  two_sums = k % 2 == 1  # both forms, on different shapes
  _check(jax.jit(POPCOUNT[name], static_argnums=2)(xb, w, two_sums), _reference(x, t, two_sums))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_pack_activations_equals_pack_bitplanes(m, k, n):
  x = jnp.asarray(_ternary(np.random.default_rng(k), (m, k)))
  expected = ops._x_planes(packing.pack_bitplanes(x, axis=1))
  for got, want in zip(ops._pack_activations(x), expected):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", DOT)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_dot_formulations_exact(name, m, k, n):
  rng = np.random.default_rng(k * 100 + n + 1)
  x, t = rng.integers(-127, 128, (m, k)).astype(np.int8), _ternary(rng, (k, n))
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  two_sums = k % 2 == 0
  # integer-valued float32 activations: sums are exact below 2**24
  out = jax.jit(DOT[name], static_argnums=2)(jnp.asarray(x, jnp.float32), w, two_sums)
  _check(out, _reference(x, t, two_sums))


@pytest.mark.parametrize("x_ternary,k,n", [(True, 70, 11), (False, 71, 13)])
def test_dispatch_exact_around_thresholds(monkeypatch, x_ternary, k, n):
  # shapes of their own: xla_matmul is jitted, so the thresholds are read when a shape is traced
  monkeypatch.setattr(ops, "CPU_DOT_PLAIN_MAX_BYTES", 0)  # small w would always take one dot
  rng = np.random.default_rng(3)
  t = _ternary(rng, (k, n))
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  limit = ops.CPU_POPCOUNT_ROWS_MAX_M if x_ternary else ops.CPU_SELECT_MAX_M
  for m in sorted({1, limit, limit + 1, 40}):
    x = _ternary(rng, (m, k)) if x_ternary else rng.integers(-128, 128, (m, k)).astype(np.int8)
    out = ops.xla_matmul(jnp.asarray(x), w, x_ternary=x_ternary)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, _reference(x, t, False)[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_float_dtypes_exact(dtype):
  rng = np.random.default_rng(4)
  x, t = rng.integers(-8, 9, (3, 45)), _ternary(rng, (45, 6))  # exact in every dtype
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  out = ops.xla_matmul(jnp.asarray(x, dtype), w)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, x @ t)


def test_float32_bound():
  assert ops._float_exact(jnp.int8, 2 ** 17)          # 2^17 · 128 = 2^24: still exact
  assert not ops._float_exact(jnp.int8, 2 ** 17 + 1)
  assert ops._float_exact(jnp.int16, 2 ** 9) and not ops._float_exact(jnp.int16, 2 ** 9 + 1)
  assert not ops._float_exact(jnp.int32, 1)


def test_integer_sums_beyond_float32_stay_exact():
  # K·127 > 2^24: a float32 accumulation would round; the dispatch must take the int32 dot.
  k = 2 ** 17 + 2 ** 12 + 1
  x = np.full((1, k), 127, np.int8)
  x[0, ::1000] = -1
  t = np.ones((k, 3), np.int8)
  t[::7, 1] = -1
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  ref = _reference(x, t, False)[0]
  assert np.abs(ref).max() > 2 ** 24 and (ref % 2 == 1).any()  # not representable in float32
  np.testing.assert_array_equal(ops.xla_matmul(jnp.asarray(x), w), ref)
  np.testing.assert_array_equal(ops.xla_matmul(jnp.asarray(x, jnp.int16), w), ref)


@pytest.mark.parametrize("window,strides,padding,dilation", [
    ((3, 3), (1, 1), "SAME", (2, 2)), ((3, 2), (2, 1), ((1, 2), (0, 1)), (2, 1)),
    ((1, 1), (2, 2), "VALID", (1, 1))])
@pytest.mark.parametrize("reorder_patches", [True, False])
def test_conv_exact(monkeypatch, window, strides, padding, dilation, reorder_patches):
  monkeypatch.setattr(ops, "CONV_REORDER_PATCHES_MAX_M", 10 ** 9 if reorder_patches else 0)
  rng = np.random.default_rng(5)
  x = rng.integers(-127, 128, (2, 9, 8, 3)).astype(np.int8)
  kernel = _ternary(rng, (*window, 3, 4))
  ref = jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.int32), jnp.asarray(kernel, jnp.int32), strides, padding,
      rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  w = packing.pack_bitplanes(ops.kernel_to_matrix(jnp.asarray(kernel)), axis=0)
  out = ops.ternary_conv(jnp.asarray(x), w, window=window, strides=strides, padding=padding,
                         rhs_dilation=dilation)
  np.testing.assert_array_equal(out, ref)
