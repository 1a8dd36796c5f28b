"""experiments/compare_methods.py and sweep.py: smoke runs write their files; bad input."""

import csv
import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ternjax as tj
from ternjax import data, export, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def scripts(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "experiments"))
  return importlib.import_module("compare_methods"), importlib.import_module("sweep")


def test_sweep_defaults_are_a_trial(scripts):
  """default_params names exactly the parameters suggest asks for (so that each study's first
  trial is the comparison's settings), for every method; the trial's quant is those over the
  method's DEFAULTS."""
  import optuna

  _, sweep = scripts
  methods = importlib.import_module("methods")
  _, recipe = methods.recipe("resnet20-cifar10")
  for method in methods.METHODS:
    params = sweep.default_params(method, recipe, (128, 256, 512))
    config = sweep.suggest(optuna.trial.FixedTrial(params), method, recipe.lr, (128, 256, 512))
    quant = {k: v for k, v in params.items() if k not in ("lr", "batch_size")}
    assert quant.keys() == sweep.SPACE.get(method, {}).keys()
    assert config["quant"] == methods.method_quant(method, quant)
    assert (config["lr"], config["batch_size"]) == (recipe.lr, recipe.batch_size)


@pytest.mark.slow
def test_sweep_then_compare_smoke(scripts, tmp_path, monkeypatch):
  compare, sweep = scripts
  # One compilation cache for the four runs, of every compilation (the later runs reuse the
  # earlier ones' eager operations, ONNX plugin set-up, steps).
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax-cache"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  tiny = ["--limit", "128", "--epochs", "1", "--task", "lenet5-mnist"]
  found = sweep.main([*tiny, "--methods", "admm", "--trials", "2", "--batch-sizes", "32",
                      "--parallel", "2", "--work", str(tmp_path / "sw"),
                      "--out", str(tmp_path / "sweep")])
  saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
  assert saved == json.loads(json.dumps(found))
  assert [t["state"] for t in saved["trials"]["admm"]] == ["COMPLETE", "COMPLETE"]
  first = saved["trials"]["admm"][0]["params"]  # the comparison's defaults are tried first
  defaults = importlib.import_module("methods").DEFAULTS["admm"]
  assert {k: first[k] for k in defaults} == defaults and first["admm_forward"] == "float"
  best = saved["best"]["admm"]
  assert best["batch_size"] == 32 and {"admm_rho", "admm_rho_end"} <= best["quant"].keys()
  assert 0 < best["validation_accuracy"] <= 1

  out = tmp_path / "compare"
  result = compare.main([*tiny, "--methods", "fp", "admm", "--seeds", "0",
                         "--best", str(tmp_path / "sweep" / "sweep.json"),
                         "--work", str(tmp_path / "runs"), "--out", str(out)])
  assert sorted(p.name for p in out.iterdir()) == [
      "accuracy_over_epochs.png", "accuracy_vs_size.png", "results.csv", "results.json",
      "results.md"]
  rows = list(csv.DictReader((out / "results.csv").open()))
  assert [(r["method"], r["status"]) for r in rows] == [("fp", "done"), ("admm", "done")]
  admm = next(r for r in rows if r["method"] == "admm")
  assert json.loads(admm["quant"]) == best["quant"] and float(admm["lr"]) == best["lr"]
  assert admm["size_source"] == "export on disk"
  assert int(admm["deployed_bytes"]) * 8 < int(rows[0]["deployed_bytes"])  # ternary export
  _check_admm_export(tmp_path / "runs" / "admm-s0")
  table = (out / "results.md").read_text()
  assert "| admm |" in table and "±" in table and "within 0.2 of FP" in table
  assert set(result["stats"]) == {"fp", "admm"}
  monkeypatch.setattr(compare.methods, "launch", None)  # the same command only reads them now
  again = compare.main([*tiny, "--methods", "fp", "admm", "--seeds", "0",
                        "--best", str(tmp_path / "sweep" / "sweep.json"),
                        "--work", str(tmp_path / "runs"), "--out", str(tmp_path / "again")])
  assert again["rows"] == result["rows"]


def _check_admm_export(run):
  """The export of the ADMM-trained LeNet-5 holds the projection Π(W) of its float weights
  (weight_codes) and predicts as the trained model in eval mode."""
  result = json.loads((run / "result.json").read_text())
  model = tj.models.lenet5(tj.QuantConfig(**result["quant_config"]), rngs=nnx.Rngs(0))
  train.restore_model(run, model)
  model.eval()
  net = export.load(run / "export", model="lenet5")
  assert net.metadata["method"] == "admm weights"
  fc = model.layers[9]  # FC 1024 -> 512
  t, _ = tj.quantizers.ternary_fit(fc.kernel[...], per_channel=True)
  np.testing.assert_array_equal(fc.quant.weight_codes(fc.kernel[...])[0], t)
  layer = next(l for l in net.metadata["layers"] if l["name"] == "layers/9")
  assert layer["export"].startswith("ternary")
  np.testing.assert_array_equal(tj.unpack_bitplanes(net.params["layers/9/codes"], jnp.int8), t)
  x = jnp.asarray(data.load("mnist").subset(64).x_test)
  expected = model(train.preprocess(x))
  np.testing.assert_array_equal(np.argmax(net(x / 255), -1), np.argmax(expected, -1))
  np.testing.assert_allclose(net(x / 255), expected, rtol=1e-3, atol=1e-3)


def test_a_finished_run_is_read_only_for_its_own_spec(scripts, tmp_path, monkeypatch):
  methods = scripts[0].methods
  spec = {"task": "lenet5-mnist", "method": "twn", "seed": 0, "epochs": None,
          "quant": {"delta": 0.6}, "workdir": str(tmp_path)}
  (tmp_path / "result.json").write_text(json.dumps({"epochs": 30, "spec": spec}))
  assert methods.finished(spec)["epochs"] == 30
  assert methods.finished({**spec, "quant": {"delta": 0.7}}) is None
  assert methods.finished({**spec, "overwrite": True}) is None
  (tmp_path / "other").mkdir()
  for corrupted in ('{"epochs": 30, "sp', "[1, 2]"):  # cut while written; not a result
    (tmp_path / "other" / "result.json").write_text(corrupted)
    assert methods.finished({**spec, "workdir": str(tmp_path / "other")}) is None
  seen = []
  monkeypatch.setattr(methods, "launch", None)  # nothing is started
  methods.run_all([spec], 1, on_done=lambda *a: seen.append(a[1:3]))
  assert seen == [({"epochs": 30, "spec": spec}, None)]


@pytest.mark.parametrize("script,argv,words", [
    ("compare_methods.py", ["--best", "missing.json"], "--best missing.json"),
    ("compare_methods.py", ["--parallel", "0"], "must be positive"),
    ("compare_methods.py", ["--methods", "sign"], "invalid choice"),
    ("sweep.py", ["--trials", "0"], "--trials must be positive"),
])
def test_bad_arguments_one_line_exit_2(script, argv, words, tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *argv],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120)
  assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_time_limit_kills_runs_and_says_so(scripts, tmp_path):
  compare, _ = scripts
  compare.main(["--limit", "128", "--epochs", "1", "--methods", "twn", "--seeds", "0",
                "--time-limit", "1", "--work", str(tmp_path / "runs"),
                "--out", str(tmp_path / "out")])
  rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
  assert [r["status"] for r in rows] == ["killed at the time limit (0 epochs saved)"]
  assert "Runs without a result" in (tmp_path / "out" / "results.md").read_text()
