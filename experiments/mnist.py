"""Ternary networks on MNIST / Fashion-MNIST: argparse -> config -> model -> the shared loop.

  python experiments/mnist.py                                # mlp, TWN weights, all ternary
  python experiments/mnist.py --model lenet5 --weights ttq   # or twn, stochastic, fp
  python experiments/mnist.py --model ternary_cnn            # ternary weights and activations
  python experiments/mnist.py --limit 1024 --epochs 1        # smoke run on a subset
  python experiments/mnist.py ... --resume                   # continue an interrupted run
  python experiments/mnist.py ... --devices 4                # data parallel on 4 devices
  python experiments/mnist.py ... --coordinator HOST:PORT --num-processes N --process-id I
                                          # one process per machine or GPU (README: "Multiple
                                          # GPUs and hosts")

Each run writes config.json, metrics.jsonl, checkpoints/, summary.json and the accuracy report
(report.json, confusion.png, confidence.png) into --out (default
runs/mnist-MODEL-WEIGHTS-DATASET-sSEED), and refuses a non-empty --out unless given --resume
(--resume-from EPOCH) or --overwrite. Data: --data-dir (must exist), else $TERNJAX_DATA, else
~/.cache/ternjax, else (MNIST) the copy shipped in experiments/data/mnist; files found nowhere
are downloaded into the first of these when the network is up. Bad input (settings, paths,
data, a checkpoint that fails verification) is one line on stderr, exit status 2 (ternjax.cli).

Accuracy and time of each recipe, with command and machine: README.md (MNIST results) and
experiments/results/mnist.md.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
from flax import nnx

import ternjax as tj
from ternjax import cli
from ternjax import data as tjdata
from ternjax import distributed as tjdist
from ternjax import report as tjreport
from ternjax.layers import ACTIVATION_METHODS, WEIGHT_METHODS
from ternjax.train import TrainConfig, predict, train_and_evaluate

CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}

# Per-model recipe: Adam with cosine decay to 0, random shifts of up to 2 pixels.
RECIPES = {
    "mlp": TrainConfig(epochs=15, batch_size=128, lr=3e-3, shift=2),
    "lenet5": TrainConfig(epochs=30, batch_size=128, lr=2e-3, shift=2),
    "ternary_cnn": TrainConfig(epochs=40, batch_size=128, lr=2e-3, shift=2),
}


def get_config(args: argparse.Namespace) -> TrainConfig:
  """The model's recipe with the command line's overrides."""
  given = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
           "scale_lr": args.scale_lr,
           "seed": args.seed}
  return dataclasses.replace(RECIPES[args.model], **{k: v for k, v in given.items()
                                                      if v is not None})


def build_model(args: argparse.Namespace) -> nnx.Module:
  key = jax.random.key(args.seed)
  rngs = nnx.Rngs(default=jax.random.fold_in(key, 0), quant=jax.random.fold_in(key, 1))
  quant = tj.QuantConfig(weights=args.weights, activations=args.activations)
  return tj.models.MODELS[args.model](quant, fp_first_last=args.fp_first_last, rngs=rngs)


def parse_args(argv=None) -> argparse.Namespace:
  p = cli.Parser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=tuple(tj.models.MODELS), default="mlp")
  p.add_argument("--weights", choices=WEIGHT_METHODS, default="twn")
  p.add_argument("--activations", choices=ACTIVATION_METHODS, default="none",
                 help="input quantization of every layer but the first (ternary_cnn: ternary)")
  p.add_argument("--fp-first-last", action="store_true",
                 help="keep the first and last layer's weights in float32")
  p.add_argument("--dataset", choices=("mnist", "fashion_mnist"), default="mnist")
  cli.add_run_arguments(p)
  tjdist.add_arguments(p)
  args = p.parse_args(argv)
  if args.model == "ternary_cnn":
    if args.activations == "int8":
      p.error("--model ternary_cnn has ternary activations; --activations int8 does not apply")
    args.activations = "ternary"
  args.out = args.out or f"runs/mnist-{args.model}-{args.weights}-{args.dataset}-s{args.seed}"
  return cli.preflight(p, args)


def main(argv=None) -> dict:
  args = parse_args(argv)
  with cli.errors():
    mesh = tjdist.setup(args)
    config = get_config(args)
    data = tjdata.load(args.dataset, source=args.source, data_dir=args.data_dir)
    if args.limit:
      data = data.subset(args.limit)
    for note in data.notes:
      tjdist.log(f"note: {note}")
    model = build_model(args)
    tjdist.log(str(tj.summary(model)))
    meta = {"model": args.model, "weights": args.weights, "activations": args.activations,
            "fp_first_last": args.fp_first_last, "limit": args.limit}
    result = train_and_evaluate(config, model, data, args.out, resume=args.resume,
                                resume_from=args.resume_from, overwrite=args.overwrite,
                                meta=meta, mesh=mesh)
    if tjdist.is_main():  # the model holds this process's own arrays again: no peers needed
      logits = predict(model, data.x_test, config.eval_batch_size)
      tjreport.write(args.out, logits, data.y_test, CLASS_NAMES[args.dataset],
                     title=f"{args.model} {args.weights} {data.name}",
                     extra={**meta, "summary": result})
    tjdist.log(f"final test accuracy: {result['test_accuracy']:.4f} ({args.model}, "
               f"{args.weights}, {data.name}; {result['train_time_s']:.1f} s training on "
               f"{result['devices']} × {result['device']}) -> {args.out}/summary.json")
    if args.export and tjdist.is_main():
      cli.export_trained(args, model, data, result, meta, CLASS_NAMES[args.dataset])
  return result


if __name__ == "__main__":
  main()
