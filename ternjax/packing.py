"""Bit packing of ternary tensors.

Three encodings:

=============  ==========================  ============  ===================================
encoding       bits per trit               trits / word  layout and padding
=============  ==========================  ============  ===================================
bitplanes      2: 1 in ``pos`` + 1 in        32 / uint32   along one axis (the contraction
               ``neg`` (``+1 → pos``,                     axis); trit ``i`` is bit ``i % 32``
               ``−1 → neg``)                              of word ``i // 32``; the axis is
                                                          zero-padded to a multiple of 32
2-bit codes    2: ``0 → 0b00``, ``+1 →       4 / uint8     along one axis; trit ``i`` is bits
               0b01``, ``−1 → 0b10``                      ``2·(i % 4)`` of byte ``i // 4``;
               (``0b11`` never written)                   zero-padded to a multiple of 4
base-3 trits   8/5 = 1.6: digit ``t mod 3``  5 / uint8     the whole tensor, flattened in C
               (``0, 1, 2`` for ``0, +1,                  order; trit ``i`` is base-3 digit
               −1``)                                      ``i % 5`` of byte ``i // 5`` (at
                                                          most 242); zero-padded to a
                                                          multiple of 5
=============  ==========================  ============  ===================================

Padding trits are 0 (both planes clear), so in a contraction they add nothing: a padded word
can never change a result. Bitplanes feed the popcount GEMM; base-3 trits are the storage
format of exports (format 3; 2-bit codes, byte-aligned per trit, that of format 2).
``unpack_*(pack_*(t)) == t`` for every shape. NumPy arrays are packed and unpacked with NumPy
(no compilation: loading an export converts its codes this way), JAX arrays with
``jax.numpy``; both give the same bytes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

WORD_BITS = 32
CODES_PER_BYTE = 4
# Bit offsets of the codes in a byte, a constant (not an iota: ONNX converters turn that into a
# uint8 Range, which onnxruntime does not implement).
_CODE_SHIFTS = np.arange(0, 2 * CODES_PER_BYTE, 2, dtype=np.uint8)
TRITS_PER_BYTE = 5
_TRIT_POWERS = 3 ** np.arange(TRITS_PER_BYTE, dtype=np.uint32)  # a constant, as _CODE_SHIFTS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bitplanes:
  """A ternary tensor as two uint32 bitplanes packed along ``axis`` (``length`` trits long)."""

  pos: jax.Array
  neg: jax.Array
  length: int = dataclasses.field(metadata=dict(static=True))
  axis: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the unpacked tensor."""
    shape = list(self.pos.shape)
    shape[self.axis] = self.length
    return tuple(shape)


def num_words(length: int, per_word: int = WORD_BITS) -> int:
  return -(-length // per_word)


def _xp(x):
  """The array module of ``x``: NumPy for NumPy arrays, else ``jax.numpy``."""
  return np if isinstance(x, np.ndarray) else jnp


def _pad_axis_last(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  xp = _xp(x)
  x = xp.moveaxis(x, axis, -1)
  pad = num_words(x.shape[-1], multiple) * multiple - x.shape[-1]
  return xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _pack_bits(bits: jax.Array, axis: int) -> jax.Array:
  xp = _xp(bits)
  bits = _pad_axis_last(bits.astype(np.uint32), axis, WORD_BITS)
  bits = bits.reshape(*bits.shape[:-1], -1, WORD_BITS)
  words = xp.sum(bits << xp.arange(WORD_BITS, dtype=np.uint32), axis=-1, dtype=np.uint32)
  return xp.moveaxis(words, -1, axis)


def _unpack_bits(words: jax.Array, length: int, axis: int) -> jax.Array:
  xp = _xp(words)
  words = xp.moveaxis(words, axis, -1)
  bits = (words[..., None] >> xp.arange(WORD_BITS, dtype=np.uint32)) & 1
  bits = bits.reshape(*words.shape[:-1], -1)[..., :length]
  return xp.moveaxis(bits, -1, axis)


def pack_bitplanes(t: jax.Array, axis: int = -1) -> Bitplanes:
  """Packs a ternary tensor (values in {-1, 0, 1}, any dtype) into uint32 bitplanes."""
  axis = axis % t.ndim
  return Bitplanes(_pack_bits(t == 1, axis), _pack_bits(t == -1, axis), t.shape[axis], axis)


def unpack_bitplanes(b: Bitplanes, dtype=jnp.int8) -> jax.Array:
  """Inverse of :func:`pack_bitplanes`: the ternary tensor as ``dtype``."""
  pos = _unpack_bits(b.pos, b.length, b.axis).astype(dtype)
  neg = _unpack_bits(b.neg, b.length, b.axis).astype(dtype)
  return pos - neg


def pack_codes(t: jax.Array, axis: int = -1) -> jax.Array:
  """Packs a ternary tensor into 2-bit codes, four per uint8 along ``axis``."""
  axis = axis % t.ndim
  codes = jnp.where(t == 1, 1, jnp.where(t == -1, 2, 0)).astype(jnp.uint8)
  codes = _pad_axis_last(codes, axis, CODES_PER_BYTE)
  codes = codes.reshape(*codes.shape[:-1], -1, CODES_PER_BYTE)
  shifts = jnp.arange(0, 2 * CODES_PER_BYTE, 2, dtype=jnp.uint8)
  packed = jnp.sum(codes << shifts, axis=-1, dtype=jnp.uint8)
  return jnp.moveaxis(packed, -1, axis)


def unpack_codes(packed: jax.Array, length: int, axis: int = -1, dtype=jnp.int8) -> jax.Array:
  """Inverse of :func:`pack_codes`; ``length`` is the unpadded size of ``axis``."""
  xp = _xp(packed)
  axis = axis % packed.ndim
  packed = xp.moveaxis(packed, axis, -1)
  codes = (packed[..., None] >> _CODE_SHIFTS) & 3
  codes = codes.reshape(*packed.shape[:-1], -1)[..., :length]
  t = (codes == 1).astype(dtype) - (codes == 2).astype(dtype)
  return xp.moveaxis(t, -1, axis)


def pack_trits(t: jax.Array) -> jax.Array:
  """Packs a ternary tensor into base-3 digits, five per uint8 (``(⌈size/5⌉,)``)."""
  xp = _xp(t)
  digits = xp.remainder(xp.reshape(t, -1).astype(np.int32), 3).astype(np.uint32)  # -1 -> 2
  digits = _pad_axis_last(digits, 0, TRITS_PER_BYTE).reshape(-1, TRITS_PER_BYTE)
  return xp.sum(digits * _TRIT_POWERS, axis=-1).astype(np.uint8)


def unpack_trits(packed: jax.Array, shape, dtype=jnp.int8) -> jax.Array:
  """Inverse of :func:`pack_trits`: the tensor of ``shape`` (unsigned integer division and
  remainder: ONNX's ``Div`` and ``Mod``, the constant powers broadcast by the ops)."""
  size = int(np.prod(shape))
  digits = packed.astype(np.uint32)[:, None] // _TRIT_POWERS % 3
  digits = digits.reshape(-1)[:size].reshape(shape)
  return (digits == 1).astype(dtype) - (digits == 2).astype(dtype)


def bitplanes_from_codes(packed: jax.Array, length: int, axis: int) -> Bitplanes:
  """Bitplanes of a tensor stored as 2-bit codes (export format 2)."""
  return pack_bitplanes(unpack_codes(packed, length, axis), axis)
