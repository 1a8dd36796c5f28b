"""ternjax.report: the JSON numbers equal a direct computation; the PNGs are written (without
matplotlib: the JSON, and a warning)."""

import json
import sys

import numpy as np
import pytest

from ternjax import report

pytest.importorskip("matplotlib", reason="the report needs matplotlib (extra 'report')")


def test_report_numbers_and_files(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 7, 300)
  logits = rng.normal(size=(300, 7)) + 2.5 * np.eye(7)[labels] * (rng.random(300) < 0.6)[:, None]
  names = [f"c{i}" for i in range(7)]
  exact = np.arange(100)
  out = report.write(tmp_path, logits, labels, names, subsets={"exact": exact},
                     extra={"model": "x"})
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved == json.loads(json.dumps(out)) and saved["model"] == "x"

  predicted = logits.argmax(1)
  assert saved["top1"] == pytest.approx(np.mean(predicted == labels))
  top5 = [labels[i] in np.argsort(logits[i])[-5:] for i in range(300)]
  assert saved["top5"] == pytest.approx(np.mean(top5))
  exact_top1 = np.mean(predicted[:100] == labels[:100])
  assert saved["subsets"]["exact"] == {"examples": 100, "top1": pytest.approx(exact_top1)}
  for c in range(7):
    assert saved["per_class"][f"c{c}"] == pytest.approx(np.mean(predicted[labels == c] == c))
    for p in range(7):
      assert saved["confusion"][c][p] == np.sum((labels == c) & (predicted == p))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  assert saved["mean_confidence"]["wrong"] == pytest.approx(
      probs.max(1)[predicted != labels].mean())
  for name in ("confusion.png", "confidence.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_json_is_written_and_a_warning_says_so(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
  labels = np.arange(10) % 3
  with pytest.warns(UserWarning, match=r"not drawn .*\(pip install 'ternjax\[report\]'\)"):
    out = report.write(tmp_path, np.eye(3)[labels], labels, ["a", "b", "c"])
  assert out["top1"] == 1.0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
