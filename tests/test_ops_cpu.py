"""Every formulation of the XLA implementation equals an integer NumPy dot exactly.

The CPU path of :func:`ternjax.ops.xla_matmul` picks a formulation by shape
(:mod:`ternjax.ops.cpu`); each is checked directly here (with a tuning whose block sizes are
small enough that K and N need padding and the loops run several steps), and the dispatch is
checked on both sides of every threshold.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ternjax import ops, packing
from ternjax.ops import arg_specs, conv, cpu, xla

SHAPES = arg_specs.MATMUL
SMALL_BLOCKS = dataclasses.replace(ops.CPU_TUNING, popcount_tile_k_words=3, popcount_tile_n=8,
                                   select_k_words=2, dot_k_words=3)


def _ternary(rng, shape):
  return rng.integers(-1, 2, shape).astype(np.int8)


def _reference(x, t, two_sums):
  x, t = x.astype(np.int64), t.astype(np.int64)
  return (x @ (t == 1), x @ (t == -1)) if two_sums else (x @ t,)


def _check(accs, ref):
  assert len(accs) == len(ref)
  for a, r in zip(accs, ref):
    np.testing.assert_array_equal(np.asarray(a), r.astype(np.asarray(a).dtype))


# case -> (formulation, tuning): every formulation; those with block sizes with the default
# tuning and with SMALL_BLOCKS; "reference" is xla.popcount_matmul
POPCOUNT = {"reference": (None, ops.CPU_TUNING), "loop": ("loop", ops.CPU_TUNING),
            "broadcast": ("broadcast", ops.CPU_TUNING), "tiled": ("tiled", SMALL_BLOCKS),
            "tiled_default": ("tiled", ops.CPU_TUNING)}
DOT = {"plain": ("plain", ops.CPU_TUNING), "select": ("select", SMALL_BLOCKS),
       "blocked": ("blocked", SMALL_BLOCKS), "blocked_default": ("blocked", ops.CPU_TUNING)}


def test_every_formulation_is_tested():
  assert {f for f, _ in POPCOUNT.values()} - {None} == set(cpu.POPCOUNT)
  assert {f for f, _ in DOT.values()} == set(cpu.DOT)


def _popcount(name, xb, w, two_sums):
  formulation, tuning = POPCOUNT[name]
  if formulation is None:
    accs = xla.popcount_matmul(xb, w, two_sums)
    return accs if two_sums else (accs,)
  return cpu.POPCOUNT[formulation](xla.x_planes(xb), xla.w_planes(w, two_sums), two_sums, tuning)


@pytest.mark.parametrize("name", POPCOUNT)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_popcount_formulations_exact(name, m, k, n):
  rng = np.random.default_rng(k * 100 + n)
  x, t = _ternary(rng, (m, k)), _ternary(rng, (k, n))
  xb = packing.pack_bitplanes(jnp.asarray(x), axis=1)
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  two_sums = k % 2 == 1  # both forms, on different shapes
  out = jax.jit(_popcount, static_argnums=(0, 3))(name, xb, w, two_sums)
  _check(out, _reference(x, t, two_sums))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_pack_activations_equals_pack_bitplanes(m, k, n):
  x = jnp.asarray(_ternary(np.random.default_rng(k), (m, k)))
  expected = xla.x_planes(packing.pack_bitplanes(x, axis=1))
  for got, want in zip(cpu.activation_planes(x), expected):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", DOT)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_dot_formulations_exact(name, m, k, n):
  rng = np.random.default_rng(k * 100 + n + 1)
  x, t = rng.integers(-127, 128, (m, k)).astype(np.int8), _ternary(rng, (k, n))
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  two_sums = k % 2 == 0
  formulation, tuning = DOT[name]
  # integer-valued float32 activations: sums are exact below 2**24
  out = jax.jit(cpu.DOT[formulation], static_argnums=(2, 3))(jnp.asarray(x, jnp.float32), w,
                                                             two_sums, tuning)
  _check(out, _reference(x, t, two_sums))


@pytest.mark.parametrize("x_ternary,k,n,serial", [(True, 70, 11, False), (False, 71, 13, False),
                                                   (True, 72, 12, True), (False, 73, 14, True)])
def test_dispatch_exact_around_thresholds(x_ternary, k, n, serial):
  tuning = dataclasses.replace(
      ops.CPU_TUNING,
      dot_plain_max_bytes=0,  # small w would always take one dot
      # these small products would always take the word loop: with `serial`, M = 1 and 30..35 do
      popcount_serial_max_mn=n if serial else 0,
      popcount_loop_min_mn=30 * n if serial else 10 ** 9,
      popcount_loop_max_m=35,
      select_serial_max_mn=n if serial else 0)
  rng = np.random.default_rng(3)
  t = _ternary(rng, (k, n))
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  limits = ((tuning.popcount_broadcast_max_m, 29, 35) if x_ternary else
            (tuning.select_max_m, tuning.int8_dot_min_m - 1))
  formulations = set()
  for m in sorted({1, 40} | {m for limit in limits for m in (limit, limit + 1)}):
    x = _ternary(rng, (m, k)) if x_ternary else rng.integers(-128, 128, (m, k)).astype(np.int8)
    formulations.add(cpu.popcount_formulation(m, n, tuning) if x_ternary else
                     cpu.dot_formulation(m, k, n, tuning))
    out = ops.xla_matmul(jnp.asarray(x), w, x_ternary=x_ternary, tuning=tuning)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, _reference(x, t, False)[0])
  # both sides of each threshold were taken
  assert formulations == ({"loop", "broadcast", "tiled"} if x_ternary and serial else
                          {"broadcast", "tiled"} if x_ternary else {"select", "blocked"})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_float_dtypes_exact(dtype):
  rng = np.random.default_rng(4)
  x, t = rng.integers(-8, 9, (3, 45)), _ternary(rng, (45, 6))  # exact in every dtype
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  out = ops.xla_matmul(jnp.asarray(x, dtype), w)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, x @ t)


def test_float32_bound():
  assert xla.float_exact(jnp.int8, 2 ** 17)          # 2^17 · 128 = 2^24: still exact
  assert not xla.float_exact(jnp.int8, 2 ** 17 + 1)
  assert xla.float_exact(jnp.int16, 2 ** 9) and not xla.float_exact(jnp.int16, 2 ** 9 + 1)
  assert not xla.float_exact(jnp.int32, 1)


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


CONV_GEOMETRIES = [spec[:4] for spec in arg_specs.CONV]  # channels: each test's own


def _conv_reference(x, kernel, strides, padding, dilation, two_sums=False):
  conv = lambda k: np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.int32), jnp.asarray(k, jnp.int32), strides, padding,
      rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return (conv(kernel == 1), conv(kernel == -1)) if two_sums else (conv(kernel),)


def _conv_operands(rng, x_shape, window, out_channels, x_ternary):
  x = (_ternary(rng, x_shape) if x_ternary
       else rng.integers(-127, 128, x_shape).astype(np.int8))
  kernel = _ternary(rng, (*window, x_shape[-1], out_channels))
  return x, kernel, packing.pack_bitplanes(ops.kernel_to_matrix(jnp.asarray(kernel)), axis=0)


@pytest.mark.parametrize("window,strides,padding,dilation", CONV_GEOMETRIES)
@pytest.mark.parametrize("reorder_patches", [True, False])
def test_conv_exact(window, strides, padding, dilation, reorder_patches):
  # patches + matmul (int8 x: the xla implementation's direct conv would take it)
  tuning = dataclasses.replace(ops.CPU_TUNING,
                               conv_reorder_patches_max_m=10 ** 9 if reorder_patches else 0)
  x, kernel, w = _conv_operands(np.random.default_rng(5), (2, 9, 8, 3), window, 4, False)
  out = conv.patches_conv(jnp.asarray(x), w, window=window, strides=strides, padding=padding,
                          rhs_dilation=dilation, matmul=ops.xla_matmul, tuning=tuning)
  np.testing.assert_array_equal(out, _conv_reference(x, kernel, strides, padding, dilation)[0])


# direct convolutions of the xla implementation: channel-packed popcount (C = 1, 33: one and
# two words per pixel) and the float32 convolution (ternary, int8, float32 x)
@pytest.mark.parametrize("window,strides,padding,dilation", CONV_GEOMETRIES)
@pytest.mark.parametrize("path,channels", [("packed", 1), ("packed", 33), ("float", 3)])
def test_direct_conv_exact(window, strides, padding, dilation, path, channels):
  packed = path == "packed"
  tuning = dataclasses.replace(ops.CPU_TUNING, conv_pack_min_c=1 if packed else 10 ** 9,
                               conv_pack_min_rows=0)
  rng = np.random.default_rng(channels)
  for x_ternary in (True,) if packed else (True, False):
    x, kernel, w = _conv_operands(rng, (2, 9, 7, channels), window, 5, x_ternary)
    for two_sums in (False, True):
      kwargs = dict(w_scale=jnp.float32(1), w_scale_neg=jnp.float32(1)) if two_sums else {}
      got = ops.xla_conv(jnp.asarray(x), w, window=window, strides=strides, padding=padding,
                         rhs_dilation=dilation, x_ternary=x_ternary, tuning=tuning, **kwargs)
      want = _conv_reference(x, kernel, strides, padding, dilation, two_sums)
      # with two sums, the float epilogue gives acc_pos − acc_neg (exact small integers)
      np.testing.assert_array_equal(got, want[0] - want[1] if two_sums else want[0])
      if not packed and not x_ternary:
        got = ops.xla_conv(jnp.asarray(x, jnp.float32), w, window=window, strides=strides,
                           padding=padding, rhs_dilation=dilation, tuning=tuning)
        np.testing.assert_array_equal(got, want[0] - want[1] if two_sums else want[0])


def test_conv_scales_and_fallback():
  # per-example x_scale in the direct conv; int32 x (not exact in float32): patches + matmul
  rng = np.random.default_rng(6)
  x, kernel, w = _conv_operands(rng, (3, 6, 6, 2), (3, 3), 4, True)
  x_scale = jnp.asarray([1.0, 2.0, -3.0]).reshape(3, 1, 1, 1)
  w_scale = jnp.asarray([1.0, 0.5, 2.0, 4.0])
  ref = _conv_reference(x, kernel, (1, 1), "SAME", (1, 1))[0]
  out = ops.ternary_conv(jnp.asarray(x), w, window=(3, 3), padding="SAME", x_ternary=True,
                         x_scale=x_scale, w_scale=w_scale)
  np.testing.assert_allclose(out, ref * np.asarray(x_scale) * np.asarray(w_scale), rtol=1e-6)
  with pytest.raises(NotImplementedError, match="no exact direct convolution"):
    ops.xla_conv(jnp.asarray(x, jnp.int32), w, window=(3, 3), strides=(1, 1), padding="SAME",
                 rhs_dilation=(1, 1))
  big = np.full_like(x, 2 ** 24, dtype=np.int32) * x  # products beyond float32's integers
  out = ops.ternary_conv(jnp.asarray(big), w, window=(3, 3), padding="SAME")
  np.testing.assert_array_equal(out, ref.astype(np.int64) * 2 ** 24)
  with pytest.raises(ValueError, match="C·prod"):
    ops.ternary_conv(jnp.asarray(x), w, window=(5, 5))
