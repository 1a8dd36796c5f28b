"""Accuracy report of a classifier from its test logits: one JSON and two PNGs (matplotlib).

``write(workdir, logits, labels, class_names, subsets=...)`` leaves in ``workdir``:

* ``report.json``: top-1, top-5, per-class accuracy, the confusion matrix (rows: true class),
  the top-1 accuracy on each named subset of test records, mean confidence when right / wrong;
* ``confusion.png``: the confusion matrix, row-normalised;
* ``confidence.png``: histograms of the top softmax probability, right and wrong predictions.

The PNGs need the ``report`` extra (matplotlib); without it ``write`` leaves report.json alone
and warns, so that a run (``experiments/mnist.py`` after ``pip install -e .``) still ends well.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def compute(logits, labels, class_names, subsets: dict[str, np.ndarray] | None = None) -> dict:
  """The report's numbers (a JSON-ready dict)."""
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  k = len(class_names)
  predicted = logits.argmax(-1)
  correct = predicted == labels
  top5 = (np.argsort(-logits, -1)[:, :min(5, k)] == labels[:, None]).any(-1)
  confusion = np.zeros((k, k), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  confidence = _softmax(logits).max(-1)
  return {
      "examples": len(labels), "top1": float(correct.mean()), "top5": float(top5.mean()),
      "per_class": {name: float(correct[labels == c].mean()) if (labels == c).any() else None
                    for c, name in enumerate(class_names)},
      "subsets": {name: {"examples": int(correct[idx].size),
                         "top1": float(correct[idx].mean())}
                  for name, idx in (subsets or {}).items()},
      "mean_confidence": {"correct": float(confidence[correct].mean()) if correct.any() else None,
                          "wrong": float(confidence[~correct].mean()) if (~correct).any()
                          else None},
      "class_names": list(class_names), "confusion": confusion.tolist(),
  }


def _plot_confusion(report: dict, path: Path, title: str) -> None:
  from matplotlib.figure import Figure
  confusion = np.asarray(report["confusion"], np.float64)
  rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  names, k = report["class_names"], len(report["class_names"])
  fig = Figure(figsize=(1.5 + 0.6 * k, 1.2 + 0.55 * k))
  ax = fig.add_subplot()
  ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  for i in range(k):
    for j in range(k):
      ax.text(j, i, f"{int(confusion[i, j])}", ha="center", va="center", fontsize=7,
              color="white" if rates[i, j] > 0.5 else "black")
  ax.set_xticks(range(k), names, rotation=45, ha="right")
  ax.set_yticks(range(k), names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(f"{title} (top-1 {report['top1']:.2%})")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _plot_confidence(logits, labels, path: Path, title: str) -> None:
  from matplotlib.figure import Figure
  confidence = _softmax(np.asarray(logits, np.float64)).max(-1)
  correct = np.asarray(logits).argmax(-1) == np.asarray(labels)
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  bins = np.linspace(0, 1, 41)
  ax.hist(confidence[correct], bins, alpha=0.7, label=f"right ({correct.sum()})")
  ax.hist(confidence[~correct], bins, alpha=0.7, label=f"wrong ({(~correct).sum()})")
  ax.set_yscale("log")
  ax.set_xlabel("top softmax probability")
  ax.set_ylabel("test examples")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write(workdir, logits, labels, class_names, *, subsets: dict[str, np.ndarray] | None = None,
          title: str = "", extra: dict | None = None) -> dict:
  """Writes report.json, confusion.png and confidence.png into ``workdir`` (the PNGs where
  matplotlib is installed, else a warning says so); returns the report."""
  workdir = Path(workdir)
  report = {**compute(logits, labels, class_names, subsets), **(extra or {})}
  (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    warnings.warn(f"confusion.png and confidence.png not drawn in {workdir}: they need "
                  "matplotlib (pip install 'ternjax[report]'); report.json is written",
                  stacklevel=2)
    return report
  _plot_confusion(report, workdir / "confusion.png", title)
  _plot_confidence(logits, labels, workdir / "confidence.png", title)
  return report
