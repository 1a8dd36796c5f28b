"""ternary_matmul / ternary_conv equal integer jnp.dot / lax.conv of the ternary values exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ternjax import ops, packing

# (M, K, N): M = 1, K from 1 to 100 (not multiples of 32), N not a multiple of a block.
SHAPES = [(1, 1, 1), (1, 31, 7), (3, 32, 5), (5, 33, 9), (1, 64, 130), (7, 100, 3),
          (16, 97, 33), (2, 65, 1)]


def _operands(m, k, n, seed):
  rng = np.random.default_rng(seed)
  return (rng.integers(-1, 2, (m, k)).astype(np.int8), rng.integers(-1, 2, (k, n)).astype(np.int8))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_ternary_activations_exact(m, k, n):
  x, t = _operands(m, k, n, m * 1000 + k)
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  out = ops.ternary_matmul(jnp.asarray(x), w, x_ternary=True, implementation="xla")
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, np.dot(x.astype(np.int32), t.astype(np.int32)))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_and_float_activations_exact(m, k, n):
  rng = np.random.default_rng(k)
  _, t = _operands(m, k, n, k)
  x8 = rng.integers(-127, 128, (m, k)).astype(np.int8)
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  ref = np.dot(x8.astype(np.int32), t.astype(np.int32))
  np.testing.assert_array_equal(ops.ternary_matmul(jnp.asarray(x8), w), ref)
  xf = jnp.asarray(x8, jnp.float32)  # integer-valued floats: sums are exact below 2**24
  np.testing.assert_array_equal(ops.ternary_matmul(xf, w), ref.astype(np.float32))


def test_two_sums_and_scales():
  x, t = _operands(4, 45, 6, 7)
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  xs = jnp.arange(1.0, 5.0)[:, None]
  ap, an = jnp.linspace(0.5, 1.0, 6), jnp.linspace(2.0, 3.0, 6)
  x32, t32 = x.astype(np.int32), t.astype(np.int32)
  acc_p, acc_n = x32 @ (t32 == 1), x32 @ (t32 == -1)
  ref = (acc_p.astype(np.float32) * ap - acc_n.astype(np.float32) * an) * xs
  for xt in (True, False):
    out = ops.ternary_matmul(jnp.asarray(x), w, x_ternary=xt, x_scale=xs, w_scale=ap,
                             w_scale_neg=an)
    np.testing.assert_array_equal(out, ref)


def test_bad_shapes_and_names_raise():
  w = packing.pack_bitplanes(jnp.ones((10, 3), jnp.int8), axis=0)
  with pytest.raises(ValueError, match="K = 10"):
    ops.ternary_matmul(jnp.ones((2, 11), jnp.int8), w)
  with pytest.raises(ValueError, match="packed along axis 0"):
    ops.ternary_matmul(jnp.ones((2, 3), jnp.int8), packing.pack_bitplanes(jnp.ones((3, 10))))
  with pytest.raises(ValueError, match="unknown implementation"):
    ops.ternary_matmul(jnp.ones((2, 10), jnp.int8), w, implementation="nope")


def test_environment_variable_selects(monkeypatch):
  calls = []
  monkeypatch.setitem(ops.IMPLEMENTATIONS, "spy",
                      lambda *a, **kw: calls.append(1) or ops.xla_matmul(*a, **kw))
  monkeypatch.setenv(ops.ENV_VAR, "spy")
  w = packing.pack_bitplanes(jnp.ones((10, 3), jnp.int8), axis=0)
  ops.ternary_matmul(jnp.ones((2, 10), jnp.int8), w)
  assert calls == [1]


def test_fall_through_on_not_implemented(monkeypatch):
  def refuse(*a, **kw):
    raise NotImplementedError("not this shape")
  monkeypatch.setitem(ops.IMPLEMENTATIONS, "refuse", refuse)
  x, t = _operands(2, 40, 3, 1)
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  out = ops.ternary_matmul(jnp.asarray(x), w, implementation=("refuse", "xla"))
  np.testing.assert_array_equal(out, x.astype(np.int32) @ t)
  with pytest.raises(NotImplementedError, match="not this shape"):
    ops.ternary_matmul(jnp.asarray(x), w, implementation="refuse")


@pytest.mark.parametrize("window,strides,padding,cin", [
    ((3, 3), (1, 1), "SAME", 3), ((5, 5), (2, 2), "VALID", 2), ((2, 3), (1, 2), "SAME", 5)])
@pytest.mark.parametrize("x_ternary", [True, False])
def test_conv_exact(window, strides, padding, cin, x_ternary):
  rng = np.random.default_rng(cin)
  lo = -1 if x_ternary else -127
  x = rng.integers(lo, -lo + 1, (2, 9, 8, cin)).astype(np.int8)
  kernel = rng.integers(-1, 2, (*window, cin, 4)).astype(np.int8)
  # float32 holds these integer sums exactly (and cuDNN has no int32 convolution).
  ref = lax.conv_general_dilated(
      jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), strides, padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST).astype(jnp.int32)
  w = packing.pack_bitplanes(ops.kernel_to_matrix(jnp.asarray(kernel)), axis=0)
  out = ops.ternary_conv(jnp.asarray(x), w, window=window, strides=strides, padding=padding,
                         x_ternary=x_ternary)
  np.testing.assert_array_equal(out, ref)
