"""Ternary networks on CIFAR-10: argparse -> config -> model -> the shared loop -> report.

  python experiments/cifar10.py --model resnet20 --weights twn        # first conv float (TTQ)
  python experiments/cifar10.py --model resnet18 --weights fp         # the float twin
  python experiments/cifar10.py --model resnet18 --activations ternary
  python experiments/cifar10.py --model mobilenetv2 --fp-depthwise   # depthwise convs float
  python experiments/cifar10.py --model vit_tiny --weights twn --export exports/vit  # head float
  python experiments/cifar10.py --model resnet20 --weights ttq --init-from runs/FLOAT_RUN
  python experiments/cifar10.py --limit 512 --epochs 1 --batch-size 64   # smoke run
  python experiments/cifar10.py --model resnet18 --devices 8          # data parallel, 8 GPUs
  python experiments/cifar10.py ... --coordinator HOST:PORT --num-processes N --process-id I
                                          # one process per machine or GPU (README: "Multiple
                                          # GPUs and hosts")

Each run writes config.json, metrics.jsonl, checkpoints/, summary.json and the accuracy report
(report.json, confusion.png, confidence.png) into --out (default
runs/cifar10-MODEL-WEIGHTS[-aACT]-sSEED); a non-empty --out needs --resume (--resume-from EPOCH)
or --overwrite; bad input is one line on stderr, exit status 2 (ternjax.cli).
Augmentation (on the device): random crop of the 4-pixel zero-padded image, horizontal flip.

Data: the copy in ../shared/data is exact for the train set and test records 0..999; test
records 1000..9999 are JPEG-degraded. Every accuracy is reported on the full test set and on
the exact records (``test_accuracy_exact``) and the others (``test_accuracy_degraded``).
Results: experiments/results/cifar10.md (GPU runs through experiments/cifar10_batch.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ternjax as tj
from ternjax import cli
from ternjax import data as tjdata
from ternjax import distributed as tjdist
from ternjax import report as tjreport
from ternjax import train as tjtrain
from ternjax.layers import ACTIVATION_METHODS, WEIGHT_METHODS
from ternjax.train import SCHEDULES, TrainConfig

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck")
EXACT_TEST_RECORDS = 1000  # test records 0..999 of the shared copy are exact (its README)

# Per-model recipe: SGD with Nesterov momentum, lr ≈ 0.1 per 128 examples of the batch with a
# linear warm-up, cosine decay to 0, weight decay 5e-4, label smoothing 0.1, crop + flip. TTQ's
# learned scales at 1/100 of the lr: their SGD gradient sums over a whole channel (Adam's is
# normalized: 1).
_SGD = TrainConfig(optimizer="sgd", nesterov=True, momentum=0.9, weight_decay=5e-4,
                   label_smoothing=0.1, schedule="cosine", warmup_epochs=2, shift=4, flip=True,
                   scale_lr=0.01)
RECIPES = {
    "resnet20": dataclasses.replace(_SGD, epochs=100, batch_size=256, lr=0.2),
    "resnet18": dataclasses.replace(_SGD, epochs=40, batch_size=512, lr=0.2),
    "vgg7": dataclasses.replace(_SGD, epochs=40, batch_size=512, lr=0.1),
    "mobilenetv2": dataclasses.replace(_SGD, epochs=40, batch_size=256, lr=0.2),
    # ViT: AdamW with decoupled weight decay, a longer warm-up (transformers need one).
    "vit_tiny": dataclasses.replace(_SGD, optimizer="adamw", nesterov=False, epochs=60,
                                    batch_size=512, lr=1e-3, weight_decay=0.05,
                                    warmup_epochs=5, scale_lr=1.0),
}
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def get_config(args: argparse.Namespace) -> TrainConfig:
  """The model's recipe with the command line's overrides."""
  given = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
           "scale_lr": args.scale_lr,
           "seed": args.seed, "schedule": args.schedule, "label_smoothing": args.label_smoothing,
           "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs}
  return dataclasses.replace(RECIPES[args.model], **{k: v for k, v in given.items()
                                                      if v is not None})


def _rngs(seed: int) -> nnx.Rngs:
  key = jax.random.key(seed)
  return nnx.Rngs(default=jax.random.fold_in(key, 0), quant=jax.random.fold_in(key, 1))


def _model_default(model: str, name: str):
  """The default of a CIFAR model builder's keyword argument (False where it has none)."""
  param = inspect.signature(tj.models.CIFAR_MODELS[model]).parameters.get(name)
  return False if param is None or param.default is inspect.Parameter.empty else param.default


def build_model(args: argparse.Namespace) -> nnx.Module:
  """The model; with --init-from, the ternary twin of that float run's trained model (the
  depthwise convs stay float with --fp-depthwise: a rule)."""
  quant = tj.QuantConfig(weights=args.weights, activations=args.activations)
  options = {"fp_depthwise": True} if args.fp_depthwise else {}
  build = lambda q, fp_first, fp_last, dtype: tj.models.CIFAR_MODELS[args.model](
      q, fp_first=fp_first, fp_last=fp_last, dtype=DTYPES[dtype], rngs=_rngs(args.seed),
      **options)
  if not args.init_from:
    return build(quant, args.fp_first, args.fp_last, args.dtype)
  source = tjtrain.read_config(args.init_from)
  if source.get("model") != args.model or source.get("weights") != "fp":
    args.error(f"--init-from {args.init_from}: needs a float (--weights fp) {args.model} run, "
               f"got {source.get('weights')} {source.get('model')}")
  float_model = build(tj.QuantConfig(weights="fp", activations=source["activations"]),
                      source["fp_first"], source["fp_last"], source["dtype"])
  epoch = tjtrain.restore_model(args.init_from, float_model)
  tjdist.log(f"fine-tuning from {args.init_from}/checkpoints/{epoch}")
  rules = [tj.Rule(r".*\.depthwise", None)] if args.fp_depthwise else []
  return tj.ternarize(float_model, [*rules, tj.Rule(r".*", quant)], rngs=_rngs(args.seed + 1),
                      sample_input=jnp.zeros((1, 32, 32, 3)), keep_first=args.fp_first,
                      keep_last=args.fp_last)


def parse_args(argv=None) -> argparse.Namespace:
  p = cli.Parser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=tuple(RECIPES), default="resnet20")
  p.add_argument("--weights", choices=WEIGHT_METHODS, default="twn")
  p.add_argument("--activations", choices=ACTIVATION_METHODS, default="none",
                 help="input quantization of every layer but the first")
  p.add_argument("--fp-first", action=argparse.BooleanOptionalAction, default=True,
                 help="keep the first conv's weights float (TTQ's setting; default)")
  p.add_argument("--fp-last", action=argparse.BooleanOptionalAction,
                 help="keep the classifier's weights float (default: vit_tiny yes, others no)")
  p.add_argument("--fp-depthwise", action="store_true",
                 help="mobilenetv2: keep the depthwise convs' weights float")
  cli.add_run_arguments(p)
  p.add_argument("--schedule", choices=SCHEDULES)
  p.add_argument("--label-smoothing", type=float)
  p.add_argument("--weight-decay", type=float)
  p.add_argument("--warmup-epochs", type=float)
  p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="compute dtype")
  p.add_argument("--init-from", metavar="RUN_DIR",
                 help="fine-tune the ternary twin of this float run's last checkpoint")
  tjdist.add_arguments(p)
  args = p.parse_args(argv)
  if args.fp_depthwise and args.model != "mobilenetv2":
    p.error(f"--fp-depthwise applies to --model mobilenetv2 (no depthwise convs in {args.model})")
  if args.fp_last is None:
    args.fp_last = _model_default(args.model, "fp_last")
  if args.init_from and not (Path(args.init_from) / "config.json").is_file():
    p.error(f"--init-from {args.init_from}: no config.json there (not a run directory)")
  acts = "" if args.activations == "none" else f"-a{args.activations}"
  dw = "-fpdw" if args.fp_depthwise else ""
  args.out = args.out or f"runs/cifar10-{args.model}-{args.weights}{dw}{acts}-s{args.seed}"
  try:
    args.config = get_config(args)
    tjdist.check_arguments(args)
  except ValueError as err:
    p.error(str(err))
  args.error = p.error
  return cli.preflight(p, args)


def main(argv=None) -> dict:
  args = parse_args(argv)
  with cli.errors():
    mesh = tjdist.setup(args)
    data = tjdata.load("cifar10", source=args.source, data_dir=args.data_dir)
    if args.limit:
      data = data.subset(args.limit)
    n = len(data.y_test)
    subsets = {"exact": np.arange(min(EXACT_TEST_RECORDS, n))}
    if n > EXACT_TEST_RECORDS:
      subsets["degraded"] = np.arange(EXACT_TEST_RECORDS, n)
    model = build_model(args)
    tjdist.log(str(tj.summary(model)))
    meta = {"model": args.model, "weights": args.weights, "activations": args.activations,
            "fp_first": args.fp_first, "fp_last": args.fp_last,
            "fp_depthwise": args.fp_depthwise, "dtype": args.dtype,
            "init_from": args.init_from, "limit": args.limit}
    result = tjtrain.train_and_evaluate(args.config, model, data, args.out, resume=args.resume,
                                        resume_from=args.resume_from, overwrite=args.overwrite,
                                        meta=meta, test_subsets=subsets, mesh=mesh)
    if tjdist.is_main():  # the model holds this process's own arrays again: no peers needed
      logits = tjtrain.predict(model, data.x_test, args.config.eval_batch_size)
      tjreport.write(args.out, logits, data.y_test, CLASS_NAMES, subsets=subsets,
                     title=f"{args.model} {args.weights}", extra={**meta, "summary": result})
      if args.export:
        cli.export_trained(args, model, data, result, meta, CLASS_NAMES)
  tjdist.log(f"final test accuracy: {result['test_accuracy']:.4f} (exact records "
             f"{result['test_accuracy_exact']:.4f}; {args.model}, {args.weights}; "
             f"{result['train_time_s']:.1f} s training, {result['train_images_per_s']:,.0f} "
             f"img/s on {result['devices']} × {result['device']}) -> {args.out}/summary.json, "
             "report.json")
  return result


if __name__ == "__main__":
  main()
