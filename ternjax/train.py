"""The one training loop every experiment shares (Flax NNX examples style).

``train_and_evaluate(config, model, data, workdir)`` trains ``model`` on a
:class:`~ternjax.data.Dataset` and leaves in ``workdir``:

* ``config.json``: the :class:`TrainConfig` and the caller's ``meta`` (model, quantization…);
* ``metrics.jsonl``: one line per epoch (train/test loss and accuracy, lr, time, images/s,
  sparsity);
* ``checkpoints/<epoch>``: Orbax checkpoints of model and optimizer, the last ``keep`` kept,
  each with a manifest (SHA-256 of every array and of the config) that a restore verifies;
* ``summary.json``: the final numbers.

Runs are deterministic given ``config.seed``: the batch order of epoch ``e`` comes from
``numpy.random.default_rng([seed, e])`` and the augmentation key from the optimizer's step, so
``resume=True`` continues from the last checkpoint and ends with exactly the parameters of an
uninterrupted run. A non-empty ``workdir`` is never overwritten unless ``overwrite=True``.

Nothing lost, nothing silently wrong: settings are checked before anything is written, and a
run that fails before its first checkpoint leaves ``workdir`` as it found it (a run replaced by
``overwrite`` is kept aside until then). A checkpoint that fails verification is never resumed
(the error offers the previous good one, ``resume_from``); a non-finite loss or state stops the
run before it is saved; JSON files are strict JSON (a non-finite number is written as null).
Every such refusal is a :class:`TrainError` with a one-line message that says what to do.

Speed: the model and optimizer are split once (``nnx.split``) and trained by one ``jax.jit``
function of their state (donated) that runs ``lax.scan`` over a chunk of steps, gathering and
augmenting each batch on the device; Python and NNX graph work happen once per chunk (a whole
epoch by default), not once per step. On a CPU the default is one step per call, run without a
loop: XLA:CPU runs convolution gradients many times slower inside a while loop
(experiments/results/cpu_train_loop.md), and a CPU step outlasts its dispatch. The state goes
back into the model at epoch ends only.

Data parallel: given a ``mesh`` (:func:`ternjax.distributed.setup`), each batch is sharded along
its ``data`` axis while parameters, optimizer state and the dataset are replicated; the batch
size stays global, so a run gives the same result on any number of devices and processes (up to
float rounding). Process 0 alone logs and writes files; checkpoints are saved by all together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax import lax
from jax.sharding import Mesh
from tqdm import tqdm

from ternjax import distributed
from ternjax.data import Dataset
from ternjax.layers import quant_penalty, quant_update, quantized_layers
from ternjax.quantizers import Scale
from ternjax.runtime_numpy import sha256

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "multistep", "constant")


class TrainError(ValueError):
  """A run refused or stopped (settings, run directory, checkpoint, non-finite values); the
  message is one line that says what to do."""


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
  scale_lr: float = 1.0                   # learning-rate multiplier of the quantizers'
                                          # learned scales (quantizers.Scale: TTQ's α)
  shift: int = 0                          # augmentation: random shifts up to this many pixels
                                          # (zero fill: CIFAR's random crop of the 4-padded image)
  flip: bool = False                      # augmentation: random horizontal flips
  steps_per_call: int = 0                 # steps scanned per jitted call (0: a whole epoch;
                                          # on a CPU one step, see the module docstring)
  seed: int = 0
  eval_batch_size: int = 1000
  keep: int = 2                           # checkpoints kept

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise TrainError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if self.schedule not in SCHEDULES:
      raise TrainError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    for name in ("lr", "momentum", "weight_decay", "gamma", "warmup_epochs", "label_smoothing",
                 "milestones", "scale_lr"):
      if not all(map(math.isfinite, np.ravel(getattr(self, name)))):
        raise TrainError(f"{name} must be finite, got {getattr(self, name)}")
    for name in ("epochs", "batch_size", "eval_batch_size", "keep"):
      if getattr(self, name) < 1:
        raise TrainError(f"{name} must be at least 1, got {getattr(self, name)}")
    if not (self.lr > 0 and self.scale_lr > 0):
      raise TrainError(f"lr and scale_lr must be positive, got {self.lr} and {self.scale_lr}")
    if min(self.shift, self.weight_decay, self.warmup_epochs, self.steps_per_call, self.seed) < 0:
      raise TrainError("shift, weight_decay, warmup_epochs, steps_per_call and seed must not be "
                       "negative")
    if not 0 <= self.label_smoothing < 1:
      raise TrainError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def make_optimizer(config: TrainConfig, steps_per_epoch: int, model: nnx.Module):
  """The Optax transformation of ``model``'s ``nnx.Param`` state and its learning-rate
  schedule (a function of the step); the quantizers' learned scales (``quantizers.Scale``)
  follow ``config.scale_lr`` times the schedule."""
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
  tx = _transform(config, schedule)
  if config.scale_lr != 1:
    labels = jax.tree.map(lambda v: "scales" if isinstance(v, Scale) else "rest",
                          nnx.state(model, nnx.Param),
                          is_leaf=lambda v: isinstance(v, nnx.Variable))
    scaled = _transform(config, lambda step: config.scale_lr * schedule(step))
    tx = optax.multi_transform({"rest": tx, "scales": scaled}, labels)
  return tx, schedule


def _transform(config: TrainConfig, schedule) -> optax.GradientTransformation:
  if config.optimizer == "adam":
    return optax.adam(schedule)
  if config.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))


def preprocess(images: jax.Array) -> jax.Array:
  """``uint8`` images to the models' input: float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def _pad(images: jax.Array, n: int, mode: str) -> jax.Array:
  return jnp.pad(images, ((0, 0), (n, n), (n, n), (0, 0)), mode=mode)


def random_shift(images: jax.Array, key: jax.Array, max_shift: int,
                 mode: str = "constant") -> jax.Array:
  """Translates each NHWC image by up to ``max_shift`` pixels each way; the border is filled
  with zeros (``mode='constant'``, CIFAR's crop of the padded image) or mirrored
  (``'reflect'``, airbench's)."""
  if max_shift == 0:
    return images
  _, h, w, c = images.shape
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)
  crop = lambda image, o: lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(_pad(images, max_shift, mode), offsets)


def _mirror(images: jax.Array, flip: jax.Array) -> jax.Array:
  return jnp.where(flip.reshape(-1, 1, 1, 1), images[:, :, ::-1], images)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
  """Mirrors each NHWC image left-right with probability 1/2."""
  return _mirror(images, jax.random.bernoulli(key, 0.5, (images.shape[0],)))


def alternating_flip(images: jax.Array, idx: jax.Array, key: jax.Array,
                     epoch: jax.Array) -> jax.Array:
  """airbench's flips: example ``idx[i]`` is mirrored in epoch 0 with probability 1/2 (drawn
  once from ``key``), then every other epoch the other way (so each image is seen both ways
  in any two epochs in a row)."""
  first = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i)))(idx)
  return _mirror(images, first ^ (epoch % 2 == 1))


def tta_logits(apply, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Logits of ``apply`` with test-time augmentation at airbench's three levels: none, mirror
  (mean over the image and its mirror), mirror + translate (half that, plus a quarter each of
  the same on the image shifted one pixel up-left and down-right, mirrored borders)."""
  mirror = lambda x: 0.5 * (apply(x) + apply(x[:, :, ::-1]))
  plain = apply(images)
  mirrored = 0.5 * (plain + apply(images[:, :, ::-1]))
  padded, (h, w) = _pad(images, 1, "reflect"), images.shape[1:3]
  shifted = 0.5 * (mirror(padded[:, :h, :w]) + mirror(padded[:, 2:, 2:]))
  return plain, mirrored, 0.5 * (mirrored + shifted)


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


def make_train_chunk(graphdef: nnx.GraphDef, config: TrainConfig, mesh: Mesh | None = None, *,
                     inputs=None, loss=None):
  """``chunk(state, images, labels, batches, key) -> (state, (losses, corrects))``, jitted.

  ``state`` is ``nnx.split((model, optimizer))``'s (donated); the function runs one step per
  row of ``batches`` (indices into the device-resident ``images``/``labels``) in ``lax.scan``
  (one row: the step alone, no loop).
  Step ``s`` augments with ``fold_in(key, s)``, ``s`` being the optimizer's step count. With a
  ``mesh``, each gathered batch is sharded along its ``data`` axis and the outputs replicated.
  ``inputs(batch, idx, key, s)`` (the gathered images, their indices, ``key``, the step) gives
  the model's input (default: :func:`preprocess` and the config's :func:`augment`), ``loss(model,
  x, y) -> (loss, logits)`` the loss (default: :func:`loss_fn` with the config's smoothing).
  """
  shard = _constrain(mesh, distributed.DATA)
  inputs = inputs or (lambda x, idx, key, s: augment(preprocess(x), jax.random.fold_in(key, s),
                                                     config))
  loss = loss or functools.partial(loss_fn, label_smoothing=config.label_smoothing)

  def step(state, idx, images, labels, key):
    model, optimizer = nnx.merge(graphdef, state)
    x, y = shard(images[idx]), shard(labels[idx])
    x = inputs(x, idx, key, optimizer.step[...])
    (loss_value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model, x, y)
    optimizer.update(model, grads)
    quant_update(model, optimizer.step[...])  # quantizer state that is not trained (ADMM's)
    return nnx.state((model, optimizer)), (loss_value, jnp.sum(jnp.argmax(logits, -1) == y))

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=distributed.sharding(mesh))
  def chunk(state, images, labels, batches, key):
    if batches.shape[0] == 1:
      state, out = step(state, batches[0], images, labels, key)
      return state, jax.tree.map(lambda a: a[None], out)
    return lax.scan(lambda s, idx: step(s, idx, images, labels, key), state, batches)

  return chunk


def _constrain(mesh: Mesh | None, *spec):
  """``x -> with_sharding_constraint(x, P(*spec))`` on ``mesh`` (identity without a mesh)."""
  if mesh is None:
    return lambda x: x
  return lambda x: lax.with_sharding_constraint(x, distributed.sharding(mesh, *spec))


@functools.lru_cache(maxsize=16)
def _predict_fn(graphdef: nnx.GraphDef, mesh: Mesh | None = None, shard: bool = False):
  """Jitted logits; with a ``mesh``, the batch is sharded (``shard``) and the logits replicated."""
  constrain = _constrain(mesh if shard else None, distributed.DATA)
  return jax.jit(lambda state, images: nnx.merge(graphdef, state)(preprocess(constrain(images)))
                 .astype(jnp.float32), out_shardings=distributed.sharding(mesh))


def predict(model, images, batch_size: int, mesh: Mesh | None = None) -> np.ndarray:
  """Float32 logits of ``model`` in eval mode over ``images`` (uint8 NHWC), in batches (sharded
  over ``mesh``'s devices where they divide the batch)."""
  model.eval()
  graphdef, state = nnx.split(model)
  batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
  size = 1 if mesh is None else mesh.size
  return np.concatenate([np.asarray(_predict_fn(graphdef, mesh, len(b) % size == 0)(state, b))
                         for b in batches])


def evaluate(model, images, labels, batch_size: int,
             subsets: dict[str, np.ndarray] | None = None,
             mesh: Mesh | None = None) -> tuple[dict[str, float], np.ndarray]:
  """Test loss and accuracy (also ``accuracy_<name>`` on each index subset), and the logits."""
  logits = predict(model, images, batch_size, mesh)
  labels = np.asarray(labels)
  loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), labels).mean()
  correct = logits.argmax(-1) == labels
  result = {"loss": float(loss), "accuracy": float(correct.mean())}
  for name, idx in (subsets or {}).items():
    result[f"accuracy_{name}"] = float(correct[idx].mean())
  return result, logits


def needs_recalibration(model) -> bool:
  """Whether a weight quantizer of ``model`` evaluates other weights than it trains with
  (``WeightQuantizer.eval_differs``: stochastic draws, ADMM's float forward)."""
  return any(quant.weight_quantizer.eval_differs for _, quant in quantized_layers(model))


def recalibrate_batchnorm(model, images, batch_size: int) -> None:
  """Re-estimates every BatchNorm's statistics for eval mode's weights: one pass over
  ``images`` (uint8 NHWC) in batches, the weight quantizers deterministic, BatchNorms
  normalizing by batch statistics; each BatchNorm's running mean and variance become the
  average over the batches of theirs. The statistics gathered in training belong to the
  training forward's weights (e.g. random draws), which the eval codes are not."""
  batch_norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  if not batch_norms:
    return
  model.train()
  for _, quant in quantized_layers(model):
    quant.deterministic = True
  momenta = [m.momentum for m in batch_norms]
  try:
    for m in batch_norms:
      m.momentum = 0.0  # the running statistics become the batch's
    graphdef, state = nnx.split(model)

    @jax.jit
    def batch_stats(state, x):
      m = nnx.merge(graphdef, state)
      m(preprocess(x))
      return nnx.state(m, nnx.BatchStat)

    stats = [batch_stats(state, images[i:i + batch_size])
             for i in range(0, len(images), batch_size)]
  finally:
    for m, momentum in zip(batch_norms, momenta):
      m.momentum = momentum
    model.eval()
  nnx.update(model, jax.tree.map(lambda *s: sum(s) / len(s), *stats))


def weight_sparsity(model) -> float | None:
  """Fraction of zero codes over all ternary kernels (None without ternary layers)."""
  zeros = total = 0
  for module, quant in quantized_layers(model):
    if quant.config.ternary_weights:
      t = quant.weight_codes(module.kernel[...])[0]
      zeros, total = zeros + int(jnp.sum(t == 0)), total + t.size
  return zeros / total if total else None


# --------------------------------------------------------------------------------------------
# Checkpoints (PRNG keys are stored as their raw data: Orbax saves plain arrays), each with a
# manifest item that Orbax commits atomically with the arrays: shape, dtype and SHA-256 of every
# array, and the SHA-256 of the run's config (Orbax itself checks neither the values nor which
# run they belong to: a flipped byte restores silently).


def _to_saveable(state):
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
      nnx.to_pure_dict(state))


def _leaves(tree) -> dict[str, np.ndarray]:
  """The arrays of ``tree`` on the host by tree path (``[0]['layers'][1]['kernel']``: ``[0]``
  is the model, ``[1]`` the optimizer)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def _manifest(arrays: dict[str, np.ndarray], config_sha: str) -> dict:
  return {"config_sha256": config_sha,
          "arrays": {k: dict(shape=list(v.shape), dtype=str(v.dtype), sha256=sha256(v))
                     for k, v in arrays.items()}}


def _save(manager, epoch: int, model, optimizer, config_sha: str, workdir: Path) -> None:
  """Saves checkpoint ``epoch`` and its manifest; a state holding NaN or infinity is refused."""
  tree = _to_saveable(nnx.state((model, optimizer)))
  arrays = _leaves(tree)
  bad = next((k for k, v in arrays.items()
              if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all()), None)
  if bad is not None:
    raise TrainError(f"epoch {epoch}: {bad} became non-finite; stopped without saving the "
                     f"epoch, {_kept(workdir, epoch - 1)}")
  manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                              manifest=ocp.args.JsonSave(
                                                  _manifest(arrays, config_sha))))


def _kept(workdir: Path, epoch: int) -> str:
  """What a run that stops in ``epoch + 1`` leaves behind, for its error message."""
  if epoch == 0:
    return f"no epoch was saved ({workdir} is left as it was found)"
  return f"the last good checkpoint is kept: {workdir / 'checkpoints' / str(epoch)}"


def _load(manager, step: int, template, config_sha: str):
  """Checkpoint ``step``, verified against its manifest; a TrainError naming it otherwise."""
  path = Path(manager.directory) / str(step)
  if not (path / "manifest").is_dir():  # Orbax's layout: one folder per item
    raise TrainError(f"{path}: no manifest (incomplete, or saved by an older ternjax), so it "
                     "cannot be verified")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template), manifest=ocp.args.JsonRestore()))
  except Exception as err:  # noqa: BLE001 (Orbax, TensorStore: many kinds for a bad file)
    while err.__cause__ is not None:  # the innermost cause names the file
      err = err.__cause__
    first = (str(err).strip().splitlines() or [""])[0][:240]
    raise TrainError(f"{path}: unreadable checkpoint ({type(err).__name__}: {first})") from None
  manifest = restored.manifest
  if not isinstance(manifest, dict) or not isinstance(manifest.get("arrays"), dict):
    raise TrainError(f"{path}: corrupted checkpoint (its manifest is not a ternjax one)")
  if manifest.get("config_sha256") != config_sha:
    raise TrainError(f"{path}: saved with another configuration than its run's config.json")
  recorded, found = manifest["arrays"], _manifest(_leaves(restored.state), config_sha)["arrays"]
  bad = sorted(k for k in recorded.keys() | found.keys() if recorded.get(k) != found.get(k))
  if bad:
    more = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
    raise TrainError(f"{path}: corrupted checkpoint: {bad[0]} does not match its recorded shape, "
                     f"dtype or SHA-256{more}")
  return restored.state


def _resume(manager, model, optimizer, config_sha: str, resume_from: int | None) -> int:
  """Loads the latest (or ``resume_from``) checkpoint, verified; returns its epoch (0: none).

  A checkpoint that does not verify is refused with the previous good one in the message.
  Resuming from an earlier one moves the later ones aside (into the run directory), so that
  Orbax saves the epochs again; nothing is deleted.
  """
  steps = sorted(manager.all_steps())
  directory = Path(manager.directory)
  step = resume_from if resume_from is not None else (steps[-1] if steps else 0)
  if step and step not in steps:
    raise TrainError(f"--resume-from {step}: {directory} holds no checkpoint of epoch {step} "
                     f"(it has {', '.join(map(str, steps)) or 'none'})")
  if not step:
    return 0
  state = nnx.state((model, optimizer))
  template = _to_saveable(state)
  try:
    restored = _load(manager, step, template, config_sha)
  except TrainError as err:
    good = next((s for s in reversed(steps) if s < step and _verifies(manager, s, template,
                                                                     config_sha)), None)
    offer = (f"the previous good one is epoch {good}: continue from it with --resume-from {good}"
             if good else "no earlier checkpoint verifies: start again with --overwrite or "
             "another --out")
    raise TrainError(f"{err}; not resumed, {offer} (nothing was deleted)") from None
  later = [s for s in steps if s > step]
  if later and distributed.is_main():
    aside = Path(tempfile.mkdtemp(prefix=f"checkpoints-after-{step}-", dir=directory.parent))
    for s in later:
      (directory / str(s)).rename(aside / str(s))
    print(f"moved the later checkpoints (epochs {', '.join(map(str, later))}) to {aside}")
  if later:
    distributed.barrier("later checkpoints moved")
    manager.reload()
  _put(restored, state, model, optimizer)
  return step


def _put(restored, state, model, optimizer) -> None:
  """Puts a loaded checkpoint (``_to_saveable``'s form of ``state``) into the model."""
  pure = nnx.to_pure_dict(state)
  restored = jax.tree.map(
      lambda old, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
      if jnp.issubdtype(old.dtype, jax.dtypes.prng_key) else new, pure, restored)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update((model, optimizer), state)


def _verifies(manager, step: int, template, config_sha: str) -> bool:
  try:
    _load(manager, step, template, config_sha)
  except TrainError:
    return False
  return True


def restore_model(workdir, model: nnx.Module) -> int:
  """Loads the model part of ``workdir``'s latest checkpoint, verified, into ``model`` (which
  must have the run's architecture); returns the checkpoint's epoch. For fine-tuning from a run."""
  workdir = Path(workdir)
  config_json = read_config(workdir)
  saved = config_json["train"]
  try:
    config = TrainConfig(**{**saved, "milestones": tuple(saved.get("milestones", ()))})
  except TypeError as err:  # an unknown or missing field
    message = f"{workdir}/config.json: not a run configuration of this ternjax ({err})"
    raise TrainError(message) from None
  optimizer = nnx.Optimizer(model, make_optimizer(config, 1, model)[0], wrt=nnx.Param)
  with ocp.CheckpointManager(workdir.absolute() / "checkpoints") as manager:
    step = manager.latest_step()
    if step is None:
      raise TrainError(f"{workdir}/checkpoints holds no checkpoint")
    state = nnx.state((model, optimizer))
    _put(_load(manager, step, _to_saveable(state), _config_sha(config_json)), state, model,
         optimizer)
  return step


# --------------------------------------------------------------------------------------------
# The run directory: strict JSON files, written atomically (a kill never leaves half a file)


def _json(obj, **kwargs) -> str:
  """Strict JSON (it has no NaN or Infinity): a non-finite float is written as null."""
  def clean(o):
    if isinstance(o, dict):
      return {k: clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
      return [clean(v) for v in o]
    return None if isinstance(o, float) and not math.isfinite(o) else o
  return json.dumps(clean(obj), allow_nan=False, **kwargs)


def _write(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _read_json(path: Path, lines: bool = False):
  """``path``'s JSON (``lines``: one value per line); a TrainError naming it if unreadable."""
  try:
    text = path.read_text()
    return [json.loads(l) for l in text.splitlines() if l.strip()] if lines else json.loads(text)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise TrainError(f"{path}: unreadable ({type(err).__name__}: {err}); restore the file or "
                     "start the run again in another --out") from None


def read_config(workdir) -> dict:
  """The ``config.json`` of the run in ``workdir`` (a TrainError if it is not a run's)."""
  config = _read_json(Path(workdir) / "config.json")
  if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
    raise TrainError(f"{workdir}/config.json: not a ternjax run configuration")
  return config


def _config_sha(config_json: dict) -> str:
  return hashlib.sha256(json.dumps(config_json, sort_keys=True).encode()).hexdigest()


def _same_config(saved: Path, config_json: dict) -> None:
  """Refuses to resume the run of ``saved`` (its config.json) with another configuration."""
  flat = lambda d: {f"{k}.{j}" if isinstance(v, dict) else k: w for k, v in d.items()
                    for j, w in (v.items() if isinstance(v, dict) else [(None, v)])}
  old, new = flat(_read_json(saved)), flat(config_json)
  diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  if diff:
    raise TrainError(f"--resume: {saved.parent} was started with another configuration "
                     f"(differs in {', '.join(diff)}); use another --out")


@contextlib.contextmanager
def _run_dir(workdir: Path, config_json: dict, resume: bool, overwrite: bool):
  """Prepares ``workdir`` and yields ``commit``, to call once the run's first epoch is saved.

  A non-empty ``workdir`` is refused unless resuming its run or ``overwrite``. Until ``commit``
  an exception leaves ``workdir`` as it was found: what the run created is removed, and the run
  that ``overwrite`` replaces (moved aside meanwhile) is put back; ``commit`` deletes that one.
  """
  saved = workdir / "config.json"
  if workdir.exists() and not workdir.is_dir():
    raise TrainError(f"{workdir} is a file, not a run directory; pass another --out")
  busy = workdir.exists() and any(workdir.iterdir())
  if busy and resume:
    if not saved.exists():
      raise TrainError(f"--resume: {workdir} holds no config.json, so no run to continue; pass "
                       "another --out")
    _same_config(saved, config_json)
    yield lambda: None
    return
  if busy and not overwrite:
    raise TrainError(f"{workdir} is not empty: pass --resume to continue that run, "
                     "--overwrite to delete it and start again, or another --out")
  if resume:
    print(f"note: nothing to resume in {workdir}: starting a new run")
  aside = Path(tempfile.mkdtemp(prefix=f".{workdir.name}.replaced-", dir=workdir.parent)) \
      if busy else None
  if aside:
    workdir.rename(aside / workdir.name)
  created = next((p for p in (*reversed(workdir.absolute().parents), workdir.absolute())
                  if not p.exists()), None)
  committed = False

  def commit():
    nonlocal committed
    if aside and not committed:
      shutil.rmtree(aside)
    committed = True

  try:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
      raise TrainError(f"{workdir}: cannot create the run directory ({err.strerror})") from None
    _write(saved, _json(config_json, indent=2) + "\n")
    yield commit
  except BaseException:
    if not committed:
      for path in [created] if created else list(workdir.iterdir()):
        if path.is_dir():
          shutil.rmtree(path)
        elif path.exists():
          path.unlink()
      if aside:
        (aside / workdir.name).rename(workdir)
        aside.rmdir()
    raise


def _read_metrics(path: Path, upto: int) -> list[dict]:
  """The metric lines of epochs ``<= upto`` (later ones belong to a lost, unsaved epoch)."""
  return [l for l in _read_json(path, lines=True) if l["epoch"] <= upto] if path.exists() else []


def _chunks(batches: np.ndarray, steps_per_call: int) -> list[np.ndarray]:
  """An epoch's ``(steps, batch)`` indices cut into scanned calls (the last may be shorter);
  ``steps_per_call = 0``: the whole epoch, on a CPU one step."""
  n = steps_per_call or (1 if jax.default_backend() == "cpu" else len(batches))
  return [batches[i:i + n] for i in range(0, len(batches), n)]


def train_and_evaluate(config: TrainConfig, model: nnx.Module, data: Dataset, workdir, *,
                       resume: bool = False, resume_from: int | None = None,
                       overwrite: bool = False, meta: dict | None = None,
                       test_subsets: dict[str, np.ndarray] | None = None,
                       mesh: Mesh | None = None) -> dict:
  """Trains ``model`` in place as ``config`` says; returns (and saves) the final summary.

  ``resume`` continues from the latest checkpoint in ``workdir``, ``resume_from`` from that
  epoch's (the later ones are moved aside). ``test_subsets`` maps names to test-record indices
  whose accuracy is reported too (``test_accuracy_<name>``), e.g. CIFAR-10's exact records.
  ``mesh``: train data parallel on its devices (every process calls this alike); ``None``: the
  plain loop on the default device.
  """
  workdir = Path(workdir)
  config_json = json.loads(_json({"train": dataclasses.asdict(config), "dataset": data.name,
                                  "train_examples": len(data.y_train), **(meta or {})}))
  config_sha = _config_sha(config_json)
  devices = 1 if mesh is None else mesh.size
  if config.batch_size % devices:
    raise TrainError(f"batch size {config.batch_size} is not a multiple of the {devices} "
                     "devices")
  steps_per_epoch = len(data.y_train) // config.batch_size
  if steps_per_epoch == 0:
    raise TrainError(f"batch size {config.batch_size} exceeds the {len(data.y_train)} "
                     "training examples")
  tx, schedule = make_optimizer(config, steps_per_epoch, model)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True)
  replicated, rows = distributed.sharding(mesh), distributed.sharding(mesh, None, distributed.DATA)
  x_train, y_train, x_test, y_test = distributed.put(
      (data.x_train, data.y_train, data.x_test, data.y_test), replicated)
  aug_key = distributed.put(jax.random.key(config.seed), replicated)
  nnx.update((model, optimizer), distributed.put(nnx.state((model, optimizer)), replicated))
  history_path = workdir / "metrics.jsonl"
  resume = resume or resume_from is not None

  # Process 0 alone prepares the run directory; stop_on_failure inside the manager: a lost peer
  # ends the run before the manager waits for its saves.
  with distributed.main_only(_run_dir(workdir, config_json, resume, overwrite),
                             otherwise=lambda: None) as commit, \
      ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options) as manager, \
      distributed.stop_on_failure():
    start = _resume(manager, model, optimizer, config_sha, resume_from) if resume else 0
    history = _read_metrics(history_path, start)
    if start:
      distributed.log(f"resumed from {workdir}/checkpoints/{start} "
                      f"(epoch {start}/{config.epochs})")
    model.train()
    graphdef, _ = nnx.split((model, optimizer))
    train_chunk = make_train_chunk(graphdef, config, mesh)
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
                      desc=f"epoch {epoch}/{config.epochs}", leave=False,
                      disable=None if distributed.is_main() else True):
        args = (x_train, y_train, jax.device_put(idx, rows), aug_key)
        if len(idx) not in compiled:
          t0 = time.perf_counter()
          compiled[len(idx)] = train_chunk.lower(state, *args).compile()
          compile_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        state, (loss, correct) = compiled[len(idx)](state, *args)
        losses.append(np.asarray(loss))  # the chunk's per-step losses (waits for it)
        corrects.append(correct)
        epoch_time += time.perf_counter() - t0
        if not np.isfinite(losses[-1]).all():
          i = sum(map(len, losses[:-1])) + int(np.argmin(np.isfinite(losses[-1])))
          lr = float(schedule((epoch - 1) * steps_per_epoch + i))
          raise TrainError(f"epoch {epoch}, step {i + 1}: the training loss is "
                           f"{np.concatenate(losses)[i]} (lr {lr:.3g}); stopped, "
                           f"{_kept(workdir, epoch - 1)}")
      nnx.update((model, optimizer), state)
      train_loss = float(np.concatenate(losses).mean())
      train_accuracy = int(jnp.concatenate(corrects).sum()) / batches.size
      test, _ = evaluate(model, x_test, y_test, config.eval_batch_size, test_subsets, mesh)
      recalibrated = {}
      if epoch == config.epochs and needs_recalibration(model):
        recalibrate_batchnorm(model, x_train, config.eval_batch_size)
        recalibrated = {"test_accuracy_before_recalibration": test["accuracy"]}
        test, _ = evaluate(model, x_test, y_test, config.eval_batch_size, test_subsets, mesh)
      record = {"epoch": epoch, "step": int(optimizer.step[...]),
                "train_loss": train_loss, "train_accuracy": train_accuracy,
                **{f"test_{k}": v for k, v in test.items()}, **recalibrated,
                "lr": float(schedule(optimizer.step[...] - 1)), "epoch_time": epoch_time,
                "images_per_s": batches.size / epoch_time, "compile_time": compile_time,
                "sparsity": weight_sparsity(model)}
      _save(manager, epoch, model, optimizer, config_sha, workdir)
      history.append(record)
      if distributed.is_main():
        _write(history_path, "".join(_json(h) + "\n" for h in history))
      if epoch == start + 1:  # the first checkpoint is complete: the run is no longer undone
        manager.wait_until_finished()
        commit()
      distributed.log(f"epoch {epoch:3d}/{config.epochs}  loss {train_loss:.4f}  "
                      f"train acc {train_accuracy:.4f}  test acc {test['accuracy']:.4f}  "
                      f"lr {record['lr']:.2e}  {epoch_time:.1f}s  "
                      f"{record['images_per_s']:,.0f} img/s"
                      + (f"  (compile {compile_time:.1f}s)" if compile_time else ""))
    manager.wait_until_finished()
  if mesh is not None:  # back to this process's own arrays (export, predict need no peers)
    nnx.update((model, optimizer), jax.tree.map(lambda x: x.addressable_data(0),
                                                nnx.state((model, optimizer))))

  if not history:  # finished before: the checkpoint holds the final model
    raise TrainError(f"{workdir}: no metrics recorded; start the run again with --overwrite")
  saved_summary = workdir / "summary.json"
  if start >= config.epochs and saved_summary.exists():  # nothing trained here: the summary of
    return _read_json(saved_summary)                    # the process that trained it (device)
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
             "devices": devices, "processes": jax.process_count(),
             "jax": jax.__version__, "data_source": data.source, "data_notes": list(data.notes),
             **(meta or {})}
  if distributed.is_main():
    _write(workdir / "summary.json", _json(summary, indent=2) + "\n")
  return summary
