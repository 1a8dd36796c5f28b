"""The one training loop every experiment shares (Flax NNX examples style).

``train_and_evaluate(config, model, data, workdir)`` trains ``model`` on a
:class:`~ternjax.data.Dataset` and leaves in ``workdir``:

* ``config.json``: the :class:`TrainConfig` and the caller's ``meta`` (model, quantization…);
* ``metrics.jsonl``: one line per epoch (train/test loss and accuracy, lr, time, images/s,
  sparsity);
* ``checkpoints/<epoch>``: Orbax checkpoints of model and optimizer, the last ``keep`` kept;
* ``summary.json``: the final numbers.

Runs are deterministic given ``config.seed``: the batch order of epoch ``e`` comes from
``numpy.random.default_rng([seed, e])`` and the augmentation key from the optimizer's step, so
``resume=True`` continues from the last checkpoint and ends with exactly the parameters of an
uninterrupted run. A non-empty ``workdir`` is never overwritten unless ``overwrite=True``.

Speed: the model and optimizer are split once (``nnx.split``) and trained by one ``jax.jit``
function of their state (donated) that runs ``lax.scan`` over a chunk of steps, gathering and
augmenting each batch on the device; Python and NNX graph work happen once per chunk (a whole
epoch by default), not once per step. The state goes back into the model at epoch ends only.
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
from ternjax.layers import TernaryOperands, quant_penalty, quant_update

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
  nesterov: bool = False                  # sgd only: Nesterov momentum
  label_smoothing: float = 0.0            # training loss only (test loss is plain)
  schedule: str = "cosine"                # 'cosine' (to 0) | 'multistep' | 'constant'
  milestones: tuple[float, ...] = (0.5, 0.75)  # multistep: epochs (fractions allowed) ...
  gamma: float = 0.1                      # ... where the lr is multiplied by gamma
  warmup_epochs: float = 0.0              # linear warm-up from 0 before the schedule
  shift: int = 0                          # augmentation: random shifts up to this many pixels
                                          # (zero fill: CIFAR's random crop of the 4-padded image)
  flip: bool = False                      # augmentation: random horizontal flips
  steps_per_call: int = 0                 # steps scanned per jitted call (0: a whole epoch)
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
    if min(self.shift, self.weight_decay, self.warmup_epochs, self.steps_per_call) < 0:
      raise ValueError("shift, weight_decay, warmup_epochs and steps_per_call must not be "
                       "negative")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


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
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
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


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
  """Mirrors each NHWC image left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1], images)


def augment(images: jax.Array, key: jax.Array, config: TrainConfig) -> jax.Array:
  """The configured augmentation: random shift (``key``), then flip (a key folded from it)."""
  images = random_shift(images, key, config.shift)
  return random_flip(images, jax.random.fold_in(key, 1)) if config.flip else images


def loss_fn(model, images, labels, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy (with label smoothing) in float32 plus the quantizers' loss
  terms (:func:`~ternjax.layers.quant_penalty`, e.g. ADMM's), and the logits."""
  logits = model(images).astype(jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  loss, penalty = optax.softmax_cross_entropy(logits, targets).mean(), quant_penalty(model)
  return (loss if penalty is None else loss + penalty), logits


def make_train_chunk(graphdef: nnx.GraphDef, config: TrainConfig):
  """``chunk(state, images, labels, batches, key) -> (state, (losses, corrects))``, jitted.

  ``state`` is ``nnx.split((model, optimizer))``'s (donated); the function runs one step per
  row of ``batches`` (indices into the device-resident ``images``/``labels``) in ``lax.scan``.
  Step ``s`` augments with ``fold_in(key, s)``, ``s`` being the optimizer's step count.
  """
  def step(state, idx, images, labels, key):
    model, optimizer = nnx.merge(graphdef, state)
    x = augment(preprocess(images[idx]), jax.random.fold_in(key, optimizer.step[...]), config)
    y = labels[idx]
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, x, y, config.label_smoothing)
    optimizer.update(model, grads)
    quant_update(model, optimizer.step[...])  # quantizer state that is not trained (ADMM's)
    return nnx.state((model, optimizer)), (loss, jnp.sum(jnp.argmax(logits, -1) == y))

  @functools.partial(jax.jit, donate_argnums=0)
  def chunk(state, images, labels, batches, key):
    return lax.scan(lambda s, idx: step(s, idx, images, labels, key), state, batches)

  return chunk


@functools.lru_cache(maxsize=16)
def _predict_fn(graphdef: nnx.GraphDef):
  return jax.jit(lambda state, images: nnx.merge(graphdef, state)(preprocess(images))
                 .astype(jnp.float32))


def predict(model, images, batch_size: int) -> np.ndarray:
  """Float32 logits of ``model`` in eval mode over ``images`` (uint8 NHWC), in batches."""
  model.eval()
  graphdef, state = nnx.split(model)
  fn = _predict_fn(graphdef)
  return np.concatenate([np.asarray(fn(state, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def evaluate(model, images, labels, batch_size: int,
             subsets: dict[str, np.ndarray] | None = None) -> tuple[dict[str, float], np.ndarray]:
  """Test loss and accuracy (also ``accuracy_<name>`` on each index subset), and the logits."""
  logits = predict(model, images, batch_size)
  labels = np.asarray(labels)
  loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), labels).mean()
  correct = logits.argmax(-1) == labels
  result = {"loss": float(loss), "accuracy": float(correct.mean())}
  for name, idx in (subsets or {}).items():
    result[f"accuracy_{name}"] = float(correct[idx].mean())
  return result, logits


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


def restore_model(workdir, model: nnx.Module) -> int:
  """Loads the model part of ``workdir``'s latest checkpoint into ``model`` (which must have
  the run's architecture); returns the checkpoint's epoch. For fine-tuning from a run."""
  workdir = Path(workdir)
  saved = json.loads((workdir / "config.json").read_text())["train"]
  config = TrainConfig(**{**saved, "milestones": tuple(saved["milestones"])})
  optimizer = nnx.Optimizer(model, make_optimizer(config, 1)[0], wrt=nnx.Param)
  with ocp.CheckpointManager(workdir.absolute() / "checkpoints") as manager:
    if manager.latest_step() is None:
      raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    return _restore(manager, model, optimizer)


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


def _chunks(batches: np.ndarray, steps_per_call: int) -> list[np.ndarray]:
  """An epoch's ``(steps, batch)`` indices cut into scanned calls (the last may be shorter)."""
  n = steps_per_call or len(batches)
  return [batches[i:i + n] for i in range(0, len(batches), n)]


def train_and_evaluate(config: TrainConfig, model: nnx.Module, data: Dataset, workdir, *,
                       resume: bool = False, overwrite: bool = False, meta: dict | None = None,
                       test_subsets: dict[str, np.ndarray] | None = None) -> dict:
  """Trains ``model`` in place as ``config`` says; returns (and saves) the final summary.

  ``test_subsets`` maps names to test-record indices whose accuracy is reported too
  (``test_accuracy_<name>``), e.g. CIFAR-10's exact records.
  """
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
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True)
  x_train, y_train, x_test, y_test = map(
      jnp.asarray, (data.x_train, data.y_train, data.x_test, data.y_test))
  aug_key = jax.random.key(config.seed)
  history_path = workdir / "metrics.jsonl"

  with ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options) as manager:
    start = _restore(manager, model, optimizer) if manager.latest_step() is not None else 0
    history = _read_metrics(history_path, start)
    history_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    if start:
      print(f"resumed from {workdir}/checkpoints/{start} (epoch {start}/{config.epochs})")
    model.train()
    graphdef, _ = nnx.split((model, optimizer))
    train_chunk = make_train_chunk(graphdef, config)
    compiled = {}  # chunk length -> compiled train_chunk (compiled ahead, timed apart)
    for epoch in range(start + 1, config.epochs + 1):
      order = np.random.default_rng([config.seed, epoch]).permutation(len(data.y_train))
      batches = order[:steps_per_epoch * config.batch_size].reshape(steps_per_epoch, -1)
      # A copy: the chunks donate their input, and the model's arrays must stay valid (the
      # checkpoint of the previous epoch may still be reading them).
      state = jax.tree.map(jnp.copy, nnx.state((model, optimizer)))
      compile_time = epoch_time = 0.0
      losses, corrects = [], []
      for idx in tqdm(_chunks(batches.astype(np.int32), config.steps_per_call),
                      desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=None):
        args = (x_train, y_train, jnp.asarray(idx), aug_key)
        if len(idx) not in compiled:
          t0 = time.perf_counter()
          compiled[len(idx)] = train_chunk.lower(state, *args).compile()
          compile_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        state, (loss, correct) = compiled[len(idx)](state, *args)
        losses.append(loss)
        corrects.append(correct.block_until_ready())
        epoch_time += time.perf_counter() - t0
      nnx.update((model, optimizer), state)
      train_loss = float(jnp.concatenate(losses).mean())
      train_accuracy = int(jnp.concatenate(corrects).sum()) / batches.size
      test, _ = evaluate(model, x_test, y_test, config.eval_batch_size, test_subsets)
      record = {"epoch": epoch, "step": int(optimizer.step[...]),
                "train_loss": train_loss, "train_accuracy": train_accuracy,
                **{f"test_{k}": v for k, v in test.items()},
                "lr": float(schedule(optimizer.step[...] - 1)), "epoch_time": epoch_time,
                "images_per_s": batches.size / epoch_time, "compile_time": compile_time,
                "sparsity": weight_sparsity(model)}
      history.append(record)
      with history_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
      manager.save(epoch, args=ocp.args.StandardSave(_to_saveable(nnx.state((model, optimizer)))))
      tqdm.write(f"epoch {epoch:3d}/{config.epochs}  loss {train_loss:.4f}  "
                 f"train acc {train_accuracy:.4f}  test acc {test['accuracy']:.4f}  "
                 f"lr {record['lr']:.2e}  {epoch_time:.1f}s  {record['images_per_s']:,.0f} img/s"
                 + (f"  (compile {compile_time:.1f}s)" if compile_time else ""))
    manager.wait_until_finished()

  if not history:  # finished before: the checkpoint holds the final model
    raise ValueError(f"{workdir}: no metrics recorded; start the run again with --overwrite")
  last = history[-1]
  train_time = sum(h["epoch_time"] for h in history)
  summary = {"test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
             **{k: v for k, v in last.items() if k.startswith("test_accuracy_")},
             "train_accuracy": last["train_accuracy"], "epochs": last["epoch"],
             "best_test_accuracy": max(h["test_accuracy"] for h in history),
             "train_time_s": train_time,
             "compile_time_s": sum(h.get("compile_time", 0.0) for h in history),
             "train_images_per_s": len(history) * steps_per_epoch * config.batch_size
                                   / train_time,
             "sparsity": last["sparsity"], "resumed_from_epoch": start,
             "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
             "jax": jax.__version__, "data_source": data.source, "data_notes": list(data.notes),
             **(meta or {})}
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary
