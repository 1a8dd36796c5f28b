"""experiments/mnist.py: bad arguments exit 2 with one line; smoke runs on a subset."""

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


@pytest.mark.parametrize("argv, words", [
    (["--epochs", "0"], "epochs"),
    (["--lr", "-1"], "lr"),
    (["--batch-size", "0"], "batch_size"),
    (["--limit", "0"], "--limit"),
    (["--model", "ternary_cnn", "--activations", "int8"], "int8"),
    (["--dataset", "cifar10"], "--dataset"),
])
def test_bad_arguments_one_line(argv, words, capsys, tmp_path):
  with pytest.raises(SystemExit) as exit_:
    cli.main(argv + ["--out", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1 and words in err


def test_missing_data_and_busy_run_dir_exit_2(tmp_path, monkeypatch, capsys):
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
  with pytest.raises(SystemExit) as exit_:
    cli.main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1
  assert "train-images-idx3-ubyte.gz" in err and str(tmp_path / "data" / "mnist") in err


def test_smoke_mlp(tmp_path, capsys):
  result = cli.main(["--limit", "1024", "--epochs", "2", "--batch-size", "64",
                     "--out", str(tmp_path / "run")])
  out = capsys.readouterr().out
  assert "TernaryLinear" in out and "final test accuracy" in out
  assert result["test_accuracy"] > 0.5
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    assert (tmp_path / "run" / name).exists()
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["limit"] == 1024


def test_smoke_ternary_cnn_fashion(tmp_path):
  result = cli.main(["--model", "ternary_cnn", "--weights", "ttq", "--fp-first-last",
                     "--dataset", "fashion_mnist", "--limit", "256", "--epochs", "1",
                     "--batch-size", "64", "--out", str(tmp_path / "run")])
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["activations"] == "ternary" and config["dataset"] == "fashion_mnist"
  assert 0 <= result["test_accuracy"] <= 1 and result["epochs"] == 1
