"""NumPy runtime for ternjax exports: reads an export and runs it without importing JAX.

The export (see :mod:`ternjax.export`) is an Orbax checkpoint; this module reads its metadata
JSON directly and its arrays with TensorStore (Orbax's storage library, which does not need
JAX), then runs the layers in NumPy. Ternary layers with integer inputs accumulate exact integer
sums (a float64 matmul of small integers is exact below 2^53) and apply the scales in float32
in the same order as :func:`ternjax.ops.epilogue`, so predictions equal the JAX runtime's.

>>> net = load("exports/mnist-lenet5")             # doctest: +SKIP
>>> logits = net(images)                           # doctest: +SKIP

It needs NumPy, TensorStore and the standard library only: ``from ternjax import
runtime_numpy`` imports no JAX (the package imports its other modules lazily), and the file can
also be copied next to an application on its own.

This module is also where the format is checked (version, architecture, checksums): the JAX
loader reuses those checks, so both runtimes accept and refuse the same exports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
ARRAYS_ITEM = "arrays"        # Orbax item holding the arrays (PyTree of NumPy arrays)
METADATA_ITEM = "metadata"    # Orbax item holding the metadata (JSON)
LAYER_KINDS = ("ternary_linear", "ternary_conv", "linear", "conv", "affine", "relu",
               "max_pool", "flatten")


class ExportError(Exception):
  """A model that cannot be exported, or an export that cannot be loaded (one-line message)."""


def sha256(array: np.ndarray) -> str:
  """Checksum of an array's bytes (C order): the export records one per array."""
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def read_metadata(directory, model: str | None = None) -> dict:
  """The export's metadata, checked: format version, layer kinds and, if given, the model name."""
  directory = Path(directory)
  path = directory / METADATA_ITEM / "metadata"
  if not directory.is_dir():
    raise ExportError(f"{directory}: no such export directory")
  try:
    meta = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ExportError(f"{directory}: not a ternjax export or corrupted: cannot read {path.name} "
                      f"({type(err).__name__})") from None
  if not isinstance(meta, dict) or "format_version" not in meta:
    raise ExportError(f"{directory}: not a ternjax export (no format_version in its metadata)")
  if meta["format_version"] != FORMAT_VERSION:
    raise ExportError(f"{directory}: export format version {meta['format_version']!r}, this "
                      f"ternjax reads version {FORMAT_VERSION}; export the model again")
  if model is not None and meta.get("model") != model:
    raise ExportError(f"{directory}: holds model {meta.get('model')!r}, "
                      f"not the requested {model!r}")
  layers = meta.get("layers")
  if not isinstance(layers, list) or any(l.get("kind") not in LAYER_KINDS for l in layers):
    raise ExportError(f"{directory}: corrupted metadata (unknown layer kinds)")
  return meta


def check_arrays(arrays: dict, meta: dict, directory) -> None:
  """Raises :class:`ExportError` unless ``arrays`` are exactly those the metadata records."""
  for i, spec in enumerate(meta["layers"]):
    for name, info in spec.get("arrays", {}).items():
      a = arrays.get(str(i), {}).get(name)
      if a is None or list(a.shape) != info["shape"] or str(a.dtype) != info["dtype"] or \
          sha256(a) != info["sha256"]:
        raise ExportError(f"{directory}: corrupted export: array {i}.{name} does not match its "
                          f"recorded shape, dtype or checksum")


def unreadable_arrays(directory, err: Exception) -> ExportError:
  """The one-line error for an export whose arrays cannot be read (the cause's first line)."""
  first = (str(err).splitlines() or [""])[0][:160]
  return ExportError(f"{directory}: corrupted export: cannot read its arrays "
                     f"({type(err).__name__}: {first})")


def read_arrays(directory, meta: dict) -> dict[str, dict[str, np.ndarray]]:
  """Reads the export's arrays with TensorStore (no JAX), checked against the metadata."""
  import tensorstore as ts
  directory = Path(directory).absolute()
  base = directory / ARRAYS_ITEM
  try:
    zarr3 = json.loads((base / "_METADATA").read_text()).get("use_zarr3", False)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for i, spec in enumerate(meta["layers"]):
      for name in spec.get("arrays", {}):
        store = ts.open({"driver": "zarr3" if zarr3 else "zarr",
                         "kvstore": {"driver": "ocdbt", "base": f"file://{base}/",
                                     "path": f"{i}.{name}"}}, open=True, read=True).result()
        arrays.setdefault(str(i), {})[name] = np.asarray(store.read().result())
  except (OSError, ValueError, json.JSONDecodeError) as err:
    raise unreadable_arrays(directory, err) from None
  check_arrays(arrays, meta, directory)
  return arrays


# --------------------------------------------------------------------------------------------
# Layers


def unpack_codes(packed: np.ndarray, length: int) -> np.ndarray:
  """2-bit codes packed along axis 0 (:func:`ternjax.packing.pack_codes`) as int8 trits."""
  codes = (packed[:, None] >> np.arange(0, 8, 2, dtype=np.uint8)[:, None]) & 3
  codes = codes.reshape(-1, *packed.shape[1:])[:length]
  return (codes == 1).astype(np.int8) - (codes == 2).astype(np.int8)


def _pads(size, window, strides, padding, dilation):
  if padding == "VALID":
    return [(0, 0)] * len(window)
  if padding == "SAME":  # as lax.padtype_to_pads
    pads = []
    for n, k, s, d in zip(size, window, strides, dilation):
      total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
      pads.append((total // 2, total - total // 2))
    return pads
  return [tuple(p) for p in padding]


def conv_patches(x, window, strides, padding, dilation):
  """Patches of NHWC ``x`` in (C, kh, kw) order, as :func:`ternjax.ops.conv_patches`."""
  nd = len(window)
  pads = _pads(x.shape[1:1 + nd], window, strides, padding, dilation)
  x = np.pad(x, [(0, 0), *pads, (0, 0)])
  span = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
  v = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(1, 1 + nd)))
  v = v[(slice(None), *(slice(None, None, s) for s in strides), slice(None),
         *(slice(None, None, d) for d in dilation))]
  return v.reshape(*v.shape[:1 + nd], -1)


def quantize_inputs(spec, p, x):
  """Input codes and scale as the layer's quantizer (:mod:`ternjax.quantizers`) computes them."""
  if spec["activations"] == "ternary":
    s = p["act_scale"]
    threshold = np.float32(spec["act_threshold"]) * s
    return np.where(x > threshold, 1, np.where(x < -threshold, -1, 0)).astype(np.int8), s
  if spec["activations"] == "int8":
    scale = np.max(np.abs(x), axis=tuple(range(1, x.ndim)), keepdims=True) / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    return np.clip(np.round(x / scale), -127, 127).astype(np.int8), scale
  return x, None


def _contract(rows, spec, p):
  """``rows (M, K)`` times the layer's (K, N) weights, plus scales and bias."""
  if "codes" not in p:  # float layer
    return rows.astype(np.float32) @ p["matrix"] + p["bias"]
  t = p["trits"]
  integer = np.issubdtype(rows.dtype, np.integer)
  dot = (lambda a, b: (a.astype(np.float64) @ b).astype(np.int64)) if integer else \
      (lambda a, b: a @ b.astype(np.float32))
  if "scale_neg" in p:
    out = dot(rows, t == 1).astype(np.float32) * p["scale_pos"]
    out = out - dot(rows, t == -1).astype(np.float32) * p["scale_neg"]
  else:
    out = dot(rows, t).astype(np.float32) * p["scale_pos"]
  return out + p["bias"] if p.get("x_scale") is None else out * p["x_scale"] + p["bias"]


def _dense(spec, p, x):
  x, xs = quantize_inputs(spec, p, x)
  if "codes" not in p and xs is not None:
    x = xs * x.astype(np.float32)
  conv = spec["kind"] in ("conv", "ternary_conv")
  if conv:
    x = conv_patches(x, spec["window"], spec["strides"], spec["padding"], spec["dilation"])
    if xs is not None and np.ndim(xs) > 0:
      xs = np.broadcast_to(xs.reshape(-1, *(1,) * (x.ndim - 2)), x.shape[:-1]).reshape(-1, 1)
  rows = x.reshape(-1, x.shape[-1])
  out = _contract(rows, spec, {**p, "x_scale": xs if "codes" in p else None})
  return out.reshape(*x.shape[:-1], -1)


def _max_pool(spec, x):
  v = np.lib.stride_tricks.sliding_window_view(x, spec["window"], axis=(1, 2))
  v = v[:, ::spec["strides"][0], ::spec["strides"][1]]
  return v.max(axis=(-2, -1))


LAYERS = {
    "ternary_linear": _dense, "ternary_conv": _dense, "linear": _dense, "conv": _dense,
    "affine": lambda spec, p, x: x * p["scale"] + p["shift"],
    "relu": lambda spec, p, x: np.maximum(x, 0),
    "flatten": lambda spec, p, x: x.reshape(x.shape[0], -1),
    "max_pool": lambda spec, p, x: _max_pool(spec, x),
}


class Runtime:
  """An export loaded for NumPy inference: ``Runtime(dir)(images) -> logits`` (float32)."""

  def __init__(self, directory, *, model: str | None = None):
    self.metadata = read_metadata(directory, model)
    self.params = read_arrays(directory, self.metadata)
    for i, spec in enumerate(self.metadata["layers"]):
      p = self.params.get(str(i), {})
      if "codes" in p:  # unpacked once: int8 trits, never float weights
        p["trits"] = unpack_codes(p["codes"], spec["rows"])
      elif "kernel" in p:
        k = p["kernel"]
        p["matrix"] = np.moveaxis(k, k.ndim - 2, 0).reshape(-1, k.shape[-1])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float32)
    for i, spec in enumerate(self.metadata["layers"]):
      x = LAYERS[spec["kind"]](spec, self.params.get(str(i), {}), x)
    return x


def load(directory, *, model: str | None = None) -> Runtime:
  """Loads an export for NumPy inference (see :class:`Runtime`)."""
  return Runtime(directory, model=model)
