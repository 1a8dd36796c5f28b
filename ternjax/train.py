"""The one training loop every experiment shares (Flax NNX examples style).

``train_and_evaluate(config, model, data, workdir)`` trains ``model`` on a
:class:`~ternjax.data.Dataset` and leaves in ``workdir``:

* ``config.json``: the :class:`TrainConfig` and the caller's ``meta`` (model, quantization…);
* ``metrics.jsonl``: one line per epoch (train/test loss and accuracy, lr, time, sparsity);
* ``checkpoints/<epoch>``: Orbax checkpoints of model and optimizer, the last ``keep`` kept;
* ``summary.json``: the final numbers.

Runs are deterministic given ``config.seed``: the batch order of epoch ``e`` comes from
``numpy.random.default_rng([seed, e])`` and the augmentation key from the optimizer's step, so
``resume=True`` continues from the last checkpoint and ends with exactly the parameters of an
uninterrupted run. A non-empty ``workdir`` is never overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax import lax
from tqdm import tqdm

from ternjax.data import Dataset
from ternjax.layers import TernaryOperands

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "multistep", "constant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Everything that decides a run's result (saved as ``config.json``)."""

  epochs: int = 10
  batch_size: int = 128
  optimizer: str = "adam"                 # 'adam' | 'adamw' | 'sgd' (with momentum)
  lr: float = 1e-3                        # peak learning rate
  momentum: float = 0.9                   # sgd only
  weight_decay: float = 0.0               # adamw: decoupled; sgd: added to the gradient
  schedule: str = "cosine"                # 'cosine' (to 0) | 'multistep' | 'constant'
  milestones: tuple[float, ...] = (0.5, 0.75)  # multistep: epochs (fractions allowed) ...
  gamma: float = 0.1                      # ... where the lr is multiplied by gamma
  warmup_epochs: float = 0.0              # linear warm-up from 0 before the schedule
  shift: int = 0                          # augmentation: random shifts up to this many pixels
  seed: int = 0
  eval_batch_size: int = 1000
  keep: int = 2                           # checkpoints kept

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    for name in ("epochs", "batch_size", "eval_batch_size", "keep"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
    if not self.lr > 0:
      raise ValueError(f"lr must be positive, got {self.lr}")
    if self.shift < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
      raise ValueError("shift, weight_decay and warmup_epochs must not be negative")


def make_optimizer(config: TrainConfig, steps_per_epoch: int):
  """The Optax transformation and its learning-rate schedule (a function of the step)."""
  total = config.epochs * steps_per_epoch
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(config.lr, max(total - warmup, 1))
  elif config.schedule == "multistep":
    main = optax.piecewise_constant_schedule(
        config.lr, {int(m * steps_per_epoch) - warmup: config.gamma for m in config.milestones})
  else:
    main = optax.constant_schedule(config.lr)
  schedule = main if warmup == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, config.lr, warmup), main], [warmup])
  if config.optimizer == "adam":
    tx = optax.adam(schedule)
  elif config.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum))
  return tx, schedule


def preprocess(images: jax.Array) -> jax.Array:
  """``uint8`` images to the models' input: float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Translates each NHWC image by up to ``max_shift`` pixels each way (zero fill)."""
  if max_shift == 0:
    return images
  _, h, w, c = images.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)
  crop = lambda image, o: lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(jnp.pad(images, pad), offsets)


def loss_fn(model, images, labels):
  logits = model(images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


@functools.partial(nnx.jit, static_argnames="max_shift")
def train_step(model, optimizer, metrics, images, labels, idx, key, max_shift):
  """One step on the batch ``images[idx]`` (device-resident data, gathered here)."""
  x = random_shift(preprocess(images[idx]), jax.random.fold_in(key, optimizer.step[...]),
                   max_shift)
  y = labels[idx]
  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y)
  metrics.update(loss=loss, logits=logits, labels=y)
  optimizer.update(model, grads)


@nnx.jit
def eval_step(model, metrics, images, labels):
  loss, logits = loss_fn(model, preprocess(images), labels)
  metrics.update(loss=loss, logits=logits, labels=labels)


def evaluate(model, metrics, images, labels, batch_size: int) -> dict[str, float]:
  """Test loss and accuracy (the model in eval mode), in batches."""
  model.eval()
  for i in range(0, len(labels), batch_size):
    eval_step(model, metrics, images[i:i + batch_size], labels[i:i + batch_size])
  result = {k: float(v) for k, v in metrics.compute().items()}
  metrics.reset()
  return result


def weight_sparsity(model) -> float | None:
  """Fraction of zero codes over all ternary kernels (None without ternary layers)."""
  zeros = total = 0
  for _, module in nnx.iter_modules(model):
    quant = getattr(module, "quant", None)
    if isinstance(quant, TernaryOperands) and quant.config.ternary_weights:
      t = quant.weight_codes(module.kernel[...])[0]
      zeros, total = zeros + int(jnp.sum(t == 0)), total + t.size
  return zeros / total if total else None


# --------------------------------------------------------------------------------------------
# Checkpoints (PRNG keys are stored as their raw data: Orbax saves plain arrays)


def _to_saveable(state):
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
      nnx.to_pure_dict(state))


def _restore(manager, model, optimizer) -> int:
  """Loads the latest checkpoint into ``model`` and ``optimizer``; returns its epoch."""
  step = manager.latest_step()
  state = nnx.state((model, optimizer))
  template = _to_saveable(state)
  restored = manager.restore(step, args=ocp.args.StandardRestore(template))
  pure = nnx.to_pure_dict(state)
  restored = jax.tree.map(
      lambda old, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
      if jnp.issubdtype(old.dtype, jax.dtypes.prng_key) else new, pure, restored)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update((model, optimizer), state)
  return step


def _prepare_workdir(workdir: Path, config_json: dict, resume: bool, overwrite: bool) -> None:
  """Creates ``workdir``; refuses to touch a non-empty one unless resuming or overwriting."""
  saved = workdir / "config.json"
  if workdir.exists() and any(workdir.iterdir()):
    if resume and saved.exists():
      flat = lambda d: {f"{k}.{j}" if isinstance(v, dict) else k: w for k, v in d.items()
                        for j, w in (v.items() if isinstance(v, dict) else [(None, v)])}
      old, new = flat(json.loads(saved.read_text())), flat(config_json)
      diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
      if diff:
        raise ValueError(f"--resume: {workdir} was started with another configuration "
                         f"(differs in {', '.join(diff)}); use another --out")
      return
    if not overwrite:
      raise FileExistsError(f"{workdir} is not empty: pass --resume to continue that run, "
                            "--overwrite to delete it and start again, or another --out")
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  saved.write_text(json.dumps(config_json, indent=2) + "\n")


def _read_metrics(path: Path, upto: int) -> list[dict]:
  """The metric lines of epochs ``<= upto`` (later ones belong to a lost, unsaved epoch)."""
  if not path.exists():
    return []
  lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return [l for l in lines if l["epoch"] <= upto]


def train_and_evaluate(config: TrainConfig, model: nnx.Module, data: Dataset, workdir, *,
                       resume: bool = False, overwrite: bool = False,
                       meta: dict | None = None) -> dict:
  """Trains ``model`` in place as ``config`` says; returns (and saves) the final summary."""
  workdir = Path(workdir)
  config_json = {"train": dataclasses.asdict(config), "dataset": data.name,
                 "train_examples": len(data.y_train), **(meta or {})}
  _prepare_workdir(workdir, json.loads(json.dumps(config_json)), resume, overwrite)
  steps_per_epoch = len(data.y_train) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch size {config.batch_size} exceeds the {len(data.y_train)} "
                     "training examples")
  tx, schedule = make_optimizer(config, steps_per_epoch)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True)
  x_train, y_train, x_test, y_test = map(
      jnp.asarray, (data.x_train, data.y_train, data.x_test, data.y_test))
  aug_key = jax.random.key(config.seed)
  step = nnx.cached_partial(train_step, model, optimizer, metrics)
  history_path = workdir / "metrics.jsonl"

  with ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options) as manager:
    start = _restore(manager, model, optimizer) if manager.latest_step() is not None else 0
    history = _read_metrics(history_path, start)
    history_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    if start:
      print(f"resumed from {workdir}/checkpoints/{start} (epoch {start}/{config.epochs})")
    for epoch in range(start + 1, config.epochs + 1):
      order = np.random.default_rng([config.seed, epoch]).permutation(len(data.y_train))
      batches = order[:steps_per_epoch * config.batch_size].reshape(steps_per_epoch, -1)
      model.train()
      t0 = time.perf_counter()
      for idx in tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                      disable=None):
        step(x_train, y_train, idx, aug_key, max_shift=config.shift)
      train = {k: float(v) for k, v in metrics.compute().items()}
      metrics.reset()
      epoch_time = time.perf_counter() - t0
      test = evaluate(model, metrics, x_test, y_test, config.eval_batch_size)
      record = {"epoch": epoch, "step": int(optimizer.step[...]),
                "train_loss": train["loss"], "train_accuracy": train["accuracy"],
                "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                "lr": float(schedule(optimizer.step[...] - 1)), "epoch_time": epoch_time,
                "sparsity": weight_sparsity(model)}
      history.append(record)
      with history_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
      manager.save(epoch, args=ocp.args.StandardSave(_to_saveable(nnx.state((model, optimizer)))))
      tqdm.write(f"epoch {epoch:3d}/{config.epochs}  loss {train['loss']:.4f}  "
                 f"train acc {train['accuracy']:.4f}  test acc {test['accuracy']:.4f}  "
                 f"lr {record['lr']:.2e}  {epoch_time:.1f}s")
    manager.wait_until_finished()

  if not history:  # finished before: the checkpoint holds the final model
    raise ValueError(f"{workdir}: no metrics recorded; start the run again with --overwrite")
  last = history[-1]
  summary = {"test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
             "train_accuracy": last["train_accuracy"], "epochs": last["epoch"],
             "best_test_accuracy": max(h["test_accuracy"] for h in history),
             "train_time_s": sum(h["epoch_time"] for h in history),
             "sparsity": last["sparsity"], "resumed_from_epoch": start,
             "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
             "jax": jax.__version__, "data_source": data.source, "data_notes": list(data.notes),
             **(meta or {})}
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary
