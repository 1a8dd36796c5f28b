"""Trained ternary models shipped inside the package, loadable by name and offline.

>>> from ternjax import zoo
>>> zoo.list()                                   # doctest: +SKIP
['lenet5-mnist-twn', 'mlp-mnist-twn', ...]
>>> net = zoo.load("mlp-mnist-twn")              # doctest: +SKIP
>>> logits = net(uint8_images / 255)             # doctest: +SKIP

Each entry is a folder of ``models/``: ``export/`` (a :mod:`ternjax.export` directory: packed
ternary codes, float segments, ``model.onnx``, ``checksums.json``), ``card.json`` (architecture,
method, data copy, accuracy on that copy, bits per weight, size, the command that trained it)
and ``MODEL_CARD.md`` (the same for people). ``models/index.json`` records the SHA-256 of each
entry's ``card.json`` and ``export/checksums.json``; the export's own checksums cover its other
files, so a shipped file that was changed, truncated or removed is refused (one line naming
it) before anything is run. ``experiments/build_zoo.py`` adds an entry from an export.
"""

from __future__ import annotations

import builtins
import hashlib
import json
from pathlib import Path

from ternjax.runtime_numpy import ExportError

__all__ = ["MODELS_DIR", "SIZE_LIMIT_BYTES", "SUBSETS", "ZooError", "card", "data_copy",
           "evaluate", "list", "load", "path"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
INDEX_FILE = "index.json"
SIZE_LIMIT_BYTES = 5_000_000  # the wheel's whole zoo; larger models are downloads
RUNTIMES = ("jax", "numpy", "onnxruntime")
# Fixed test subsets per dataset whose accuracy is recorded next to the whole split's: records
# 0..999 of the shared CIFAR-10 copy are the exact ones (experiments/cifar10.py).
SUBSETS = {"cifar10": {"exact": (0, 1000)}}


class ZooError(ExportError):
  """An unknown name, or a shipped entry that fails its checksums (one-line message)."""


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _index(root: Path = MODELS_DIR) -> dict:
  try:
    return json.loads((root / INDEX_FILE).read_text())["models"]
  except FileNotFoundError:
    return {}
  except (OSError, ValueError, KeyError, TypeError) as err:
    raise ZooError(f"the zoo index {root / INDEX_FILE} is unreadable ({type(err).__name__})") \
        from None


def list(root: Path = MODELS_DIR) -> builtins.list[str]:  # noqa: A001 (the API's name)
  """The names of the shipped models, sorted."""
  return sorted(_index(root))


def path(name: str, root: Path = MODELS_DIR) -> Path:
  """The export directory of entry ``name``, its card and checksums list verified against the
  index (the export's files are verified by every loader)."""
  index = _index(root)
  if name not in index:
    names = ", ".join(sorted(index)) or "none"
    raise ZooError(f"no zoo model {name!r}; available: {names}")
  entry = root / name
  for file, digest in (("card.json", index[name]["card_sha256"]),
                       ("export/checksums.json", index[name]["checksums_sha256"])):
    if not (entry / file).is_file():
      raise ZooError(f"zoo model {name}: {file} is missing; the entry is corrupted, not run")
    if _sha256(entry / file) != digest:
      raise ZooError(f"zoo model {name}: {file} does not match its checksum in {INDEX_FILE} "
                     "(damaged or edited); not run")
  return entry / "export"


def card(name: str, root: Path = MODELS_DIR) -> dict:
  """Entry ``name``'s model card (``card.json``), verified."""
  return json.loads((path(name, root).parent / "card.json").read_text())


def load(name: str, *, runtime: str = "jax", implementation=None, root: Path = MODELS_DIR):
  """Entry ``name`` loaded for inference: ``net(images) -> logits`` (images float, uint8
  pixels / the export's ``input_divisor``; ``net.metadata`` is the export's metadata).

  ``runtime``: ``'jax'`` (:func:`ternjax.export.load`, jitted; ``implementation`` selects the
  ternary ops), ``'numpy'`` or ``'onnxruntime'`` (:mod:`ternjax.runtime_numpy`, no JAX).
  Raises :class:`ZooError` for an unknown name and an :class:`ExportError` (one line) for any
  shipped file that fails its checksum.
  """
  if runtime not in RUNTIMES:
    raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
  directory = path(name, root)
  model = card(name, root)["model"]
  if runtime != "jax":
    from ternjax import runtime_numpy
    return runtime_numpy.load(directory, model=model, engine=runtime)
  from ternjax import export
  return export.load(directory, model=model, implementation=implementation)


def write_index(root: Path = MODELS_DIR) -> None:
  """Rewrites ``index.json`` from the entries' current files (the zoo builder's last step)."""
  models = {e.name: {"card_sha256": _sha256(e / "card.json"),
                     "checksums_sha256": _sha256(e / "export" / "checksums.json")}
            for e in sorted(root.iterdir()) if (e / "card.json").is_file()}
  tmp = root / f".{INDEX_FILE}.partial"
  tmp.write_text(json.dumps({"models": models}, indent=1) + "\n")
  tmp.replace(root / INDEX_FILE)


def data_copy(images, labels) -> dict:
  """What identifies a test copy: its size and the SHA-256 of its images and labels."""
  import numpy as np
  digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
  digest.update(np.ascontiguousarray(np.asarray(labels, np.int64)).tobytes())
  return {"examples": int(len(labels)), "sha256": digest.hexdigest()}


def evaluate(net, dataset, batch_size: int = 500) -> dict:
  """``net``'s accuracy on ``dataset``'s test split and its :data:`SUBSETS`, each with its
  copy's identity (:func:`data_copy`): what a card records and a test reproduces."""
  from ternjax import predict
  predictions, _ = predict.classify(net, dataset.x_test, net.metadata["input_divisor"],
                                    batch_size)
  ranges = {"test": (0, len(dataset.y_test)), **SUBSETS.get(dataset.name, {})}
  result = {}
  for subset, (start, stop) in ranges.items():
    y = dataset.y_test[start:stop]
    correct = int((predictions[start:stop] == y).sum())
    result[subset] = {"correct": correct, "examples": len(y), "accuracy": correct / len(y),
                      "records": [start, stop], "copy": data_copy(dataset.x_test[start:stop], y)}
  return result
