"""Bit packing of ternary tensors.

Two encodings, both 2 bits per trit:

=============  ==========================  ============  ===================================
encoding       bits per trit               trits / word  layout and padding
=============  ==========================  ============  ===================================
bitplanes      1 in ``pos`` + 1 in ``neg``   32 / uint32   along one axis (the contraction
               (``+1 → pos``, ``−1 → neg``)               axis); trit ``i`` is bit ``i % 32``
                                                          of word ``i // 32``; the axis is
                                                          zero-padded to a multiple of 32
2-bit codes    ``0 → 0b00``, ``+1 → 0b01``,  4 / uint8     along one axis; trit ``i`` is bits
               ``−1 → 0b10`` (``0b11``                     ``2·(i % 4)`` of byte ``i // 4``;
               never written)                             zero-padded to a multiple of 4
=============  ==========================  ============  ===================================

Padding trits are 0 (both planes clear), so in a contraction they add nothing: a padded word
can never change a result. Bitplanes feed the popcount GEMM; 2-bit codes are the compact
storage format. ``unpack_*(pack_*(t)) == t`` for every shape. NumPy arrays are packed and
unpacked with NumPy (no compilation: loading an export converts its codes this way), JAX
arrays with ``jax.numpy``; both give the same words.
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


def bitplanes_from_codes(packed: jax.Array, length: int, axis: int) -> Bitplanes:
  """Bitplanes of a tensor stored as 2-bit codes (the export format)."""
  return pack_bitplanes(unpack_codes(packed, length, axis), axis)
