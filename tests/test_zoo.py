"""The model zoo shipped in the package: each entry reproduces its recorded accuracy exactly on
the test copy it names; tampered entries are refused by every runtime; unknown names list the
available ones (library and ternjax-predict)."""

import json
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from ternjax import data, predict, runtime_numpy, zoo
from ternjax.export import ExportError

NAMES = zoo.list()


def _entry(name):
  dataset = zoo.card(name)["dataset"]
  marks = [] if dataset == "mnist" else [pytest.mark.needs(dataset), pytest.mark.slow]
  return pytest.param(name, marks=marks, id=name)


def test_the_zoo_ships_models():
  assert {"mlp-mnist-twn", "lenet5-mnist-twn"} <= set(NAMES)
  size = sum(f.stat().st_size for f in zoo.MODELS_DIR.rglob("*") if f.is_file())
  assert size < zoo.SIZE_LIMIT_BYTES


def _reproduces_its_card(name, whole_test_set):
  """On CPU, by the JAX runtime: the same number of correct predictions as the card records,
  on every recorded (sub)set whose copy here is the one the card names. Without
  ``whole_test_set``, a dataset with recorded subsets (CIFAR-10) is evaluated on the records
  they cover (0..999, "exact") only."""
  card = zoo.card(name)
  dataset = data.load(card["dataset"])
  subsets = zoo.SUBSETS.get(dataset.name, {}).values()
  if subsets and not whole_test_set:
    dataset = dataset.subset(max(stop for _, stop in subsets))
  got = zoo.evaluate(zoo.load(name), dataset)
  same_copy = [s for s, r in card["accuracy"].items() if got[s]["copy"] == r["copy"]]
  assert same_copy, f"no test (sub)set here is the copy {name}'s card names: {got}"
  for subset in same_copy:
    assert got[subset]["correct"] == card["accuracy"][subset]["correct"], subset
  assert card["size"]["bits_codes"] <= 2.05 and card["command"].startswith("python ")  # format 2


@pytest.mark.parametrize("name", [_entry(n) for n in NAMES])
def test_entry_reproduces_its_recorded_accuracy(name):
  """MNIST entries on the whole test set, CIFAR-10 ones on their "exact" subset (the whole
  set is the test below: MobileNetV2 takes minutes on a CPU, in XLA's depthwise convolution)."""
  _reproduces_its_card(name, whole_test_set=False)


@pytest.mark.full_test_set
@pytest.mark.parametrize("name", [_entry(n) for n in NAMES
                                  if zoo.card(n)["dataset"] in zoo.SUBSETS])
def test_entry_reproduces_its_recorded_accuracy_on_the_whole_test_set(name):
  """The CIFAR-10 entries on all 10,000 test images (``--full-test-sets``)."""
  _reproduces_its_card(name, whole_test_set=True)


@pytest.fixture
def copied_zoo(tmp_path):
  root = tmp_path / "models"
  shutil.copytree(zoo.MODELS_DIR, root)
  return root


def _flip(path):
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x5A
  path.write_bytes(bytes(raw))


def _largest_array(entry):
  return max((f for f in (entry / "export" / "arrays").rglob("*") if f.is_file()),
             key=lambda f: f.stat().st_size)


TAMPERED = {  # edit of the entry -> the one-line refusal
    "flipped array byte": (lambda e: _flip(_largest_array(e)), r"arrays/.* does not match"),
    "onnx edited": (lambda e: _flip(e / "export" / "model.onnx"), "model.onnx does not match"),
    "array edited and checksums redone": (
        lambda e: (_flip(_largest_array(e)), (e / "export" / "checksums.json").unlink(),
                   runtime_numpy.write_checksums(e / "export")),
        "export/checksums.json does not match its checksum in index.json"),
    "card edited": (lambda e: (e / "card.json").write_text(
        (e / "card.json").read_text().replace('"correct": ', '"correct": 1')),
        "card.json does not match its checksum"),
    "segment removed": (lambda e: (e / "export" / "graph" / "segment000.jax").unlink(),
                        "segment000.jax is missing"),
}


@pytest.mark.parametrize("edit", TAMPERED)
def test_a_tampered_entry_is_refused_by_every_runtime(edit, copied_zoo):
  change, match = TAMPERED[edit]
  change(copied_zoo / "mlp-mnist-twn")
  for runtime in zoo.RUNTIMES:
    with pytest.raises(ExportError, match=match) as info:
      zoo.load("mlp-mnist-twn", runtime=runtime, root=copied_zoo)
    assert "\n" not in str(info.value)
  for other in set(NAMES) - {"mlp-mnist-twn"}:  # the other entries still load
    zoo.load(other, runtime="onnxruntime", root=copied_zoo)


def test_unknown_name_lists_the_available_ones():
  with pytest.raises(zoo.ZooError) as info:
    zoo.load("resnet50-imagenet")
  assert str(info.value) == f"no zoo model 'resnet50-imagenet'; available: {', '.join(NAMES)}"
  out = subprocess.run([sys.executable, "-m", "ternjax.predict", "--zoo", "resnet50-imagenet"],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert f"available: {', '.join(NAMES)}" in out.stderr and "Traceback" not in out.stderr


def test_predict_cli_runs_a_zoo_model(capsys):
  card = zoo.card("mlp-mnist-twn")
  assert predict.main(["--zoo", "mlp-mnist-twn", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["correct"] == card["accuracy"]["test"]["correct"]
  assert result["examples"] == 10000 and result["model"] == "mlp"
  numpy_net = zoo.load("mlp-mnist-twn", runtime="numpy")  # NumPy only: the same predictions
  x = data.load("mnist").x_test[:200].astype(np.float32) / 255
  np.testing.assert_array_equal(numpy_net(x).argmax(-1),
                                np.asarray(zoo.load("mlp-mnist-twn")(x)).argmax(-1))


@pytest.mark.parametrize("plan", ["zoo", "twins"])
def test_batch_plan_launches_its_runs(plan, experiment, tmp_path, monkeypatch):
  """cifar10_batch.py PLAN --data-dir DIR: every run starts with an all-string argv naming the
  data folder (a Path there once stopped both plans before any run)."""
  batch = experiment("cifar10_batch")
  launched = []

  class Started:
    def __init__(self, argv, **kwargs):
      launched.append(argv)

    def wait(self, timeout=None):
      return 0

  monkeypatch.setattr(batch.subprocess, "Popen", Started)
  monkeypatch.setattr(batch, "gather", lambda args, results: None)
  batch.main([plan, "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
              "--work", str(tmp_path / "work")])
  assert len(launched) == sum(map(len, batch.plans()[plan]))
  for argv in launched:
    assert all(isinstance(a, str) for a in argv), argv
  trainings = [a for a in launched if "--data-dir" in a]
  assert trainings and all(a[a.index("--data-dir") + 1] == str(tmp_path) for a in trainings)


@pytest.mark.slow
def test_build_zoo_takes_a_gpu_batch(experiment, tmp_path):
  """cifar10_batch.py's gather -> zoo_exports.tar.gz -> build_zoo.py --from-batch: the entry
  records the accuracy its export scores (here the shipped MLP's export, as a run's)."""
  batch, build_zoo = experiment("cifar10_batch"), experiment("build_zoo")
  work, out = tmp_path / "work", tmp_path / "out"
  shutil.copytree(zoo.path("mlp-mnist-twn"), work / "exports" / "resnet20-ttq")
  args = types.SimpleNamespace(work=work, out=out, plan="zoo", data_dir=data.SHIPPED_DIR)
  batch.gather(args, [{"run": "resnet20-ttq", "exit": 0, "wall_s": 1.0}])
  row, = json.loads((out / "results.json").read_text())["runs"]
  card = zoo.card("mlp-mnist-twn")
  assert row["export_accuracy"] == card["accuracy"]["test"]["accuracy"]
  assert row["disk_bytes"] == card["size"]["disk_bytes"] and row["infer_images_per_s"] > 0
  root = tmp_path / "models"
  assert build_zoo.main(["--from-batch", str(out / "zoo_exports.tar.gz"), "--root",
                         str(root)]) == 0
  assert zoo.list(root) == ["resnet20-cifar10-ttq"]
  built = zoo.card("resnet20-cifar10-ttq", root)
  assert built["accuracy"] == card["accuracy"] and built["command"] == card["command"]
