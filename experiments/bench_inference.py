"""Inference throughput of ternary exports through the dispatch against the float model in
bfloat16 through plain XLA: images/s at batch 1 and 1024, the CIFAR-10 architectures.

  python experiments/bench_inference.py                         # every case, on a GPU
  python experiments/bench_inference.py --cases resnet18-twn --batches 1 1024

Each case is a registered architecture and quantization (export_cifar.CASES) with random
weights (throughput does not depend on their values), its BatchNorm statistics estimated on
random images. It is exported twice, in float32 (what the zoo ships) and in
bfloat16 (``compute_dtype=None``: the ternary layers get bf16 activations), each from a model
computing in that dtype, loaded with ``ternjax.export.load`` (the dispatch picks the kernels
per layer), and timed against its float twin (``weights='fp'``, bf16, one ``jax.jit`` of the
merged module) on the same images. Time: wall clock of one call to its result, median of
``--repeats`` calls after two warm-up calls; images/s = batch / that. An export its own
agreement check refuses is recorded as refused, with the check's message (the bf16
export's check allows ``BF16_TOLERANCE``; each export's measured agreement with its model
is recorded). ``--profile`` adds each runner's device time per call and its largest kernels
to the JSON (where the export's time goes). Writes bench_inference.{json,md} to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from bench_kernels import _stream_events
from export_cifar import CASES
from flax import nnx

import ternjax as tj
from ternjax import export as tjexport
from ternjax import models, train

RESULTS = Path(__file__).parent / "results"
EXPORTS = {"export f32": "float32", "export bf16": None}  # label: compute_dtype
BF16_TOLERANCE = 0.2  # the bf16 export's own check: two bf16 computations of a deep network


def kernel_breakdown(fn, x, calls: int = 3, top: int = 12) -> dict:
  """Device time per call and its largest kernels (µs per call, from profiler events)."""
  jax.block_until_ready(fn(x))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        jax.block_until_ready(fn(x))
    events = _stream_events(d)
  if not events:  # no GPU stream (a CPU run)
    return None
  per_kernel = collections.Counter()
  for _, duration_ns, name in events:
    per_kernel[name[:80]] += duration_ns / calls / 1e3
  return {"device_us": sum(per_kernel.values()), "kernels": len(events) // calls,
          "largest_us": dict(per_kernel.most_common(top))}


def seconds_per_call(fn, x, repeats: int) -> float:
  for _ in range(2):
    jax.block_until_ready(fn(x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def float_twin(name: str, options: dict):
  """The float model in bf16 as one jitted function of the images."""
  model = models.CIFAR_MODELS[name](tj.QuantConfig(weights="fp"), dtype=jnp.bfloat16,
                                    rngs=nnx.Rngs(0), **options)
  model.eval()
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return lambda x: step(state, x)


def bench_case(case: str, batches, repeats: int, tmp: Path, profile: bool) -> list[dict]:
  name, quant, options = CASES[case]
  runners = {"float bf16 (XLA)": float_twin(name, options)}
  agreement = {}  # export: max |Δlogit| / max(1, max |logit|) against its model, 64 images
  images = jax.random.randint(jax.random.key(0), (512, 32, 32, 3), 0, 256).astype(jnp.uint8)
  for label, dtype in EXPORTS.items():
    # the model computes in the export's dtype (random deep networks amplify bf16-vs-f32
    # differences past the export's own agreement check); its BatchNorms normalize as a
    # trained model's do
    model = models.CIFAR_MODELS[name](tj.QuantConfig(**quant),
                                      dtype=jnp.dtype(dtype or jnp.bfloat16),
                                      rngs=nnx.Rngs(0, quant=1), **options)
    train.recalibrate_batchnorm(model, images, batch_size=128)
    model.eval()
    try:
      path = tjexport.export(model, tmp / f"{case}-{label.split()[1]}", model_name=name,
                             input_shape=(32, 32, 3), classes=10, onnx=False,
                             platforms=(jax.default_backend().replace("gpu", "cuda"),),
                             compute_dtype=dtype, tolerance=BF16_TOLERANCE if dtype is None
                             else tjexport.PROBE_TOLERANCE)
      runners[label] = tjexport.load(path)
      probe = jax.random.uniform(jax.random.key(1), (64, 32, 32, 3))
      want = jnp.asarray(model(probe), jnp.float32)
      agreement[label] = float(jnp.max(jnp.abs(runners[label](probe) - want))
                               / jnp.maximum(1.0, jnp.max(jnp.abs(want))))
    except tjexport.ExportError as err:  # recorded: the export's own agreement check refused it
      runners[label] = str(err)
  rows = []
  for batch in batches:
    x = jax.random.uniform(jax.random.key(batch), (batch, 32, 32, 3), jnp.float32)
    row = {"case": case, "batch": batch, "agreement": agreement}
    for label, fn in runners.items():
      row[label] = fn if isinstance(fn, str) else batch / seconds_per_call(fn, x, repeats)
      if profile and not isinstance(fn, str):
        row[f"{label} profile"] = kernel_breakdown(fn, x)
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", nargs="+", choices=tuple(CASES),
                 default=["resnet20-twn", "resnet18-twn", "resnet18-twn-a8", "mobilenetv2-twn-fpdw",
                          "vit_tiny-twn"])
  p.add_argument("--batches", nargs="+", type=int, default=[1, 1024])
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--profile", action="store_true",
                 help="also record each runner's device time and largest kernels (GPU)")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  if min(args.batches) < 1 or args.repeats < 1:
    p.error("--batches and --repeats must be positive")
  rows = []
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  machine = f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
  command = "python experiments/bench_inference.py " + " ".join(argv or sys.argv[1:])
  labels = ["float bf16 (XLA)", *EXPORTS]
  with tempfile.TemporaryDirectory() as tmp:
    for case in args.cases:
      rows += bench_case(case, args.batches, args.repeats, Path(tmp), args.profile)
      lines = ["| case | batch | " + " | ".join(f"{k} img/s" for k in labels)
               + " | export f32 × float | export bf16 × float | bf16 export agreement |",
               "|---|---:|" + "---:|" * 6]
      cell = lambda v: f"{v:,.0f}" if isinstance(v, float) else "refused"
      ratio = lambda r, k: f"{r[k] / r[labels[0]]:.2f}" if isinstance(r[k], float) else "-"
      lines += [f"| {r['case']} | {r['batch']} | " + " | ".join(cell(r[k]) for k in labels)
                + f" | {ratio(r, 'export f32')} | {ratio(r, 'export bf16')} | "
                + f"{r['agreement'].get('export bf16', float('nan')):.3f} |" for r in rows]
      (out / "bench_inference.json").write_text(json.dumps(
          dict(command=command.strip(), machine=machine, rows=rows), indent=1) + "\n")
      (out / "bench_inference.md").write_text(
          f"# Inference throughput: ternary exports vs the float model (bf16)\n\nCommand: "
          f"`{command.strip()}`; {machine}; random weights; median wall clock of "
          f"{args.repeats} calls.\n\n" + "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
