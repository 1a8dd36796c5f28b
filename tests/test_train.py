"""The shared train loop: learning, determinism, schedules, run-dir safety, kill-and-resume."""

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import ternjax as tj
from ternjax import data, train
from ternjax.layers import quantized_layers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "mnist.py"
pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def small():
  return data.load("mnist").subset(512)


def _mlp(seed=0, weights="twn"):
  rngs = nnx.Rngs(default=seed, quant=seed + 1000)
  return tj.models.mlp(tj.QuantConfig(weights=weights), rngs=rngs)


def _params(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_loss_decreases_and_files_written(small, tmp_path):
  config = train.TrainConfig(epochs=3, batch_size=64, lr=3e-3, shift=1)
  summary = train.train_and_evaluate(config, _mlp(), small, tmp_path / "run")
  history = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [h["epoch"] for h in history] == [1, 2, 3]
  assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
  assert summary["test_accuracy"] > 0.5
  assert 0 < history[-1]["sparsity"] < 1 and history[-1]["lr"] < history[0]["lr"]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["train"]["batch_size"] == 64 and saved["dataset"] == "mnist"
  assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2", "3"]


def test_deterministic_given_seed(small, tmp_path):
  config = train.TrainConfig(epochs=1, batch_size=64, shift=2)
  runs = []
  for i, seed in enumerate((0, 0, 1)):
    model = _mlp(seed, weights="stochastic")
    train.train_and_evaluate(dataclasses.replace(config, seed=seed), model, small,
                             tmp_path / str(i))
    runs.append(_params(model))
  assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))
  assert not all(np.array_equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_run_dir_never_overwritten(small, tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "precious.ckpt").write_text("user data")
  config = train.TrainConfig(epochs=1, batch_size=256)
  with pytest.raises(train.TrainError, match="--resume"):
    train.train_and_evaluate(config, _mlp(), small, run)
  assert (run / "precious.ckpt").read_text() == "user data"
  train.train_and_evaluate(config, _mlp(), small, run, overwrite=True)
  assert not (run / "precious.ckpt").exists()
  with pytest.raises(ValueError, match="lr"):
    train.train_and_evaluate(dataclasses.replace(config, lr=0.1), _mlp(), small, run,
                             resume=True)


def test_resuming_a_finished_run_keeps_its_summary(small, tmp_path):
  """A finished run resumed elsewhere (to export it on another machine) reports the run as it
  was trained (device, training time), not the resuming process."""
  config = train.TrainConfig(epochs=1, batch_size=256)
  run = tmp_path / "run"
  first = train.train_and_evaluate(config, _mlp(), small, run)
  saved = json.loads((run / "summary.json").read_text())
  (run / "summary.json").write_text(json.dumps({**saved, "device": "the GPU that trained it"}))
  model = _mlp(seed=5)
  resumed = train.train_and_evaluate(config, model, small, run, resume=True)
  assert resumed["device"] == "the GPU that trained it"
  assert resumed["test_accuracy"] == first["test_accuracy"]
  metrics, _ = train.evaluate(model, small.x_test, small.y_test, config.eval_batch_size)
  assert metrics["accuracy"] == first["test_accuracy"]  # the checkpoint's model, restored


def test_schedules_and_optimizers():
  steps = 10
  c = train.TrainConfig(epochs=4, lr=0.1, warmup_epochs=1)
  _, sched = train.make_optimizer(c, steps, _mlp())
  assert float(sched(0)) == 0 and float(sched(steps)) == pytest.approx(0.1)
  assert float(sched(4 * steps)) == pytest.approx(0, abs=1e-6)
  c = train.TrainConfig(epochs=4, lr=0.1, schedule="multistep", milestones=(2, 3), gamma=0.5)
  _, sched = train.make_optimizer(c, steps, _mlp())
  assert [float(sched(s)) for s in (19, 20, 30)] == pytest.approx([0.1, 0.05, 0.025])
  c = train.TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.5, schedule="constant")
  tx, _ = train.make_optimizer(c, steps, _mlp())
  w = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(w), w)
  np.testing.assert_allclose(updates["w"], -0.05)  # decay only: -lr·wd·w
  with pytest.raises(ValueError, match="optimizer"):
    train.TrainConfig(optimizer="rmsprop")


def _moved_by_one_sgd_step(quant: tj.QuantConfig) -> dict[str, float]:
  """Parameter path -> largest change of one SGD step (lr 0.1, ``scale_lr`` 0.01) from
  gradients of ones, for an MLP quantized by ``quant``."""
  model = tj.models.mlp(quant, rngs=nnx.Rngs(default=0, quant=1))
  c = train.TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, schedule="constant",
                        scale_lr=0.01)
  optimizer = nnx.Optimizer(model, train.make_optimizer(c, 1, model)[0], wrt=nnx.Param)
  params = lambda: nnx.to_pure_dict(nnx.state(model, nnx.Param))
  before = params()
  optimizer.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), before, params())
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(moved)}


def test_scale_lr_moves_only_the_learned_scales():
  """``scale_lr`` multiplies the learning rate of TTQ's α (``quantizers.Scale``) and of
  nothing else: one SGD step from equal gradients moves α by scale_lr times a kernel entry."""
  flat = _moved_by_one_sgd_step(tj.QuantConfig(weights="ttq"))
  scales = {k: v for k, v in flat.items() if "alpha" in k}
  assert scales and all(v == pytest.approx(1e-3, rel=1e-3) for v in scales.values()), scales
  assert all(v == pytest.approx(0.1, rel=1e-3) for k, v in flat.items() if k not in scales)
  with pytest.raises(ValueError, match="scale_lr"):
    train.TrainConfig(scale_lr=0.0)


def test_activation_scale_trains_at_the_learning_rate():
  """The ternary inputs' scale is not a ``quantizers.Scale``: LSQ's gradient scale normalizes
  its gradient, so ``scale_lr`` (meant for TTQ's summed gradients) leaves it at the lr."""
  flat = _moved_by_one_sgd_step(tj.QuantConfig(activations="ternary"))
  scales = {k: v for k, v in flat.items() if "act_scale" in k}
  assert scales and all(v == pytest.approx(0.1, rel=1e-3) for v in scales.values()), scales


def test_random_shift_translates_each_image():
  images = jnp.zeros((64, 9, 9, 1)).at[:, 4, 4, 0].set(1.0)
  out = train.random_shift(images, jax.random.key(0), 2)
  assert out.shape == images.shape and float(out.sum()) == 64  # nothing falls off
  ys, xs = np.nonzero(np.asarray(out[..., 0]))[1:]
  assert np.all(np.abs(ys - 4) <= 2) and np.all(np.abs(xs - 4) <= 2)
  assert len(set(zip(ys.tolist(), xs.tolist()))) > 10  # per-example offsets
  assert train.random_shift(images, jax.random.key(0), 0) is images


def test_random_flip_and_augment():
  images = jnp.arange(64 * 4 * 5 * 3, dtype=jnp.float32).reshape(64, 4, 5, 3)
  out = train.random_flip(images, jax.random.key(0))
  flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
  kept = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
  assert out.shape == images.shape and np.all(flipped ^ kept) and 10 < flipped.sum() < 54
  config = train.TrainConfig(shift=4, flip=True)
  crop = train.augment(jnp.ones((8, 32, 32, 3)), jax.random.key(1), config)
  assert crop.shape == (8, 32, 32, 3) and 0 < float(crop.mean()) < 1  # zero-padded crops
  no_flip = dataclasses.replace(config, flip=False)
  np.testing.assert_array_equal(train.augment(images, jax.random.key(2), no_flip),
                                train.random_shift(images, jax.random.key(2), 4))


def test_scanned_chunks_equal_single_steps(small, tmp_path):
  """The default (one scan over the epoch; on a CPU one step per call), chunks of 3 steps, and
  one step per call: the same training."""
  config = train.TrainConfig(epochs=2, batch_size=64, optimizer="sgd", lr=0.05, nesterov=True,
                             weight_decay=5e-4, label_smoothing=0.1, shift=2, flip=True)
  runs = []
  for n in (0, 3, 1):
    model = _mlp(weights="stochastic")
    summary = train.train_and_evaluate(dataclasses.replace(config, steps_per_call=n), model,
                                       small, tmp_path / str(n))
    runs.append((_params(model), summary))
  for params, summary in runs[1:]:
    for a, b in zip(runs[0][0], params):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert summary["train_accuracy"] == runs[0][1]["train_accuracy"]
  assert runs[0][1]["train_images_per_s"] > 0 and runs[0][1]["compile_time_s"] > 0


def _cli(out, *extra):
  return [sys.executable, str(SCRIPT), "--limit", "1024", "--epochs", "4", "--batch-size", "64",
          "--weights", "stochastic", "--out", str(out), *extra]


def _final_params(run, epoch):
  tree = ocp.StandardCheckpointer().restore((run / "checkpoints" / str(epoch) / "state")
                                            .absolute())
  return jax.tree.leaves(tree)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_parameters(tmp_path):
  """SIGKILL a run after epoch 2 of 4 (checkpoint 1 is final by then: a save waits for the last),
  ``--resume`` it: the final parameters equal those of an uninterrupted run bit for bit."""
  spec = importlib.util.spec_from_file_location("mnist_cli", SCRIPT)
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  cli.main(_cli(tmp_path / "full")[2:])

  proc = subprocess.Popen(_cli(tmp_path / "cut"), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
  for line in proc.stdout:
    if line.startswith("epoch   2/4"):
      proc.send_signal(signal.SIGKILL)
      break
  assert proc.wait(timeout=60) == -signal.SIGKILL
  done = sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir()
                if p.name.isdigit())
  assert max(done, default=0) < 4
  resumed = subprocess.run(_cli(tmp_path / "cut", "--resume"), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stdout
  a, b = _final_params(tmp_path / "full", 4), _final_params(tmp_path / "cut", 4)
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  timing = ("epoch_time", "images_per_s", "compile_time")
  metrics = lambda run: [{k: v for k, v in json.loads(l).items() if k not in timing}
                         for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert metrics(tmp_path / "full") == metrics(tmp_path / "cut")


def test_recalibrate_batchnorm_fits_the_eval_weights():
  """One batch of every image: eval mode then normalizes exactly as train mode with the
  deterministic codes does, whatever statistics training left."""
  model = _mlp(weights="stochastic")
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      m.mean[...], m.var[...] = m.mean[...] + 5.0, m.var[...] * 100.0
  images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), np.uint8)
  x = train.preprocess(jnp.asarray(images))
  model.train()
  for _, quant in quantized_layers(model):
    quant.deterministic = True
  expected = nnx.clone(model)(x)
  train.recalibrate_batchnorm(model, images, batch_size=64)
  np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weights, recalibrated",
                         [("stochastic", True), ("admm", True), ("twn", False)])
def test_loop_recalibrates_after_the_last_epoch(weights, recalibrated, small, tmp_path):
  """Methods whose eval codes are not their training forward's get fresh BatchNorm statistics
  after the last epoch; the record keeps the accuracy from before."""
  config = train.TrainConfig(epochs=2, batch_size=64)
  train.train_and_evaluate(config, _mlp(weights=weights), small, tmp_path / "run")
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert ["test_accuracy_before_recalibration" in r for r in records] == [False, recalibrated]
