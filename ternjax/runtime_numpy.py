"""Runtimes without JAX: an export's ``model.onnx`` on ONNX's NumPy reference evaluator (or on
onnxruntime), and the checks every runtime shares.

The export (see :mod:`ternjax.export`) holds the model as ONNX next to its JAX form: ternary
layers as base-3 codes (uint8 initializers, 1.6 bits per weight) unpacked by the graph itself
(integer Div, Mod), integer codes
contracted by an exact float32 MatMul, scales after. :func:`load` runs it with
``onnx.reference.ReferenceEvaluator`` (NumPy only; ``engine='numpy'``) or onnxruntime
(``engine='onnxruntime'``):

>>> net = load("exports/mnist-lenet5")             # doctest: +SKIP
>>> logits = net(images)                           # doctest: +SKIP

``from ternjax import runtime_numpy`` imports no JAX (the package imports its other modules
lazily). The reference evaluator's pooling loops over every output in Python; this module
gives it vectorized MaxPool / AveragePool for the attributes it uses (ONNX's own code for the
rest).

This module is also where the format is checked (``checksums.json`` over every file, version,
architecture) and inputs are checked (shape and dtype against the export's, finite values, an
empty batch gives an empty result): the JAX loader reuses these checks, so every runtime
accepts and refuses the same exports and inputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT_VERSION = 3
READS = (2, 3)  # format 2 stores 2-bit codes, format 3 base-3 ones (ternjax.packing)
ARRAYS_ITEM = "arrays"          # Orbax item holding the arrays (PyTree of NumPy arrays)
METADATA_ITEM = "metadata"      # Orbax item holding the metadata (JSON)
METADATA_FILE = f"{METADATA_ITEM}/metadata"
CHECKSUMS_FILE = "checksums.json"
ONNX_FILE = "model.onnx"
ENGINES = ("numpy", "onnxruntime")


class ExportError(Exception):
  """A model that cannot be exported, or an export that cannot be loaded (one-line message)."""


def sha256(array: np.ndarray) -> str:
  """Checksum of an array's bytes (C order): the metadata records one per array."""
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_checksums(directory) -> None:
  """Writes ``checksums.json``: the SHA-256 of every other file of the export."""
  directory = Path(directory)
  files = {str(f.relative_to(directory)): _file_sha256(f) for f in sorted(directory.rglob("*"))
           if f.is_file() and f.name != CHECKSUMS_FILE}
  (directory / CHECKSUMS_FILE).write_text(json.dumps(
      dict(format_version=FORMAT_VERSION, files=files), indent=1))


def _old_format(directory: Path) -> ExportError:
  try:
    version = json.loads((directory / METADATA_FILE).read_text())["format_version"]
  except (OSError, ValueError, KeyError, TypeError):
    version = None
  if version is None or version in READS:
    return ExportError(f"{directory}: not a ternjax export or corrupted: no {CHECKSUMS_FILE}")
  return ExportError(f"{directory}: export format version {version!r}, this ternjax reads "
                     f"versions {', '.join(map(str, READS))}; export the model again")


def verify(directory, model: str | None = None) -> dict:
  """Checks every file against ``checksums.json``, then returns the metadata, checked.

  Refuses (:class:`ExportError`, one line naming the file) a missing, truncated, damaged or
  edited file (the metadata included), an unlisted file among the export's own, another format
  version, and, if ``model`` is given, another model.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise ExportError(f"{directory}: no such export directory")
  if not (directory / CHECKSUMS_FILE).exists():
    raise _old_format(directory)
  try:
    sums = json.loads((directory / CHECKSUMS_FILE).read_text())
    files = dict(sums["files"])
  except (OSError, ValueError, KeyError, TypeError):
    raise ExportError(f"{directory}: corrupted export: cannot read {CHECKSUMS_FILE}") from None
  if sums.get("format_version") not in READS:
    raise _old_format(directory)
  own = [f for top in (ARRAYS_ITEM, METADATA_ITEM, "graph") for f in (directory / top).rglob("*")
         if f.is_file()] + [f for f in (directory / ONNX_FILE,) if f.exists()]
  unlisted = sorted(str(f.relative_to(directory)) for f in own
                    if str(f.relative_to(directory)) not in files)
  if METADATA_FILE not in files or unlisted:
    raise ExportError(f"{directory}: corrupted export: {(unlisted or [METADATA_FILE])[0]} is not "
                      f"covered by {CHECKSUMS_FILE}")
  for name, digest in sorted(files.items()):
    path = directory / name
    if not path.is_file():
      raise ExportError(f"{directory}: corrupted export: {name} is missing")
    if _file_sha256(path) != digest:
      raise ExportError(f"{directory}: corrupted export: {name} does not match its checksum "
                        "(truncated, damaged or edited)")
  meta = json.loads((directory / METADATA_FILE).read_text())
  if meta.get("format_version") != sums["format_version"]:
    raise _old_format(directory)
  if model is not None and meta.get("model") != model:
    raise ExportError(f"{directory}: holds model {meta.get('model')!r}, "
                      f"not the requested {model!r}")
  missing = [f for f in meta["graph"]["segments"] + ([meta["onnx"]["file"]] if meta["onnx"]
                                                      else []) if f not in files]
  if missing:
    raise ExportError(f"{directory}: corrupted export: {missing[0]} is not covered by "
                      f"{CHECKSUMS_FILE}")
  return meta


def check_arrays(arrays: dict, meta: dict, directory) -> None:
  """Raises :class:`ExportError` unless ``arrays`` are exactly those the metadata records."""
  for name, info in meta["arrays"].items():
    a = arrays.get(name)
    if a is None or list(a.shape) != info["shape"] or str(a.dtype) != info["dtype"] or \
        sha256(a) != info["sha256"]:
      raise ExportError(f"{directory}: corrupted export: array {name} does not match its "
                        f"recorded shape, dtype or checksum")


def unreadable_arrays(directory, err: Exception) -> ExportError:
  """The one-line error for an export whose arrays cannot be read (the cause's first line)."""
  first = (str(err).splitlines() or [""])[0][:160]
  return ExportError(f"{directory}: corrupted export: cannot read its arrays "
                     f"({type(err).__name__}: {first})")


def check_images(images, meta: dict) -> None:
  """Raises ``ValueError`` unless ``images`` are a batch of the export's input shape, floats."""
  shape, expected = tuple(np.shape(images)), tuple(meta["input_shape"])
  if len(shape) != len(expected) + 1 or shape[1:] != expected:
    raise ValueError(f"images of shape {shape}; this export takes a batch of "
                     f"{'×'.join(map(str, expected))} images, (N, {', '.join(map(str, expected))})")
  dtype = np.dtype(getattr(images, "dtype", np.asarray(images).dtype))
  if dtype.kind != "f" and dtype.name != "bfloat16":
    raise ValueError(f"images of dtype {dtype}; this export takes floating-point images "
                     f"(uint8 pixels / {meta['input_divisor']:g})")


# --------------------------------------------------------------------------------------------
# Vectorized pooling for the reference evaluator


def _pool_windows(x, kernel_shape, strides=None, pads=None, auto_pad=None, ceil_mode=0,
                  dilations=None, **unused):
  """Sliding windows of NCHW ``x`` as ``(N, C, *out, *kernel)``, padding as NaN ("outside"),
  or None for what this does not cover (auto_pad, ceil mode, dilations)."""
  nd = len(kernel_shape)
  strides, pads = list(strides or [1] * nd), list(pads or [0] * 2 * nd)
  if ceil_mode or any(d != 1 for d in dilations or []) or auto_pad not in (None, "NOTSET"):
    return None
  x = np.pad(x.astype(np.float32, copy=False), [(0, 0), (0, 0)] +
             [(pads[i], pads[i + nd]) for i in range(nd)], constant_values=np.nan)
  v = np.lib.stride_tricks.sliding_window_view(x, kernel_shape, axis=tuple(range(2, 2 + nd)))
  return v[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]


def _fast_pool_ops() -> list[type]:
  """MaxPool / AveragePool for ``ReferenceEvaluator(new_ops=...)``: NumPy window reductions
  (the reference's loops take minutes per MNIST batch), its own code for other attributes."""
  from onnx.reference.ops import op_average_pool, op_max_pool

  def reduce(x, windows, fn):
    axes = tuple(range(-(windows.ndim - x.ndim), 0))
    return (fn(windows, axis=axes).astype(x.dtype),)

  class MaxPool(op_max_pool.MaxPool):
    def _run(self, x, **kw):
      windows = _pool_windows(x, **kw) if len(self.onnx_node.output) == 1 else None
      return super()._run(x, **kw) if windows is None else reduce(x, windows, np.nanmax)

  class AveragePool(op_average_pool.AveragePool_19):
    def _run(self, x, count_include_pad=0, **kw):
      windows = _pool_windows(x, **kw)
      if windows is None:
        return super()._run(x, count_include_pad=count_include_pad, **kw)
      if count_include_pad:
        windows = np.nan_to_num(windows)
      return reduce(x, windows, np.mean if count_include_pad else np.nanmean)

  for cls in (MaxPool, AveragePool):
    cls.op_domain = ""
  return [MaxPool, AveragePool]


# --------------------------------------------------------------------------------------------
# Runtimes


def _first_line(err: Exception) -> str:
  return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _reference(path: Path, directory: Path):
  try:
    import onnx
    from onnx.reference import ReferenceEvaluator
  except ImportError:
    raise ExportError("the NumPy runtime needs the onnx package: pip install onnx") from None
  try:
    evaluator = ReferenceEvaluator(onnx.load(path), new_ops=_fast_pool_ops())
  except Exception as err:  # e.g. an operator the reference evaluator does not implement
    raise ExportError(f"{directory}: {path.name} cannot run on onnx.reference "
                      f"({_first_line(err)})") from err
  return lambda x: evaluator.run(None, {"images": x})[0]


def _onnxruntime(path: Path, directory: Path):
  try:
    import onnxruntime
  except ImportError:
    raise ExportError("engine 'onnxruntime' needs onnxruntime: pip install onnxruntime") from None
  try:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  except Exception as err:  # onnxruntime raises its own exception types
    raise ExportError(f"{directory}: {path.name} cannot run on onnxruntime "
                      f"({_first_line(err)})") from err
  return lambda x: session.run(None, {"images": x})[0]


class Runtime:
  """An export's ONNX graph loaded without JAX: ``Runtime(dir)(images) -> logits`` (float32).

  Images are checked as :class:`ternjax.export.Inference` checks them: the export's input
  shape (any batch size; an empty batch gives an empty result), floating point, finite.
  """

  def __init__(self, directory, *, model: str | None = None, engine: str = "numpy"):
    if engine not in ENGINES:
      raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    directory = Path(directory)
    self.metadata = verify(directory, model)
    self.engine = engine
    if not self.metadata["onnx"]:
      raise ExportError(f"{directory}: exported without ONNX (onnx=False); the NumPy and "
                        "onnxruntime runtimes need its model.onnx")
    path = directory / self.metadata["onnx"]["file"]
    self._run = (_reference if engine == "numpy" else _onnxruntime)(path, directory)

  def __call__(self, images) -> np.ndarray:
    images = np.asarray(images)
    check_images(images, self.metadata)
    if len(images) == 0:
      return np.zeros((0, len(self.metadata["classes"])), np.float32)
    x = images.astype(np.float32)
    if not np.all(np.isfinite(x)):
      raise ValueError("the images hold non-finite values (NaN or infinity)")
    return np.asarray(self._run(x), np.float32)


def load(directory, *, model: str | None = None, engine: str = "numpy") -> Runtime:
  """Loads an export for inference without JAX (see :class:`Runtime`)."""
  return Runtime(directory, model=model, engine=engine)
