"""Ternary convolutions: patches + matmul (every implementation), the XLA implementation's
direct CPU convolutions and the GPU policy's direct convolution.

A conv kernel ``(*window, C, O)`` is packed as the ``(C·prod(window), O)`` matrix of
:func:`kernel_to_matrix` (rows in (C, *window) order, as :func:`conv_patches`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ternjax.ops import cpu, xla
from ternjax.ops.base import epilogue
from ternjax.packing import WORD_BITS, Bitplanes, pack_bitplanes, unpack_bitplanes


def kernel_to_matrix(kernel: jax.Array) -> jax.Array:
  """A ``(*window, C, O)`` conv kernel as the ``(C·prod(window), O)`` matrix of
  :func:`conv_patches`."""
  ndim = kernel.ndim - 2
  return jnp.moveaxis(kernel, ndim, 0).reshape(-1, kernel.shape[-1])


def window_patches(x: jax.Array, window: Sequence[int], strides: Sequence[int], padding,
                   rhs_dilation: Sequence[int] | None = None) -> jax.Array:
  """Patches of an NHWC input, ``(N, H', W', kh·kw·C)`` in (kh, kw, C) order.

  One strided slice per window offset, concatenated along channels: data movement only (exact
  for every dtype, ``M·K`` work where ``lax.conv_general_dilated_patches``, a convolution with
  an identity kernel, does ``M·K²``), and the order that copies channel runs whole.
  """
  spatial = x.shape[1:-1]
  dilation = tuple(rhs_dilation or (1,) * len(window))
  span = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
  pads = (lax.padtype_to_pads(spatial, span, strides, padding) if isinstance(padding, str)
          else [tuple(p) for p in padding])
  x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  out = [(n - s) // st + 1 for n, s, st in zip(x.shape[1:-1], span, strides)]
  patches = []
  for offset in itertools.product(*map(range, window)):
    start = [o * d for o, d in zip(offset, dilation)]
    limit = [b + (n - 1) * st + 1 for b, n, st in zip(start, out, strides)]
    patches.append(lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]),
                             (1, *strides, 1)))
  return jnp.concatenate(patches, axis=-1)


def _c_major(patches: jax.Array, channels: int) -> jax.Array:
  """Window-major patches reordered to (C, kh, kw)."""
  *shape, k = patches.shape
  return jnp.swapaxes(patches.reshape(*shape, k // channels, channels), -1, -2).reshape(*shape, k)


def conv_patches(x: jax.Array, window: Sequence[int], strides: Sequence[int], padding,
                 rhs_dilation: Sequence[int] | None = None) -> jax.Array:
  """Patches of an NHWC input, ``(N, H', W', C·kh·kw)`` in (C, kh, kw) order (exact)."""
  return _c_major(window_patches(x, window, strides, padding, rhs_dilation), x.shape[-1])


def window_major_trits(w: Bitplanes, channels: int, dtype=jnp.int8) -> jax.Array:
  """The trits of a :func:`kernel_to_matrix` matrix, rows reordered from (C, *window) to
  (*window, C): ``(prod(window), C, O)``."""
  t = unpack_bitplanes(w, dtype).reshape(channels, -1, w.pos.shape[1])
  return jnp.swapaxes(t, 0, 1)


def _conv_kernel(w: Bitplanes, channels: int, window: Sequence[int], dtype,
                 two_sums: bool) -> jax.Array:
  """The ``(*window, C, O)`` kernel of a :func:`kernel_to_matrix` matrix as ``dtype``; with
  ``two_sums`` its ``[t = +1]`` and ``[t = −1]`` kernels concatenated along ``O``."""
  t = window_major_trits(w, channels, dtype).reshape(*window, channels, -1)
  return jnp.concatenate([(t == 1).astype(dtype), (t == -1).astype(dtype)], -1) if two_sums else t


def conv_popcount(x, w: Bitplanes, window, strides, padding, rhs_dilation, two_sums: bool,
                  tuning: cpu.CpuTuning = cpu.CPU_TUNING) -> tuple[jax.Array, ...]:
  """Ternary ``x``: channels packed into words per pixel first, then patches of words.

  The patches are ``prod(window)·⌈C/32⌉`` words per output instead of ``prod(window)·C``
  codes; the kernel is repacked to match (per window offset, channels zero-padded to words).
  Returns the int32 accumulators ``(N, H', W', O)``.
  """
  *batch_spatial, c = x.shape
  xw = [a.reshape(*batch_spatial, -1) for a in cpu.activation_planes(x.reshape(-1, c))]
  patches = [window_patches(a, window, strides, padding, rhs_dilation) for a in xw]
  out_spatial = patches[0].shape[:-1]
  rows = [a.reshape(-1, a.shape[-1]) for a in patches]
  cw = xw[0].shape[-1]
  t = jnp.pad(window_major_trits(w, c), [(0, 0), (0, cw * WORD_BITS - c), (0, 0)])
  planes = xla.w_planes(pack_bitplanes(t.reshape(-1, t.shape[-1]), axis=0), two_sums)
  return tuple(a.reshape(*out_spatial, -1) for a in cpu.popcount(rows, planes, two_sums, tuning))


def _unpacked_conv(x, w: Bitplanes, window, strides, padding, rhs_dilation, two_sums: bool,
                   **conv_kwargs) -> tuple[jax.Array, ...]:
  """One XLA convolution of ``x`` with the kernel unpacked to ``x``'s dtype: ``Σ x·t``, or with
  ``two_sums`` ``Σ x·[t = +1]`` and ``Σ x·[t = −1]``."""
  sp = "HWD"[:len(window)]
  out = lax.conv_general_dilated(
      x, _conv_kernel(w, x.shape[-1], window, x.dtype, two_sums), strides, padding,
      rhs_dilation=rhs_dilation, dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"),
      **conv_kwargs)
  return tuple(jnp.split(out, 2, axis=-1)) if two_sums else (out,)


def _conv_epilogue(accs, x, x_scale, w_scale, w_scale_neg) -> jax.Array:
  """:func:`epilogue` of NHWC sums, a per-example ``x_scale`` broadcast over the pixels."""
  if x_scale is not None and jnp.ndim(x_scale) > 0:
    x_scale = jnp.reshape(x_scale, (-1,) + (1,) * (x.ndim - 1))
  return epilogue(*accs, x_scale=x_scale, w_scale=w_scale, w_scale_neg=w_scale_neg)


def xla_conv(x, w, *, window, strides, padding, rhs_dilation, x_ternary=False, x_scale=None,
             w_scale=None, w_scale_neg=None, tuning: cpu.CpuTuning = cpu.CPU_TUNING):
  """Direct CPU convolutions (no patch matrix): channel-packed popcount for ternary ``x`` with
  many channels, else an XLA convolution of the unpacked kernel in float32 where that is exact
  (as in the CPU matmul). Raises ``NotImplementedError`` otherwise (and off CPU), so that the
  dispatch falls back to patches + matmul.
  """
  two_sums = w_scale_neg is not None
  c = x.shape[-1]
  k = w.length
  if jax.default_backend() != "cpu":
    raise NotImplementedError("direct convolutions are for CPU")
  out_rows = x.shape[0] * math.prod(-(-n // s) for n, s in zip(x.shape[1:-1], strides))
  if x_ternary and c >= tuning.conv_pack_min_c and out_rows >= tuning.conv_pack_min_rows:
    accs = conv_popcount(x, w, window, strides, padding, rhs_dilation, two_sums, tuning)
  elif k <= 2 ** 24 if x_ternary else cpu.float_route_exact(x, k):
    accs = _unpacked_conv(x.astype(jnp.float32), w, window, strides, padding, rhs_dilation,
                          two_sums)
    accs = cpu.integer_sums(accs, jnp.issubdtype(x.dtype, jnp.integer),
                            x_scale is not None or w_scale is not None)
  else:
    raise NotImplementedError(f"no exact direct convolution of {x.dtype} inputs over K = {k}")
  return _conv_epilogue(accs, x, x_scale, w_scale, w_scale_neg)


def direct_conv(x, w, *, window, strides, padding, rhs_dilation, x_ternary=False, x_scale=None,
                w_scale=None, w_scale_neg=None):
  """One XLA convolution (cuDNN on a GPU) of the unpacked kernel, where patches + matmul would
  write ``prod(window)`` copies of the input: the GPU policy's convolution.

  Float ``x``: the kernel in ``x``'s dtype, what a float model's layer runs (bfloat16 sums
  rounded to bfloat16, as there; float32 at HIGHEST precision, not TF32). int8 codes: an int8
  convolution with float32 sums (cuDNN's integer convolutions are implicit GEMMs on the int8
  tensor cores: exact while ``K·127 ≤ 2^24``); other integer codes, or larger ``K``, raise
  ``NotImplementedError`` (patches + an exact matmul).
  """
  del x_ternary  # ternary codes are int8 codes here
  if jnp.issubdtype(x.dtype, jnp.floating):
    kwargs = dict(precision=lax.Precision.HIGHEST) if x.dtype == jnp.float32 else {}
  elif x.dtype == jnp.int8 and w.length * 127 <= 2 ** 24:
    kwargs = dict(preferred_element_type=jnp.float32)
  else:
    raise NotImplementedError(f"no exact direct convolution of {x.dtype} codes over "
                              f"K = {w.length}")
  accs = _unpacked_conv(x, w, window, strides, padding, rhs_dilation, w_scale_neg is not None,
                        **kwargs)
  if x.dtype == jnp.int8:
    accs = cpu.integer_sums(accs, True, x_scale is not None or w_scale is not None)
  else:
    accs = tuple(a.astype(jnp.float32) for a in accs)  # the ops' float32 outputs
  return _conv_epilogue(accs, x, x_scale, w_scale, w_scale_neg)


def patches_conv(x, w: Bitplanes, *, window, strides, padding, rhs_dilation,
                 matmul: Callable[..., jax.Array], x_scale=None,
                 tuning: cpu.CpuTuning = cpu.CPU_TUNING, **kwargs) -> jax.Array:
  """Convolution as patches + ``matmul(rows, w, x_scale=..., **kwargs)`` (any implementation).

  Window-major patches are cheaper to build than (C, kh, kw) ones, so where the patches are
  large next to the weights, the weight rows are reordered to match; else the patches.
  """
  patches = window_patches(x, window, strides, padding, rhs_dilation)
  out_spatial = patches.shape[:-1]
  rows = patches.reshape(-1, patches.shape[-1])
  channels = x.shape[-1]
  if channels > 1 and rows.shape[0] <= tuning.conv_reorder_patches_max_m * w.pos.shape[1]:
    rows = _c_major(patches, channels).reshape(rows.shape)
  elif channels > 1:
    w = pack_bitplanes(window_major_trits(w, channels).reshape(w.length, -1), axis=0)
  if x_scale is not None and jnp.ndim(x_scale) > 0:
    x_scale = jnp.broadcast_to(jnp.reshape(x_scale, (-1,) + (1,) * (len(out_spatial) - 1)),
                               out_spatial).reshape(-1, 1)
  out = matmul(rows, w, x_scale=x_scale, **kwargs)
  return out.reshape(*out_spatial, out.shape[-1])
