"""Training throughput, float vs ternary: the loop's own scanned step (train.make_train_chunk).

  python experiments/bench_train.py                               # every CIFAR model, recipes
  python experiments/bench_train.py --models resnet18 --batch-size 512 --steps 50
  python experiments/bench_train.py --models resnet18 --weights twn --devices 1   # mesh cost

For each model and weight method: the same model, batch, dtype and optimizer (the model's
recipe in experiments/cifar10.py), on random uint8 images resident on the device. Times the
median of --repeats calls of --steps scanned steps after a warm-up call (compile time apart),
and prints ms/step, images/s and the ratio to the float step. Goal (issue 14): ternary
ResNet-18 at most 1.15x the float step (bf16, batch 512). Inference throughput from an export
is not measured here: residual models cannot be exported yet (export issue).

``--devices N`` also times the data-parallel step (batch sharded over a mesh of N devices,
state replicated: ternjax.distributed), its calls interleaved with the plain step's, and prints
its time over the plain step's ("x plain"). Goal (issue 15): at most 1.03 with ``--devices 1``;
with N > 1 the same global batch is split, so "x plain" below 1 is the speed-up.
"""

from __future__ import annotations

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
from ternjax import cli, distributed, train  # noqa: E402


def bench(name: str, weights: str, activations: str, batch: int, dtype: str, steps: int,
          repeats: int, meshes=(None,)) -> list[dict]:
  """One row per mesh (None: the plain step); the variants' calls alternate."""
  config = dataclasses.replace(RECIPES[name], batch_size=batch)
  model = tj.models.CIFAR_MODELS[name](tj.QuantConfig(weights=weights, activations=activations),
                                       dtype=DTYPES[dtype], rngs=nnx.Rngs(0, quant=1))
  optimizer = nnx.Optimizer(model, train.make_optimizer(config, steps, model)[0], wrt=nnx.Param)
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  rng = np.random.default_rng(0)
  data = (rng.integers(0, 256, (steps * batch, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, steps * batch).astype(np.int32))
  idx = rng.permutation(steps * batch).reshape(steps, batch).astype(np.int32)
  variants = []
  for mesh in meshes:
    replicated = distributed.sharding(mesh)
    args = [*distributed.put((jax.tree.map(jnp.copy, state), *data), replicated),
            jax.device_put(idx, distributed.sharding(mesh, None, distributed.DATA)),
            distributed.put(jax.random.key(0), replicated)]
    t0 = time.perf_counter()
    chunk = train.make_train_chunk(graphdef, config, mesh).lower(*args).compile()
    variants.append((mesh, chunk, args, time.perf_counter() - t0, []))
  for _ in range(repeats + 1):  # the first call warms up
    for _, chunk, args, _, times in variants:
      t0 = time.perf_counter()
      args[0], (loss, _) = chunk(*args)
      loss.block_until_ready()
      times.append(time.perf_counter() - t0)
  rows = []
  for mesh, _, _, compile_s, times in variants:
    step_ms = 1e3 * statistics.median(times[1:]) / steps
    rows.append({"model": name, "weights": weights, "activations": activations, "batch": batch,
                 "dtype": dtype, "steps_per_call": steps, "devices": mesh and mesh.size,
                 "step_ms": step_ms, "images_per_s": batch / step_ms * 1e3,
                 "compile_s": compile_s, "final_loss": float(loss[-1]),
                 "vs_plain": step_ms / rows[0]["step_ms"] if rows else None})
  return rows


def main(argv=None):
  p = cli.Parser(description=__doc__.splitlines()[0])
  p.add_argument("--models", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
  p.add_argument("--weights", nargs="+", choices=tj.layers.WEIGHT_METHODS,
                 default=["fp", "twn", "ttq"])
  p.add_argument("--activations", choices=tj.layers.ACTIVATION_METHODS, default="none")
  p.add_argument("--batch-size", type=cli.positive_int, help="default: the model's recipe")
  p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
  p.add_argument("--steps", type=cli.positive_int, default=50, help="scanned steps per call")
  p.add_argument("--repeats", type=cli.positive_int, default=3)
  p.add_argument("--devices", type=cli.positive_int,
                 help="also time the data-parallel step on a mesh of this many devices")
  p.add_argument("--out", default="bench_train.json")
  args = p.parse_args(argv)
  try:
    meshes = (None,) if args.devices is None else (None, distributed.make_mesh(args.devices))
  except distributed.DistributedError as err:
    p.error(str(err))
  rows = []
  ratio = lambda r: f"{r:.3f}" if r else "-"
  print(f"{'model':9} {'weights':8} {'batch':>5} {'devices':>7} {'ms/step':>8} {'img/s':>9} "
        f"{'x float':>7} {'x plain':>7} {'compile s':>9}")
  for name in args.models:
    floats = None
    for weights in args.weights:
      for row in bench(name, weights, args.activations if weights != "fp" else "none",
                       args.batch_size or RECIPES[name].batch_size, args.dtype, args.steps,
                       args.repeats, meshes):
        floats = row["step_ms"] if weights == "fp" and row["devices"] is None else floats
        row["vs_float"] = row["step_ms"] / floats if floats and row["devices"] is None else None
        rows.append(row)
        print(f"{name:9} {weights:8} {row['batch']:5d} {row['devices'] or '-':>7} "
              f"{row['step_ms']:8.2f} {row['images_per_s']:9,.0f} {ratio(row['vs_float']):>7} "
              f"{ratio(row['vs_plain']):>7} {row['compile_s']:9.1f}", flush=True)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "command": " ".join(sys.argv), "rows": rows}
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  return result


if __name__ == "__main__":
  main()
