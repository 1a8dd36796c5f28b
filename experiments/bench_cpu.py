"""CPU inference benchmark: ternary matmul (XLA implementation) vs float32 / int8 ``jnp.dot``,
and end-to-end MNIST inference of a ternary export vs the float model.

Micro: ``x (M, K) × w (K, N)`` for M in {1, 8, 64, 256} and (K, N) in {(784, 256),
(4096, 4096)}: ``ternary_matmul`` with ternary, int8 and float32 activations against a float32
``jnp.dot`` and an int8 ``jnp.dot`` (int32 accumulation) of unpacked weights. End to end: MLP
and LeNet-5 (random TWN weights: latency does not depend on training) exported with
:func:`ternjax.export.export` and run by :func:`ternjax.export.load`, against the same
architecture with float weights (``jax.jit`` of the model merged from its parameters, passed
as plain arrays; also as the ``nnx.State``, whose flattening costs ~40 µs per call); batch 1
latency and batch 256 throughput.

Every result is checked first (ternary exact against a NumPy integer dot), then timed with
``block_until_ready`` as the median over rounds in which each candidate runs ``--block`` calls
back to back (the first call of each block, which finds the other candidates' data in cache
and their threads awake, is not counted): **warm**, the way a loop over one layer or model
runs. The ternary-x and float32-dot candidates are also timed **cold**: a 64 MiB read evicts
the caches before every call. Candidates alternate, so load from other processes hits them
alike. Prints tables and writes JSON (with the CPU, its flags and the load average)::

  python experiments/bench_cpu.py --out experiments/results/bench_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ternjax import export, models, ops, packing
from ternjax.layers import QuantConfig
from ternjax.ops import arg_specs, conv, cpu, xla

M_VALUES = arg_specs.CPU_BENCH_M
KN_VALUES = arg_specs.CPU_BENCH_KN
CPU_FLAGS = ("avx2", "avx512f", "avx512_vpopcntdq", "avx512_vnni", "avx512_bf16")


def machine() -> dict:
  """The device, the CPU model, its relevant flags and the load average."""
  lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
  flags = fields.get("Flags", "").split()
  return dict(device=str(jax.devices()[0]), jax=jax.__version__, cpus=os.cpu_count(),
              cpu=fields.get("Model name", platform.processor()).strip(),
              flags=[f for f in CPU_FLAGS if f in flags], load_average=os.getloadavg())


def time_interleaved(fns: dict, args: dict, reps: int, *, block: int = 1,
                     before: Callable[[], object] | None = None) -> dict[str, float]:
  """Median seconds per call of each function over ``reps`` rounds.

  Each round runs every function ``block`` times back to back and counts all but the first
  call of the block (all of them when ``block`` is 1); ``before`` runs, untimed, before each
  call.
  """
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args[name]))
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      for i in range(block):
        if before is not None:
          before()
        start = time.perf_counter()
        jax.block_until_ready(fn(*args[name]))
        if i or block == 1:
          times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


@functools.cache
def _eviction_data() -> jax.Array:
  return jnp.ones(16 << 20, jnp.float32)


_sum = jax.jit(jnp.sum)


def evict_caches() -> None:
  """Reads 64 MiB (twice the 32 MiB L3 of the dev VM), so no candidate finds its data cached."""
  _sum(_eviction_data()).block_until_ready()


def record(rows: list[dict], secs: dict[str, float], base: str, label: str,
           **key) -> list[dict]:
  """Appends one row per candidate (``key``, median µs, ratio to ``base``), prints them on one
  line after ``label``, and returns the new rows."""
  new = [dict(key, impl=name, median_us=s * 1e6, vs_float32=secs[base] / s)
         for name, s in secs.items()]
  rows.extend(new)
  print(label + "  " + "  ".join(f"{name} {s * 1e3:.3f} ms ({secs[base] / s:.2f}x)"
                                 for name, s in secs.items()), flush=True)
  return new


COLD = ("float32 dot", "ternary x (popcount)")


def micro(reps: int, block: int, m_values, kn_values) -> list[dict]:
  rng = np.random.default_rng(0)
  rows = []
  for k, n in kn_values:
    t = rng.integers(-1, 2, (k, n)).astype(np.int8)
    w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
    wf, w8 = jnp.asarray(t, jnp.float32), jnp.asarray(t)
    for m in m_values:
      xt = rng.integers(-1, 2, (m, k)).astype(np.int8)
      x8 = rng.integers(-127, 128, (m, k)).astype(np.int8)
      xf = rng.standard_normal((m, k)).astype(np.float32)
      fns = {
          "float32 dot": jax.jit(jnp.dot),
          "int8 dot": jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.int32)),
          "ternary x (popcount)": jax.jit(lambda a, b: ops.ternary_matmul(a, b, x_ternary=True)),
          "int8 x": jax.jit(ops.ternary_matmul),
          "float32 x": jax.jit(ops.ternary_matmul),
      }
      args = {"float32 dot": (jnp.asarray(xf), wf), "int8 dot": (jnp.asarray(x8), w8),
              "ternary x (popcount)": (jnp.asarray(xt), w), "int8 x": (jnp.asarray(x8), w),
              "float32 x": (jnp.asarray(xf), w)}
      exact = lambda a: a.astype(np.int64) @ t.astype(np.int64)
      np.testing.assert_array_equal(fns["ternary x (popcount)"](*args["ternary x (popcount)"]),
                                    exact(xt))
      np.testing.assert_array_equal(fns["int8 x"](*args["int8 x"]), exact(x8))
      np.testing.assert_array_equal(fns["int8 dot"](*args["int8 dot"]), exact(x8))
      np.testing.assert_allclose(fns["float32 x"](*args["float32 x"]), xf @ t, rtol=1e-4,
                                 atol=1e-3)
      secs = time_interleaved(fns, args, reps, block=block)
      cold = time_interleaved({name: fns[name] for name in COLD}, args, reps,
                              before=evict_caches)
      for mode, timed in (("warm", secs), ("cold", cold)):
        record(rows, timed, "float32 dot", f"M={m:4d} K={k:5d} N={n:5d} {mode}", m=m, k=k, n=n,
               mode=mode)
  return rows


def sweep(reps: int, block: int, m_values=arg_specs.CPU_SWEEP_M) -> list[dict]:
  """Times each CPU formulation of :func:`ternjax.ops.xla_matmul` directly (the thresholds of
  :class:`ternjax.ops.CpuTuning`)."""
  rng = np.random.default_rng(2)
  popcount = {f"popcount {name}": functools.partial(
      lambda xb, w, fn: fn(xla.x_planes(xb), xla.w_planes(w, False), False, ops.CPU_TUNING),
      fn=fn) for name, fn in cpu.POPCOUNT.items()}
  dot = {f"dot {name}": functools.partial(
      lambda x, w, fn: fn(x, w, False, ops.CPU_TUNING), fn=fn) for name, fn in cpu.DOT.items()}
  rows = []
  for k, n in KN_VALUES:
    w = packing.pack_bitplanes(jnp.asarray(rng.integers(-1, 2, (k, n)).astype(np.int8)), axis=0)
    for m in m_values:
      xt = jnp.asarray(rng.integers(-1, 2, (m, k)).astype(np.int8))
      xb = packing.pack_bitplanes(xt, axis=1)
      fns = {"float32 dot": jax.jit(jnp.dot)}
      args = {"float32 dot": (jnp.asarray(xt, jnp.float32), unpack(w))}
      for name, fn in popcount.items():
        fns[name], args[name] = jax.jit(fn), (xb, w)
      for name, fn in dot.items():
        fns[name], args[name] = jax.jit(fn), (jnp.asarray(xt, jnp.float32), w)
      fns["dot plain int8"], args["dot plain int8"] = jax.jit(dot["dot plain"]), (xt, w)
      record(rows, time_interleaved(fns, args, reps, block=block), "float32 dot",
             f"M={m:4d} K={k:5d} N={n:5d}", m=m, k=k, n=n)
  return rows


def conv_sweep(reps: int, block: int, batches=(1, 4, 16, 64)) -> list[dict]:
  """Times the convolutions of ternary activations for LeNet-5's second conv (the
  ``conv_*`` thresholds of :class:`ternjax.ops.CpuTuning`): channel-packed popcount, float32
  conv, patches + popcount."""
  rng = np.random.default_rng(3)
  geometry = dict(window=(5, 5), strides=(1, 1), padding="VALID", rhs_dilation=(1, 1))
  kernel = jnp.asarray(rng.integers(-1, 2, (5, 5, 32, 64)).astype(np.int8))
  w = packing.pack_bitplanes(ops.kernel_to_matrix(kernel), axis=0)
  fns = {
      "conv channel-packed": lambda x, w: conv.conv_popcount(x, w, *geometry.values(),
                                                             False)[0],
      "conv float32": lambda x, w: ops.xla_conv(x.astype(jnp.float32), w, **geometry),
      "conv patches": lambda x, w: conv.patches_conv(x, w, **geometry, x_ternary=True,
                                                     matmul=ops.xla_matmul),
  }
  fns = {name: jax.jit(fn) for name, fn in fns.items()}
  rows = []
  for batch in batches:
    x = jnp.asarray(rng.integers(-1, 2, (batch, 12, 12, 32)).astype(np.int8))
    ref = jax.lax.conv_general_dilated(x.astype(jnp.int32), kernel.astype(jnp.int32), (1, 1),
                                       "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    for fn in fns.values():
      np.testing.assert_array_equal(np.asarray(fn(x, w)).astype(np.int32), ref)
    record(rows, time_interleaved(fns, {name: (x, w) for name in fns}, reps, block=block),
           "conv float32", f"conv batch {batch:3d}", batch=batch)
  return rows


def unpack(w: packing.Bitplanes) -> jax.Array:
  return packing.unpack_bitplanes(w, jnp.float32)


E2E_MODELS = {"mlp": models.mlp, "lenet5": models.lenet5}
E2E_ACTIVATIONS = ("none", "ternary")
E2E_BLOCK = {1: 20, 256: 3}  # calls back to back per round (warm-up of the block excluded)


def end_to_end(reps: int, batches=(1, 256)) -> list[dict]:
  """Ternary exports (random TWN weights, float or ternary activations) vs the float model."""
  rows = []
  rng = np.random.default_rng(1)
  with tempfile.TemporaryDirectory() as tmp:
    for name, build in E2E_MODELS.items():
      float_model = build(models.FP, rngs=nnx.Rngs(0))
      float_model.eval()
      graph, state = nnx.split(float_model)  # jax.jit of a pure function: no nnx.jit overhead
      leaves, treedef = jax.tree.flatten(state)
      float_fn = jax.jit(lambda state, x: nnx.merge(graph, state)(x))
      arrays_fn = jax.jit(lambda leaves, x: nnx.merge(graph, jax.tree.unflatten(treedef,
                                                                                 leaves))(x))
      fns = {"float32 model": functools.partial(arrays_fn, leaves),
             "float32 model, nnx.State argument": functools.partial(float_fn, state)}
      for act in E2E_ACTIVATIONS:
        model = build(QuantConfig(weights="twn", activations=act), rngs=nnx.Rngs(0))
        model.eval()
        path = export.export(model, os.path.join(tmp, f"{name}_{act}"), model_name=name,
                             input_shape=(28, 28, 1), classes=10)
        inference = export.load(path)
        x = jnp.asarray(rng.random((2, 28, 28, 1), np.float32))
        np.testing.assert_allclose(inference(x), model(x), rtol=2e-3, atol=2e-3)
        fns[f"ternary export, {'float' if act == 'none' else act} activations"] = inference
      for batch in batches:
        x = jnp.asarray(rng.random((batch, 28, 28, 1), np.float32))
        secs = time_interleaved(fns, {k: (x,) for k in fns}, reps, block=E2E_BLOCK[batch])
        for row in record(rows, secs, "float32 model", f"{name:6s} batch {batch:3d}",
                          model=name, batch=batch):
          row["images_per_s"] = batch / secs[row["impl"]]
  return rows


def table(rows: list[dict], keys: tuple[str, ...]) -> str:
  head = keys + ("impl", "median µs", "vs float32")
  lines = [head] + [tuple(str(r[k]) for k in keys) + (
      r["impl"], f"{r['median_us']:.1f}", f"{r['vs_float32']:.2f}x") for r in rows]
  widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
  return "\n".join("  ".join(c.rjust(w) if i != len(keys) else c.ljust(w)
                             for i, (c, w) in enumerate(zip(line, widths))) for line in lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=30, help="timed calls per candidate")
  parser.add_argument("--block", type=int, default=20,
                      help="calls back to back per candidate and round (warm timing)")
  parser.add_argument("--m", type=int, nargs="+", default=M_VALUES, help="rows of x")
  parser.add_argument("--skip-end-to-end", action="store_true")
  parser.add_argument("--sweep", action="store_true",
                      help="also time each formulation of the XLA implementation for small M, "
                           "and its convolutions of ternary activations (where the thresholds "
                           "of ternjax/ops/cpu.py come from)")
  parser.add_argument("--out", help="JSON output path")
  args = parser.parse_args(argv)
  if min(args.reps, args.block, *args.m) < 1:
    parser.error("--reps, --block and --m must be positive")
  info = machine()
  print(json.dumps(info))
  micro_rows = micro(args.reps, args.block, args.m, KN_VALUES)
  e2e_rows = [] if args.skip_end_to_end else end_to_end(args.reps)
  sweep_rows = sweep(args.reps, args.block) if args.sweep else []
  conv_rows = conv_sweep(args.reps, args.block) if args.sweep else []
  info["load_average_after"] = os.getloadavg()
  print("\n" + table(micro_rows, ("m", "k", "n", "mode")))
  if e2e_rows:
    print("\n" + table(e2e_rows, ("model", "batch")))
  if sweep_rows:
    print("\n" + table(sweep_rows, ("m", "k", "n")))
    print("\n" + table(conv_rows, ("batch",)))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(machine=info, reps=args.reps, block=args.block, micro=micro_rows,
                     end_to_end=e2e_rows, sweep=sweep_rows, conv_sweep=conv_rows), f, indent=1)


if __name__ == "__main__":
  main()
