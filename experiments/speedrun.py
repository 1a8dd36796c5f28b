"""CIFAR-10 speedrun: airbench94 (its Muon variant) in JAX, float or ternary weights, one GPU.

  python experiments/speedrun.py --weights fp twn --runs 5 --ablation --out runs/speedrun
  python experiments/speedrun.py --weights fp --ablation fp-sgd fp-nowhiten --out runs/abl
  python experiments/speedrun.py --weights twn --epochs 12 --runs 5 --out runs/speedrun-twn12
  python experiments/speedrun.py --limit 1000 --batch-size 250 --epochs 1 --widths 8 16 16 \\
      --runs 1 --ablation-runs 1 --out /tmp/speedrun-smoke                    # CPU smoke run

The recipe (:class:`Recipe`) is KellerJordan/cifar10-airbench's ``airbench94_muon.py``: a frozen
2×2 patch-whitening stem (from 5000 training images), widths 64/256/256, BatchNorm without
scale, batch 2000 for 8 epochs (200 steps) with linear decay to 0, summed label-smoothed
(0.2) cross-entropy; Muon (optax's ``scale_by_muon``, 3 Newton-Schulz steps, Nesterov momentum
0.6, filters renormalized to Frobenius norm sqrt(out) before each step) on the group convs'
filters, Nesterov SGD (0.85) on the BatchNorm biases, the stem's bias (3 epochs only) and the
head; alternating flips, 2-pixel reflect-padded translation; test-time mirror + translate.
``--weights twn`` makes every conv of the groups ternary (TWN, ternjax's ``TernaryConv``); the
stem and the head stay float.

Everything runs on the device: the data sit there as uint8, one jitted call computes the
whitening, draws every epoch's order and scans all training steps (gather, augmentation,
step); another evaluates the test set with the three test-time-augmentation levels. Each
variant compiles once (timed apart), is warmed up with one untimed run, then trains ``--runs``
seeds. Training time: from the start of that call (whitening included, as airbench counts it)
to ``block_until_ready`` on its result; the test-time evaluation is timed apart.

Data: test records 0..999 of the shared copy are exact, 1000..9999 JPEG-degraded (its
README), so each accuracy is given on the full copy, the exact and the degraded records.
Writes results.json and results.md into --out (again after every variant, so a run stopped
early keeps the finished variants). Results: experiments/results/speedrun.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

import ternjax as tj
from ternjax import cli, models
from ternjax import data as tjdata
from ternjax import train as tjtrain

EXACT_TEST_RECORDS = 1000  # test records 0..999 of the shared copy are exact (its README)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
TTA_LEVELS = ("none", "mirror", "mirror_translate")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """airbench94_muon's hyperparameters (the learning rates are for the summed loss)."""

  weights: str = "fp"                 # the group convs: 'fp' or a ternjax weight quantizer
  epochs: int = 8
  batch_size: int = 2000
  widths: tuple[int, ...] = (64, 256, 256)
  filter_lr: float = 0.24             # Muon on the group convs' filters
  muon_momentum: float = 0.6
  ns_steps: int = 3                   # Newton-Schulz iterations
  bias_lr: float = 0.053              # Nesterov SGD: BatchNorm biases, the stem's bias
  head_lr: float = 0.67
  momentum: float = 0.85
  weight_decay: float = 2e-6 * 2000   # per step; each SGD group decays by weight_decay / its lr
  label_smoothing: float = 0.2
  whiten_bias_epochs: int = 3         # the stem's bias trains this long (lr decaying to 0)
  whiten_eps: float = 5e-4
  whiten_images: int = 5000
  translate: int = 2
  flip: str = "alternating"           # 'alternating' (airbench) | 'random' (each step)
  muon: bool = True                   # False: filters by Nesterov SGD at bias_lr / 64
  whiten: bool = True                 # False: the stem is a trained conv (Muon), random init
  dtype: str = "bfloat16"             # compute dtype (parameters stay float32)
  eval_batch_size: int = 2000


# name -> what changes from the float recipe; "what each change bought".
ABLATIONS = {
    "twn-12ep": dict(weights="twn", epochs=12),
    "fp-sgd": dict(muon=False),
    "fp-nowhiten": dict(whiten=False),
    "fp-randomflip": dict(flip="random"),
    "twn-16ep": dict(weights="twn", epochs=16),
}
SGD_FILTER_LR_DIVISOR = 64  # airbench94's bias_scaler: its filters' lr is the biases' / 64


def normalize(images: jax.Array) -> jax.Array:
  """uint8 NHWC images -> float32, per-channel CIFAR-10 mean and standard deviation."""
  return (tjtrain.preprocess(images) - jnp.array(CIFAR_MEAN)) / jnp.array(CIFAR_STD)


@functools.cache
def _builder(recipe: Recipe):
  """The recipe's model initialization as one jitted function of the key (compiled once, not
  one dispatch per initializer op)."""
  def build(key):
    return models.airbench(tj.QuantConfig(weights=recipe.weights), widths=recipe.widths,
                           dtype=DTYPES[recipe.dtype],
                           rngs=nnx.Rngs(default=jax.random.fold_in(key, 0),
                                         quant=jax.random.fold_in(key, 1)))
  return nnx.jit(build)


def build_model(recipe: Recipe, seed: int) -> models.Airbench:
  return _builder(recipe)(jax.random.key(seed))


def renormalize_filters() -> optax.GradientTransformation:
  """Adds ``p·(sqrt(out)/‖p‖ − 1)`` to each update: airbench's Muon rescales every filter bank to
  Frobenius norm sqrt(output channels) before taking its step."""
  def update(updates, state, params):
    rescale = lambda u, p: u + p * (jnp.sqrt(p.shape[-1]) / jnp.linalg.norm(p) - 1)
    return jax.tree.map(rescale, updates, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
  """airbench's parameter groups as one ``optax.multi_transform`` (labels by parameter path)."""
  total = recipe.epochs * steps_per_epoch
  decay = lambda lr, steps=total: optax.linear_schedule(lr, 0.0, steps)  # lr·(1 − step/steps)
  sgd = lambda lr, steps=total: optax.chain(
      optax.add_decayed_weights(recipe.weight_decay / lr),
      optax.sgd(decay(lr, steps), momentum=recipe.momentum, nesterov=True))
  if recipe.muon:
    conv_axes = optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    filters = optax.chain(
        optax.contrib.scale_by_muon(
            ns_steps=recipe.ns_steps, beta=recipe.muon_momentum, nesterov=True,
            weight_dimension_numbers=lambda tree: jax.tree.map(lambda _: conv_axes, tree)),
        optax.scale_by_learning_rate(decay(recipe.filter_lr)), renormalize_filters())
  else:
    filters = sgd(recipe.bias_lr / SGD_FILTER_LR_DIVISOR)
  transforms = {"frozen": optax.set_to_zero(), "filters": filters,
                "whiten_bias": sgd(recipe.bias_lr, recipe.whiten_bias_epochs * steps_per_epoch),
                "bias": sgd(recipe.bias_lr), "head": sgd(recipe.head_lr)}

  def label(path, leaf):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names[0] == "stem":
      return ("frozen" if recipe.whiten else "filters") if names[-1] == "kernel" else "whiten_bias"
    if names[0] == "head":
      return "head"
    return "filters" if leaf.ndim == 4 else "bias"

  return optax.multi_transform(transforms,
                               lambda params: jax.tree_util.tree_map_with_path(label, params))


def make_inputs(recipe: Recipe, steps_per_epoch: int):
  """The training step's input hook (``ternjax.train.make_train_chunk``'s ``inputs``)."""
  def inputs(x, idx, key, step):
    x, step_key = normalize(x), jax.random.fold_in(key, step)
    if recipe.flip == "alternating":
      flip_key, _ = jax.random.split(key)  # a stream apart from the steps' fold_in(key, step)
      x = tjtrain.alternating_flip(x, idx, flip_key, step // steps_per_epoch)
    else:
      x = tjtrain.random_flip(x, jax.random.fold_in(step_key, 1))
    return tjtrain.random_shift(x, step_key, recipe.translate, mode="reflect")
  return inputs


def summed_loss(recipe: Recipe):
  """airbench's loss: label-smoothed cross-entropy summed over the batch."""
  def loss(model, x, y):
    mean, logits = tjtrain.loss_fn(model, x, y, recipe.label_smoothing)
    return mean * y.shape[0], logits
  return loss


def make_train(graphdef: nnx.GraphDef, recipe: Recipe, train_examples: int):
  """``train(state, images, labels, key) -> (state, (losses, corrects))``, jitted: the stem's
  whitening, every epoch's order, and all steps in one ``lax.scan``."""
  steps = train_examples // recipe.batch_size
  config = tjtrain.TrainConfig(epochs=recipe.epochs, batch_size=recipe.batch_size,
                               label_smoothing=recipe.label_smoothing)
  chunk = tjtrain.make_train_chunk(graphdef, config, inputs=make_inputs(recipe, steps),
                                   loss=summed_loss(recipe))

  def order(key):
    return jax.random.permutation(key, train_examples)[:steps * recipe.batch_size]

  @functools.partial(jax.jit, donate_argnums=0)
  def train(state, images, labels, key):
    if recipe.whiten:
      model, optimizer = nnx.merge(graphdef, state)
      sample = normalize(images[:recipe.whiten_images])
      model.stem.kernel[...] = models.whitening_kernel(sample, eps=recipe.whiten_eps)
      state = nnx.state((model, optimizer))
    order_key, step_key = jax.random.split(key)
    orders = jax.vmap(order)(jax.random.split(order_key, recipe.epochs))
    return chunk(state, images, labels, orders.reshape(-1, recipe.batch_size), step_key)

  return train


def make_eval(graphdef: nnx.GraphDef, recipe: Recipe, n: int):
  """``evaluate(state, images) -> (3, n, classes)`` float32 logits at the three TTA levels."""
  batch = min(recipe.eval_batch_size, n)
  batches = math.ceil(n / batch)

  @jax.jit
  def evaluate(state, images):
    model = nnx.merge(graphdef, state)
    apply = lambda x: model(x).astype(jnp.float32)
    padded = jnp.pad(images, ((0, batches * batch - n),) + ((0, 0),) * 3)
    out = lax.map(lambda b: jnp.stack(tjtrain.tta_logits(apply, normalize(b))),
                  padded.reshape(batches, batch, *images.shape[1:]))
    return out.transpose(1, 0, 2, 3).reshape(len(TTA_LEVELS), batches * batch, -1)[:, :n]

  return evaluate


def _blocked(fn, *args):
  """``fn(*args)`` and its wall time up to ``block_until_ready``."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


class Variant:
  """One recipe compiled once (train and evaluation), then run for any number of seeds."""

  def __init__(self, name: str, recipe: Recipe, data, device_data):
    self.name, self.recipe, self.data = name, recipe, data
    self.x_train, self.y_train, self.x_test = device_data
    self.steps_per_epoch = len(data.y_train) // recipe.batch_size
    self.tx = make_optimizer(recipe, self.steps_per_epoch)
    model, optimizer = self._fresh(0)
    graphdef, state = nnx.split((model, optimizer))
    eval_graphdef, eval_state = self._eval_split(model)
    t0 = time.perf_counter()
    self.train = make_train(graphdef, recipe, len(data.y_train)).lower(
        state, self.x_train, self.y_train, jax.random.key(0)).compile()
    self.evaluate = make_eval(eval_graphdef, recipe, len(data.y_test)).lower(
        eval_state, self.x_test).compile()
    self.compile_s = time.perf_counter() - t0
    _, self.warmup_s = _blocked(self.train, state, self.x_train, self.y_train,
                                jax.random.key(0))

  def _fresh(self, seed: int):
    model = build_model(self.recipe, seed)
    model.train()
    return model, nnx.Optimizer(model, self.tx, wrt=nnx.Param)

  @staticmethod
  def _eval_split(model):
    model.eval()
    split = nnx.split(model)
    model.train()
    return split

  def run(self, seed: int) -> dict:
    """Trains seed ``seed`` from scratch; times, accuracies (each TTA level), losses."""
    model, optimizer = self._fresh(seed)
    _, state = nnx.split((model, optimizer))
    (state, (losses, corrects)), train_s = _blocked(
        self.train, state, self.x_train, self.y_train, jax.random.key(seed))
    nnx.update((model, optimizer), state)
    _, eval_state = self._eval_split(model)
    logits, eval_s = _blocked(self.evaluate, eval_state, self.x_test)
    correct = np.asarray(logits).argmax(-1) == self.data.y_test
    n, exact = len(self.data.y_test), min(EXACT_TEST_RECORDS, len(self.data.y_test))
    losses = np.asarray(losses).reshape(self.recipe.epochs, -1) / self.recipe.batch_size
    row = {"variant": self.name, "seed": seed, "train_s": train_s, "tta_eval_s": eval_s,
           "airbench_s": train_s + eval_s,  # what airbench's timer counts: both
           "epoch_train_loss": [float(v) for v in losses.mean(1)],
           "last_epoch_train_accuracy": float(np.asarray(corrects).reshape(
               self.recipe.epochs, -1)[-1].sum() / (self.steps_per_epoch
                                                    * self.recipe.batch_size))}
    for level, c in zip(TTA_LEVELS, correct):
      row[f"acc_{level}"] = float(c.mean())
      row[f"acc_exact_{level}"] = float(c[:exact].mean())
      row[f"acc_degraded_{level}"] = float(c[exact:].mean()) if n > exact else None
    return row


def _stats(values) -> dict:
  values = [v for v in values if v is not None]
  if not values:
    return {"mean": None, "std": None, "min": None, "max": None}
  return {"mean": statistics.fmean(values),
          "std": statistics.stdev(values) if len(values) > 1 else 0.0,
          "min": min(values), "max": max(values)}


def summarize(rows: list[dict]) -> dict:
  keys = ["train_s", "tta_eval_s", "airbench_s"] + [f"acc{part}_{level}" for level in TTA_LEVELS
                                      for part in ("", "_exact", "_degraded")]
  return {k: _stats([r[k] for r in rows]) for k in keys}


def markdown(results: dict) -> str:
  pct = lambda s: "-" if s["mean"] is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
  lines = [f"# CIFAR-10 speedrun ({results['device']}, jax {results['jax']})", "",
           f"Command: `{results['command']}`", "",
           "Accuracy: mean ± standard deviation over the runs, test-time mirror + translate "
           "unless said; exact = test records 0..999, degraded = 1000..9999 (JPEG). Train s: "
           "whitening + all steps, compilation apart; + eval: with the test-time-augmented "
           "evaluation (what airbench's timer counts).", "",
           "| variant | weights | epochs | runs | train s | + eval s | full % | exact % "
           "| degraded % | exact %, no TTA | exact %, mirror | full %, no TTA | compile s |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
  for name, v in results["variants"].items():
    s, r = v["summary"], v["recipe"]
    lines.append(
        f"| {name} | {r['weights']} | {r['epochs']} | {len(v['runs'])} "
        f"| {s['train_s']['mean']:.2f} ± {s['train_s']['std']:.2f} "
        f"| {s['airbench_s']['mean']:.2f} "
        f"| {pct(s['acc_mirror_translate'])} | {pct(s['acc_exact_mirror_translate'])} "
        f"| {pct(s['acc_degraded_mirror_translate'])} | {pct(s['acc_exact_none'])} "
        f"| {pct(s['acc_exact_mirror'])} | {pct(s['acc_none'])} | {v['compile_s']:.1f} |")
  lines += ["", "Per run (seed: train s, full %, exact %):", ""]
  for name, v in results["variants"].items():
    runs = ", ".join(f"{r['seed']}: {r['train_s']:.2f} s {100 * r['acc_mirror_translate']:.2f}"
                     f"/{100 * r['acc_exact_mirror_translate']:.1f}" for r in v["runs"])
    lines.append(f"- {name} (warm-up {v['warmup_s']:.2f} s): {runs}")
  return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
  p = cli.Parser(description=__doc__.splitlines()[0])
  p.add_argument("--weights", nargs="+", choices=("fp", "twn"), default=["fp"],
                 help="the main variants, --runs seeds each")
  p.add_argument("--runs", type=cli.positive_int, default=5)
  p.add_argument("--epochs", type=cli.positive_int, help="the main variants' epochs (8)")
  p.add_argument("--ablation", nargs="*", choices=tuple(ABLATIONS), metavar="NAME",
                 help=f"also run these ablation variants (no NAME: all of {', '.join(ABLATIONS)})")
  p.add_argument("--ablation-runs", type=cli.positive_int, default=3)
  p.add_argument("--batch-size", type=cli.positive_int)
  p.add_argument("--widths", type=cli.positive_int, nargs=3, metavar="W",
                 help="the conv groups' widths (64 256 256)")
  p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="compute dtype")
  p.add_argument("--data-dir", type=cli.existing_dir,
                 help=f"data root (else ${tjdata.ENV_VAR}, else ~/.cache/ternjax)")
  p.add_argument("--limit", type=cli.positive_int,
                 help="use only the first N train and test examples (smoke runs)")
  p.add_argument("--out", required=True, help="folder for results.json and results.md")
  p.add_argument("--overwrite", action="store_true", help="replace results in --out")
  args = p.parse_args(argv)
  if not hasattr(optax.contrib, "MuonDimensionNumbers"):
    p.error(f"optax {optax.__version__} has no optax.contrib.scale_by_muon for conv kernels "
            "(MuonDimensionNumbers); 0.2.8 is tested")
  out = Path(args.out)
  if out.exists() and not out.is_dir():
    p.error(f"--out {args.out} is a file, not a directory")
  if (out / "results.json").exists() and not args.overwrite:
    p.error(f"--out {args.out} holds results.json: pass --overwrite or another --out")
  given = {"batch_size": args.batch_size, "dtype": args.dtype,
           "widths": tuple(args.widths) if args.widths else None}
  base = Recipe(**{k: v for k, v in given.items() if v is not None})
  args.variants = {w: dataclasses.replace(base, weights=w, epochs=args.epochs or base.epochs)
                   for w in args.weights}
  if args.ablation is not None:
    args.variants |= {name: dataclasses.replace(base, **ABLATIONS[name])
                      for name in args.ablation or ABLATIONS}
  train_examples = args.limit or 50_000
  if base.batch_size > train_examples:
    p.error(f"--batch-size {base.batch_size} exceeds the {train_examples} training examples")
  if base.whiten_images > train_examples:
    args.variants = {k: dataclasses.replace(v, whiten_images=train_examples)
                     for k, v in args.variants.items()}
  args.error = p.error
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  with cli.errors():
    data = tjdata.load("cifar10", data_dir=args.data_dir)
  if args.limit:
    data = data.subset(args.limit)
  device_data = jax.device_put((data.x_train, data.y_train, data.x_test))
  results = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
             "jax": jax.__version__, "flax": flax.__version__,
             "optax": optax.__version__, "command": " ".join(["python", *sys.argv]),
             "data_source": data.source, "data_notes": list(data.notes), "variants": {}}
  for name, recipe in args.variants.items():
    variant = Variant(name, recipe, data, device_data)
    print(f"{name}: compiled in {variant.compile_s:.1f} s, warm-up run {variant.warmup_s:.2f} s",
          flush=True)
    runs = []
    for seed in range(args.runs if name in args.weights else args.ablation_runs):
      runs.append(variant.run(seed))
      r = runs[-1]
      print(f"  {name} seed {seed}: {r['train_s']:.2f} s train, {r['tta_eval_s']:.2f} s eval, "
            f"test {100 * r['acc_mirror_translate']:.2f}% (exact "
            f"{100 * r['acc_exact_mirror_translate']:.1f}%, no TTA "
            f"{100 * r['acc_exact_none']:.1f}%), loss by epoch "
            f"{' '.join(f'{v:.3f}' for v in r['epoch_train_loss'])}", flush=True)
    results["variants"][name] = {"recipe": dataclasses.asdict(recipe),
                                 "compile_s": variant.compile_s, "warmup_s": variant.warmup_s,
                                 "runs": runs, "summary": summarize(runs)}
    write(Path(args.out), results)  # after every variant: a run stopped early keeps the rest
  print(markdown(results))
  return results


def write(out: Path, results: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  for name, text in (("results.json", json.dumps(results, indent=2) + "\n"),
                     ("results.md", markdown(results))):
    (out / f".{name}.tmp").write_text(text)
    (out / f".{name}.tmp").replace(out / name)


if __name__ == "__main__":
  main()
