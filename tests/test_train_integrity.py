"""Nothing lost, nothing silently wrong (issue 11): verified checkpoints, settings checked before
anything is written, a run undone when it fails before its first checkpoint, non-finite stops."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import ternjax as tj
from ternjax import data, train

pytestmark = pytest.mark.usefixtures("compilation_cache")

CONFIG = train.TrainConfig(epochs=2, batch_size=64, lr=3e-3)
# SGD whose learning rate jumps to 1e28 at epoch 1.0: the loss turns NaN early in epoch 2.
BLOWS_UP = train.TrainConfig(epochs=2, batch_size=64, optimizer="sgd", lr=0.01,
                             schedule="multistep", milestones=(1,), gamma=1e30)


@pytest.fixture(scope="module")
def small():
  return data.load("mnist").subset(256)


def _mlp(sizes=(784, 256, 128, 10)):
  return tj.models.mlp(tj.QuantConfig(), sizes=sizes, rngs=nnx.Rngs(default=0, quant=1))


def _snapshot(root: Path) -> dict[str, str]:
  """Every file under ``root`` (and every folder) with the SHA-256 of its bytes."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
          else "dir" for p in sorted(root.rglob("*"))}


def _params(run: Path, epoch: int) -> list[np.ndarray]:
  path = (run / "checkpoints" / str(epoch) / "state").absolute()
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(path))


@pytest.fixture(scope="module")
def finished(small, tmp_path_factory):
  """A finished two-epoch run (checkpoints 1 and 2)."""
  run = tmp_path_factory.mktemp("finished") / "run"
  train.train_and_evaluate(CONFIG, _mlp(), small, run)
  return run


def _largest_array_file(step: Path) -> Path:
  return max((step / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def _flip_byte(step: Path):
  path = _largest_array_file(step)
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x10
  path.write_bytes(bytes(raw))


def _edit_manifest(step: Path, edit):
  path = step / "manifest" / "metadata"
  manifest = json.loads(path.read_text())
  edit(manifest)
  path.write_text(json.dumps(manifest))


def _empty(step: Path):
  for p in step.iterdir():
    shutil.rmtree(p) if p.is_dir() else p.unlink()


CORRUPTIONS = {
    "flipped byte": (_flip_byte, "checkpoint"),
    "truncated": (lambda s: _largest_array_file(s).write_bytes(b"\0" * 100), "unreadable"),
    "missing array file": (lambda s: _largest_array_file(s).unlink(), "unreadable"),
    "missing manifest": (lambda s: shutil.rmtree(s / "manifest"), "no manifest"),
    "empty step": (_empty, "no manifest"),
    "edited checksum": (lambda s: _edit_manifest(
        s, lambda m: m["arrays"][next(iter(m["arrays"]))].update(sha256="0" * 64)),
        "does not match"),
    "another run's": (lambda s: _edit_manifest(s, lambda m: m.update(config_sha256="0" * 64)),
                      "another configuration"),
    "manifest not JSON": (lambda s: (s / "manifest" / "metadata").write_text("{"),
                          "unreadable"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_bad_checkpoint_refused_and_previous_offered(kind, finished, small, tmp_path):
  """Resuming never continues from a checkpoint that fails verification: one line naming it,
  the previous good one offered, no file changed; ``resume_from`` that one redoes the epoch."""
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  corrupt, words = CORRUPTIONS[kind]
  corrupt(run / "checkpoints" / "2")
  before = _snapshot(run)
  with pytest.raises(train.TrainError) as err:
    train.train_and_evaluate(CONFIG, _mlp(), small, run, resume=True)
  message = str(err.value)
  assert "\n" not in message and words in message, message
  assert str(run / "checkpoints" / "2") in message and "--resume-from 1" in message
  assert _snapshot(run) == before
  if kind == "flipped byte":  # the reported case: resume from the good one, same result
    summary = train.train_and_evaluate(CONFIG, _mlp(), small, run, resume_from=1)
    assert summary["resumed_from_epoch"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(_params(finished, 2), _params(run, 2)))
    moved = [p for p in run.iterdir() if p.name.startswith("checkpoints-after-1")]
    assert len(moved) == 1 and (moved[0] / "2" / "manifest").exists()  # kept, not deleted


def test_no_good_checkpoint_and_unknown_epoch(finished, small, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  _flip_byte(run / "checkpoints" / "1")
  _empty(run / "checkpoints" / "2")
  before = _snapshot(run)
  with pytest.raises(train.TrainError, match="no earlier checkpoint verifies"):
    train.train_and_evaluate(CONFIG, _mlp(), small, run, resume=True)
  with pytest.raises(train.TrainError, match=r"no checkpoint of epoch 5 \(it has 1, 2\)"):
    train.train_and_evaluate(CONFIG, _mlp(), small, run, resume_from=5)
  assert _snapshot(run) == before


def test_wrong_shape_and_edited_config_refused(finished, small, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  before = _snapshot(run)
  with pytest.raises(train.TrainError, match=r"checkpoints/2: .*shape.*no earlier checkpoint"):
    train.train_and_evaluate(CONFIG, _mlp(sizes=(784, 128, 128, 10)), small, run, resume=True)
  config = run / "config.json"
  config.write_text(config.read_text().replace('"lr": 0.003', '"lr": 0.03'))
  with pytest.raises(train.TrainError, match=r"differs in train\.lr"):
    train.train_and_evaluate(CONFIG, _mlp(), small, run, resume=True)
  config.write_text(config.read_text()[:20])
  with pytest.raises(train.TrainError, match=r"config\.json: unreadable"):
    train.train_and_evaluate(CONFIG, _mlp(), small, run, resume=True)
  del before["config.json"]
  assert {k: v for k, v in _snapshot(run).items() if k != "config.json"} == before


@pytest.mark.parametrize("changes, words", [
    ({"lr": float("inf")}, "lr must be finite"),
    ({"lr": float("nan")}, "lr must be finite"),
    ({"gamma": float("nan")}, "gamma"),
    ({"milestones": (0.5, float("inf"))}, "milestones"),
    ({"seed": -1}, "seed"),
    ({"batch_size": 300}, "exceeds the 256 training examples"),
])
def test_bad_settings_write_nothing(changes, words, small, tmp_path):
  """Refused before anything is written: a fresh --out is not created, an empty one stays
  empty (so the corrected command is not refused as "not empty")."""
  empty = tmp_path / "empty"
  empty.mkdir()
  for run in (tmp_path / "new" / "run", empty):
    with pytest.raises(train.TrainError, match=words):
      train.train_and_evaluate(dataclasses.replace(CONFIG, **changes), _mlp(), small, run)
  assert sorted(tmp_path.iterdir()) == [empty] and not any(empty.iterdir())


def test_run_dir_that_is_a_file(small, tmp_path):
  (tmp_path / "file").write_text("mine")
  for run in (tmp_path / "file", tmp_path / "file" / "run"):
    with pytest.raises(train.TrainError, match="file"):
      train.train_and_evaluate(CONFIG, _mlp(), small, run)
  assert (tmp_path / "file").read_text() == "mine"


def test_non_finite_loss_stops_and_keeps_last_good(small, tmp_path):
  """NaN in epoch 2: stopped with one line, checkpoint 1 kept and verified, metrics strict JSON
  with epoch 1 only; resuming from it is possible."""
  run = tmp_path / "run"
  with pytest.raises(train.TrainError) as err:
    train.train_and_evaluate(BLOWS_UP, _mlp(), small, run)
  message = str(err.value)
  assert "epoch 2" in message and "nan" in message and "\n" not in message
  assert str(run / "checkpoints" / "1") in message
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]
  strict = lambda c: pytest.fail(f"non-strict JSON constant {c}")
  lines = [json.loads(l, parse_constant=strict)
           for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == [1] and not (run / "summary.json").exists()
  with pytest.raises(train.TrainError, match="epoch 2"):  # same settings: the same stop
    train.train_and_evaluate(BLOWS_UP, _mlp(), small, run, resume=True)


def test_failure_in_first_epoch_leaves_run_dir_as_found(small, tmp_path):
  """A fresh run that fails in epoch 1 removes what it created; an --overwrite run that fails
  puts the run it was replacing back; once its first epoch is saved that one is deleted."""
  first_epoch = dataclasses.replace(BLOWS_UP, milestones=(0.25,))
  with pytest.raises(train.TrainError, match="no epoch was saved"):
    train.train_and_evaluate(first_epoch, _mlp(), small, tmp_path / "a" / "run")
  assert not (tmp_path / "a").exists()

  run = tmp_path / "run"
  train.train_and_evaluate(dataclasses.replace(CONFIG, epochs=1), _mlp(), small, run)
  before = _snapshot(run)
  with pytest.raises(train.TrainError, match="left as it was found"):
    train.train_and_evaluate(first_epoch, _mlp(), small, run, overwrite=True)
  assert _snapshot(run) == before and sorted(tmp_path.iterdir()) == [run]
  train.train_and_evaluate(CONFIG, _mlp(), small, run, overwrite=True)
  assert json.loads((run / "summary.json").read_text())["epochs"] == 2
  assert sorted(tmp_path.iterdir()) == [run]  # the replaced run is gone, nothing left aside


def test_interrupt_in_first_epoch_leaves_run_dir_as_found(small, tmp_path, monkeypatch):
  """Ctrl-C (here at the first evaluation) before the first checkpoint: nothing left."""
  def interrupt(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(train, "evaluate", interrupt)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(CONFIG, _mlp(), small, tmp_path / "run")
  assert not any(tmp_path.iterdir())


def test_restore_model_verifies(finished, tmp_path):
  """Fine-tuning from a run (restore_model) refuses its bad checkpoint with one line."""
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  assert train.restore_model(run, _mlp()) == 2
  _flip_byte(run / "checkpoints" / "2")
  with pytest.raises(train.TrainError, match=r"checkpoints/2: corrupted checkpoint"):
    train.restore_model(run, _mlp())
  (run / "config.json").write_text("[]")
  with pytest.raises(train.TrainError, match="not a ternjax run configuration"):
    train.restore_model(run, _mlp())


def test_non_finite_state_is_never_saved(small, tmp_path):
  """A state holding infinity (here a weight the loss does not use, so the loss stays finite)
  is refused at the epoch's end, and never saved."""
  model = _mlp()
  model.unused = nnx.Param(jnp.full(3, jnp.inf))
  with pytest.raises(train.TrainError, match=r"epoch 1: \[0\]\['unused'\] became non-finite"):
    train.train_and_evaluate(CONFIG, model, small, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_json_files_are_strict():
  text = train._json({"loss": float("nan"), "x": [1.0, float("inf")], "n": 3})
  assert json.loads(text) == {"loss": None, "x": [1.0, None], "n": 3}
