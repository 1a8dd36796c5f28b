"""experiments/mnist.py: bad input exits 2 with one line and changes no file; smoke runs."""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ternjax import data

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "mnist.py"
_spec = importlib.util.spec_from_file_location("mnist_cli", SCRIPT)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def test_bad_argument_subprocess_exit_2():
  proc = subprocess.run([sys.executable, str(SCRIPT), "--weights", "binary"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "--weights" in proc.stderr


def _snapshot(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
          else "dir" for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv, words", [
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "finite positive"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "5000", "--limit", "1000"], "exceeds the 1000 training examples"),
    (["--limit", "0"], "--limit"),
    (["--seed", "-1"], "--seed"),
    (["--model", "ternary_cnn", "--activations", "int8"], "int8"),
    (["--dataset", "cifar10"], "--dataset"),
    (["--out", "{tmp}/file/run"], "is a file"),
    (["--export", "{tmp}/existing"], "--overwrite"),
    (["--export", "{tmp}/run"], "different"),
])
def test_bad_arguments_one_line_nothing_written(argv, words, refused, tmp_path):
  """Refused with one line before anything is written (the flags every training script shares:
  also tests/test_cli.py)."""
  (tmp_path / "file").write_text("mine")
  (tmp_path / "existing").mkdir()
  before = _snapshot(tmp_path)
  argv = [a.format(tmp=tmp_path) for a in argv]
  err = refused(cli.main, argv + ["--out", str(tmp_path / "run")] * ("--out" not in argv))
  assert words in err
  assert _snapshot(tmp_path) == before


def test_missing_data_and_busy_run_dir_exit_2(tmp_path, monkeypatch, capsys, refused):
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "checkpoint").write_text("keep me")
  with pytest.raises(SystemExit) as exit_:
    cli.main(["--limit", "256", "--epochs", "1", "--out", str(busy)])
  assert exit_.value.code == 2 and "--resume" in capsys.readouterr().err
  assert (busy / "checkpoint").read_text() == "keep me"
  with pytest.raises(SystemExit) as exit_:  # refused before any training
    cli.main(["--limit", "256", "--epochs", "1", "--out", str(tmp_path / "new"),
              "--export", str(busy)])
  assert exit_.value.code == 2 and "--export" in capsys.readouterr().err
  assert not (tmp_path / "new").exists()

  spec = data.SPECS["mnist"]
  monkeypatch.setitem(data.SPECS, "mnist", data.Spec(spec.subdir, spec.files,
                                                      ("http://127.0.0.1:9/",)))
  monkeypatch.delenv(data.ENV_VAR, raising=False)
  monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
  monkeypatch.setattr(data, "SHIPPED_DIR", tmp_path / "shipped")
  (tmp_path / "data").mkdir()
  err = refused(cli.main, ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
  assert "train-images-idx3-ubyte.gz" in err and str(tmp_path / "data" / "mnist") in err
  assert not (tmp_path / "run").exists()


def test_smoke_mlp(tmp_path, capsys):
  result = cli.main(["--limit", "1024", "--epochs", "2", "--batch-size", "64",
                     "--out", str(tmp_path / "run")])
  out = capsys.readouterr().out
  assert "TernaryLinear" in out and "final test accuracy" in out
  assert result["test_accuracy"] > 0.5
  for name in ("config.json", "metrics.jsonl", "summary.json", "report.json", "confusion.png",
               "confidence.png"):
    assert (tmp_path / "run" / name).exists()
  report = json.loads((tmp_path / "run" / "report.json").read_text())
  assert report["top1"] == result["test_accuracy"] and report["examples"] == 1024
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["limit"] == 1024


@pytest.mark.needs("fashion_mnist")
def test_smoke_ternary_cnn_fashion(tmp_path):
  result = cli.main(["--model", "ternary_cnn", "--weights", "ttq", "--fp-first-last",
                     "--dataset", "fashion_mnist", "--limit", "256", "--epochs", "1",
                     "--batch-size", "64", "--out", str(tmp_path / "run")])
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["activations"] == "ternary" and config["dataset"] == "fashion_mnist"
  assert 0 <= result["test_accuracy"] <= 1 and result["epochs"] == 1


def test_corrupted_checkpoint_refused_then_resumed_from_previous(tmp_path, capsys, refused):
  """The reported case: one flipped byte in the last checkpoint. --resume refuses it with one
  line naming it and offering epoch 1; --resume-from 1 trains epoch 2 again."""
  run = tmp_path / "run"
  argv = ["--limit", "256", "--epochs", "2", "--batch-size", "64", "--out", str(run)]
  first = cli.main(argv)
  target = max((run / "checkpoints" / "2" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2] ^= 1
  target.write_bytes(bytes(raw))
  capsys.readouterr()
  before = _snapshot(run)
  err = refused(cli.main, argv + ["--resume"])
  assert str(run / "checkpoints" / "2") in err and "--resume-from 1" in err
  assert _snapshot(run) == before
  again = cli.main(argv + ["--resume-from", "1"])
  assert again["test_accuracy"] == first["test_accuracy"] and again["resumed_from_epoch"] == 1
