"""Training throughput, float vs ternary: the loop's own scanned step (train.make_train_chunk).

  python experiments/bench_train.py                               # every CIFAR model, recipes
  python experiments/bench_train.py --models resnet18 --batch-size 512 --steps 50

For each model and weight method: the same model, batch, dtype and optimizer (the model's
recipe in experiments/cifar10.py), on random uint8 images resident on the device. Times the
median of --repeats calls of --steps scanned steps after a warm-up call (compile time apart),
and prints ms/step, images/s and the ratio to the float step. Goal (issue 14): ternary
ResNet-18 at most 1.15x the float step (bf16, batch 512). Inference throughput from an export
is not measured here: residual models cannot be exported yet (export issue).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import DTYPES, RECIPES  # noqa: E402

import ternjax as tj  # noqa: E402
from ternjax import train  # noqa: E402


def bench(name: str, weights: str, activations: str, batch: int, dtype: str, steps: int,
          repeats: int) -> dict:
  config = dataclasses.replace(RECIPES[name], batch_size=batch)
  model = tj.models.CIFAR_MODELS[name](tj.QuantConfig(weights=weights, activations=activations),
                                       dtype=DTYPES[dtype], rngs=nnx.Rngs(0, quant=1))
  optimizer = nnx.Optimizer(model, train.make_optimizer(config, steps)[0], wrt=nnx.Param)
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (steps * batch, 32, 32, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, steps * batch), jnp.int32)
  idx = jnp.asarray(rng.permutation(steps * batch).reshape(steps, batch), jnp.int32)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  chunk = train.make_train_chunk(graphdef, config).lower(state, images, labels, idx,
                                                         key).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats + 1):  # the first call warms up
    t0 = time.perf_counter()
    state, (loss, _) = chunk(state, images, labels, idx, key)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  step_ms = 1e3 * statistics.median(times[1:]) / steps
  return {"model": name, "weights": weights, "activations": activations, "batch": batch,
          "dtype": dtype, "steps_per_call": steps, "step_ms": step_ms,
          "images_per_s": batch / step_ms * 1e3, "compile_s": compile_s,
          "final_loss": float(loss[-1])}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")
  p.add_argument("--models", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
  p.add_argument("--weights", nargs="+", choices=tj.layers.WEIGHT_METHODS,
                 default=["fp", "twn", "ttq"])
  p.add_argument("--activations", choices=tj.layers.ACTIVATION_METHODS, default="none")
  p.add_argument("--batch-size", type=int, help="default: the model's recipe")
  p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
  p.add_argument("--steps", type=int, default=50, help="scanned steps per call")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="bench_train.json")
  args = p.parse_args(argv)
  if min(args.steps, args.repeats, args.batch_size or 1) < 1:
    p.error("--steps, --repeats and --batch-size must be positive")
  rows = []
  print(f"{'model':9} {'weights':8} {'batch':>5} {'ms/step':>8} {'img/s':>9} {'x float':>7} "
        f"{'compile s':>9}")
  for name in args.models:
    floats = None
    for weights in args.weights:
      row = bench(name, weights, args.activations if weights != "fp" else "none",
                  args.batch_size or RECIPES[name].batch_size, args.dtype, args.steps,
                  args.repeats)
      floats = row["step_ms"] if weights == "fp" else floats
      row["vs_float"] = row["step_ms"] / floats if floats else None
      rows.append(row)
      ratio = f"{row['vs_float']:.3f}" if row["vs_float"] else "-"
      print(f"{name:9} {weights:8} {row['batch']:5d} {row['step_ms']:8.2f} "
            f"{row['images_per_s']:9,.0f} {ratio:>7} {row['compile_s']:9.1f}", flush=True)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "command": " ".join(sys.argv), "rows": rows}
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  return result


if __name__ == "__main__":
  main()
