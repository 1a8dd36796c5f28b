"""Packing round trips for random shapes and axes, and the documented bit layout."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternjax import packing

shapes = st.lists(st.integers(1, 70), min_size=1, max_size=3)


def _ternary(shape, seed):
  return np.random.default_rng(seed).integers(-1, 2, shape).astype(np.int8)


@settings(max_examples=8, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), axis_pick=st.integers(0, 2))
def test_bitplanes_round_trip(shape, seed, axis_pick):
  t = _ternary(shape, seed)
  axis = axis_pick % len(shape)
  b = packing.pack_bitplanes(jnp.asarray(t), axis)
  assert b.pos.dtype == jnp.uint32 and b.shape == t.shape
  assert b.pos.shape[axis] == -(-shape[axis] // 32)
  np.testing.assert_array_equal(packing.unpack_bitplanes(b), t)
  assert not np.any(np.asarray(b.pos) & np.asarray(b.neg))


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), axis_pick=st.integers(0, 2))
def test_codes_round_trip(shape, seed, axis_pick):
  t = _ternary(shape, seed)
  axis = axis_pick % len(shape)
  c = packing.pack_codes(jnp.asarray(t), axis)
  assert c.dtype == jnp.uint8 and c.shape[axis] == -(-shape[axis] // 4)
  np.testing.assert_array_equal(packing.unpack_codes(c, shape[axis], axis), t)
  b = packing.bitplanes_from_codes(c, shape[axis], axis)
  np.testing.assert_array_equal(packing.unpack_bitplanes(b), t)


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_trits_round_trip(shape, seed):
  """Base-3 codes (the export format): five trits a byte, NumPy and JAX give the same bytes."""
  t = _ternary(shape, seed)
  c = packing.pack_trits(jnp.asarray(t))
  assert c.dtype == jnp.uint8 and c.shape == (-(-t.size // 5),) and int(c.max()) <= 242
  np.testing.assert_array_equal(packing.pack_trits(t), c)
  np.testing.assert_array_equal(packing.unpack_trits(c, shape), t)
  np.testing.assert_array_equal(packing.unpack_trits(np.asarray(c), shape), t)


def test_documented_layout():
  t = np.zeros(40, np.int8)
  t[[0, 5, 33]] = 1
  t[[1, 39]] = -1
  b = packing.pack_bitplanes(jnp.asarray(t))
  np.testing.assert_array_equal(b.pos, [1 | 1 << 5, 1 << 1])
  np.testing.assert_array_equal(b.neg, [1 << 1, 1 << 7])
  c = packing.pack_codes(jnp.asarray([1, -1, 0, 1, -1]))
  np.testing.assert_array_equal(c, [0b01_00_10_01, 0b10])
  trits = packing.pack_trits(jnp.asarray([1, -1, 0, 1, -1, -1]))  # digits 1, 2, 0, 1, 2 | 2
  np.testing.assert_array_equal(trits, [1 + 2 * 3 + 0 * 9 + 1 * 27 + 2 * 81, 2])


@pytest.mark.parametrize("shape, axis", [((1,), 0), ((37, 5), 0), ((3, 70), 1), ((4, 33, 2), 1)])
def test_numpy_packing_equals_jax(shape, axis):
  """NumPy inputs are packed by NumPy (export loading), to the same words as under JAX."""
  t = _ternary(shape, 7)
  codes = packing.pack_codes(jnp.asarray(t), axis)
  by_numpy = packing.bitplanes_from_codes(np.asarray(codes), shape[axis], axis)
  by_jax = packing.bitplanes_from_codes(codes, shape[axis], axis)
  assert isinstance(by_numpy.pos, np.ndarray) and by_numpy.pos.dtype == np.uint32
  np.testing.assert_array_equal(by_numpy.pos, by_jax.pos)
  np.testing.assert_array_equal(by_numpy.neg, by_jax.neg)
  np.testing.assert_array_equal(packing.unpack_bitplanes(by_numpy), t)
