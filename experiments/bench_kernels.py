"""Benchmark of the ternary matmul kernels against XLA's bf16 and int8 dots on the same data.

For each (M, K, N) and implementation: first a bit-exactness check against
:func:`ternjax.ops.xla_matmul` on fresh random inputs (awkward shapes too), then the median
device time per op, read from the profiler's GPU stream events (kernel durations, no Python
dispatch). The op runs over R distinct weight sets inside one jitted call so that the weights
come from HBM, not from the 50 MB L2. Prints a table and writes JSON.

  python experiments/bench_kernels.py --out experiments/results/bench_kernels.json

Device and numbers: experiments/results/bench_kernels_h200.log (H200), bench_kernels.md (H100).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import json
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax import lax

from ternjax import kernels, ops, packing
from ternjax.kernels.common import BlockSizes, cdiv
from ternjax.ops import arg_specs

SHAPES = arg_specs.GPU_BENCH
# Awkward shapes for the exactness check: M = 1, K not a multiple of 32, N not one of a block.
CHECK_SHAPES = arg_specs.GPU_CHECK
# Peak HBM bandwidth by device kind (datasheets): the "% of HBM" column divides by it.
PEAK_HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}
L2_ROTATION_BYTES = 200e6  # > 3x the 50 MB L2
OUT_BYTES_MAX = 2e9  # int32 outputs of one timed call (ResNet layers: few weight sets)


def _sweep(m: int, k: int, n: int) -> list[BlockSizes]:
  """Configurations timed for a shape besides the default (kept small: each compiles)."""
  B = BlockSizes
  if m <= 16:
    bm = max(1, min(16, m))
    return [B(kernel="popcount", block_m=bm, block_n=bn, block_k=bk, split_k=s, num_warps=w)
            for bn, bk, s, w in [(256, 4, 16, 4), (512, 4, 32, 4), (128, 8, 32, 4),
                                 (128, 2, 8, 4), (64, 4, 8, 4), (128, 4, 8, 8), (256, 4, 8, 8),
                                 (64, 4, 16, 2)]] + [
        B(kernel="dot", block_m=16, block_n=bn, block_k=bk, split_k=s, num_warps=4)
        for bn, bk, s in [(64, 2, 16), (128, 4, 8)]]
  if m <= 256:
    return [B(kernel="dot", block_m=bm, block_n=bn, block_k=bk, split_k=s, num_warps=w)
            for bm, bn, bk, s, w in [(64, 128, 2, 2, 4), (128, 128, 2, 2, 8), (64, 64, 2, 4, 4),
                                     (128, 128, 4, 1, 8)]] + [
        B(kernel="popcount", block_m=16, block_n=128, block_k=4, split_k=2, num_warps=4)]
  if m >= 1024:
    return [B(kernel="dot", block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in [(128, 128, 2, 8, 3), (128, 256, 2, 8, 3),
                                      (256, 128, 2, 8, 3), (128, 128, 4, 8, 4),
                                      (128, 256, 4, 8, 3)]] + [
        B(kernel="popcount", block_m=32, block_n=128, block_k=4, num_warps=8)]
  return [B(kernel="dot", block_m=bm, block_n=bn, block_k=bk, split_k=s, num_warps=4)
          for bm, bn, bk, s in [(64, 64, 1, 1), (32, 64, 1, 1), (64, 32, 1, 1)]] + [
      B(kernel="popcount", block_m=16, block_n=64, block_k=1, num_warps=4)]


def hbm_bytes_per_s() -> float:
  """The peak HBM bandwidth of the default device (NaN for a kind not in the table)."""
  kind = jax.devices()[0].device_kind
  return next((v for name, v in PEAK_HBM_BYTES_PER_S.items() if name in kind), float("nan"))


def _random(key, m, k, n, sets):
  kx, kw = jax.random.split(key)
  x = jax.random.randint(kx, (m, k), -1, 2, jnp.int8)
  ts = [jax.random.randint(kk, (k, n), -1, 2, jnp.int8) for kk in jax.random.split(kw, sets)]
  return x, ts


def _stream_events(trace_dir: str):
  path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
  data = jax.profiler.ProfileData.from_file(path)
  events = []
  for plane in data.planes:
    if plane.name.startswith("/device:GPU"):
      for line in plane.lines:
        if line.name.startswith("Stream"):
          events += [(e.start_ns, e.duration_ns, e.name) for e in line.events]
  return sorted(events)


def device_time(fn, args, ops_per_call: int, calls: int = 5):
  """Device time of one op (µs) from the GPU stream events: median and mean; wall time per op;
  and the op's kernels in launch order, each ``{"name", "us"}`` (its median over instances; a
  ``None`` time where the events do not group evenly into the ops)."""
  jax.block_until_ready(fn(*args))
  walls = []
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        walls.append((time.perf_counter() - t0) / ops_per_call)
    events = _stream_events(d)
  n_ops = ops_per_call * calls
  per_op = len(events) // n_ops if events and len(events) % n_ops == 0 else 0
  mean = sum(e[1] for e in events) / n_ops / 1e3 if events else float("nan")
  if per_op:  # consecutive events of one op instance; medians over instances
    instances = [events[i:i + per_op] for i in range(0, len(events), per_op)]
    device = statistics.median(sum(e[1] for e in op) for op in instances) / 1e3
    kernels = [{"name": instances[0][j][2][:60],
                "us": statistics.median(op[j][1] for op in instances) / 1e3}
               for j in range(per_op)]
  else:  # events not grouped evenly: the mean
    device = mean
    kernels = [{"name": name, "us": None} for name in sorted({e[2][:60] for e in events})]
  return device, mean, statistics.median(walls) * 1e6, kernels


def _backends():
  """``(name, backend)`` of the kernel backends that imported (jax-triton may be missing)."""
  return [(backend.name, backend) for backend in kernels.BACKENDS]


def _variants(m, k, n, sweep: bool = False):
  """(label, block sizes, activation, fn(x, w), bytes moved) for every timed implementation
  of a shape: each backend's default for ternary, int8 (W2A8) and bf16 (W2A16) activations
  (with ``sweep``, also the tiles of :func:`_sweep`), and the dispatch."""
  out = []
  kw = cdiv(k, 32)
  packed_w = 2 * 4 * kw * n
  x_bytes = {"ternary": m * k, "int8": m * k, "bf16": 2 * m * k}
  for backend, module in _backends():
    default = BlockSizes.get_default(m, n, k, x_ternary=True, mma=module.mma is not None)
    for bs in [default] + ([b for b in _sweep(m, k, n) if b != default] if sweep else []):
      xb = 2 * 4 * m * kw if bs.kernel == "popcount" else m * k
      label = f"{backend}:{bs.kernel}" + (" (default)" if bs == default else "")
      out.append((label, bs, "ternary", lambda x, w, bs=bs, module=module: module.ternary_matmul(
          x, w, x_ternary=True, block_sizes=bs), xb + packed_w + 4 * m * n))
    for act, name in (("int8", "W2A8 int8 x"), ("bf16", "W2A16 bf16 x")):
      out.append((f"{backend}:{name}", None, act,
                  lambda x, w, module=module: module.ternary_matmul(x, w),
                  x_bytes[act] + packed_w + 4 * m * n))
  for act in ("ternary", "int8", "bf16"):
    out.append((f"ops.ternary_matmul {act} (gpu dispatch)", None, act,
                lambda x, w, t=act == "ternary": ops.ternary_matmul(x, w, x_ternary=t),
                x_bytes[act] + packed_w + 4 * m * n))
  return out


def _exact(out, ref) -> bool:
  return out.shape == ref.shape and out.dtype == ref.dtype and bool(jnp.all(out == ref))


def check(seed: int = 0) -> list[str]:
  """Bit-exactness against the XLA reference, on fresh random inputs.

  Awkward shapes: both backends' defaults and one split-K configuration of each kernel, for
  ternary, ternary with TTQ scales and int8 activations (bf16: to float tolerance). The first
  four benchmark shapes: every timed configuration on ternary activations.
  """
  failures = []
  key = jax.random.key(seed)
  split = [BlockSizes(kernel="popcount", block_m=4, block_n=64, block_k=2, split_k=4),
           BlockSizes(kernel="dot", block_m=16, block_n=64, block_k=1, split_k=4),
           BlockSizes(kernel="mma", block_m=16, block_n=64, block_k=1, split_k=4)]
  jobs = [(s, None, True) for s in CHECK_SHAPES] + [(s, b, True) for s in CHECK_SHAPES
                                                     for b in split]
  jobs += [(s, b, False) for s in SHAPES[:4] for _, b, _, _, _ in _variants(*s)
           if b is not None]
  for (m, k, n), bs, full in jobs:
    key, kx, ks, k8 = jax.random.split(key, 4)
    x, (t,) = _random(kx, m, k, n, 1)
    w = packing.pack_bitplanes(t, axis=0)
    if full:
      ref = ops.xla_matmul(x, w, x_ternary=True)
    else:  # the same integers, from XLA's int8 dot (the popcount reference is slow at 4096³)
      ref = lax.dot_general(x, t, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    for backend, module in _backends():
      if bs is not None and bs.kernel == "mma" and module.mma is None:
        continue
      got = {"ternary": (module.ternary_matmul(x, w, x_ternary=True, block_sizes=bs), ref)}
      if full:
        ws, wsn = jax.random.uniform(ks, (2, n))
        x8 = jax.random.randint(k8, (m, k), -127, 128, jnp.int8)
        got["ttq"] = (module.ternary_matmul(x, w, x_ternary=True, w_scale=ws, w_scale_neg=wsn,
                                            block_sizes=bs),
                      ops.xla_matmul(x, w, x_ternary=True, w_scale=ws, w_scale_neg=wsn))
        if bs is None or bs.kernel != "popcount":
          got["int8"] = (module.ternary_matmul(x8, w, block_sizes=bs), ops.xla_matmul(x8, w))
          xf = jax.random.normal(k8, (m, k), jnp.bfloat16)
          out = module.ternary_matmul(
              xf, w, block_sizes=bs if bs is not None and bs.kernel == "mma" else None)
          want = ops.xla_matmul(xf, w)
          err = float(jnp.max(jnp.abs(out - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1))
          if not err < 1e-5:
            failures.append(f"{(m, k, n)} {backend} bf16 rel. error {err:.2e}")
      # Scaled TTQ outputs: the integers are exact, the float epilogue may differ by an ulp
      # where XLA fuses it into an FMA in one program and not in the other.
      close = lambda out, want: bool(jnp.allclose(out, want, rtol=1e-6, atol=1e-5))
      bad = [name for name, (out, want) in got.items()
             if not (_exact(out, want) or name == "ttq" and close(out, want))]
      failures += [f"{(m, k, n)} {backend} {bs} {name}" for name in bad]
      verdict = f"FAIL {bad}" if bad else "exact"
      print(f"check {(m, k, n)} {backend} {bs} {sorted(got)}: {verdict}", flush=True)
  return failures


def bench(save, seed: int = 1, sweep: bool = False) -> list[dict]:
  """Times every implementation on every shape; ``save(rows)`` after each shape."""
  rows = []
  key = jax.random.key(seed)
  for m, k, n in SHAPES:
    sets = int(min(64, max(4, L2_ROTATION_BYTES // (k * n * 2))))  # bf16 weights rotate L2
    if m * k * n >= 2**36:
      sets = 4  # compute-bound: a few ops are enough
    sets = max(1, min(sets, int(OUT_BYTES_MAX // (4 * m * n))))  # large activations: few
    key, sub, kf = jax.random.split(key, 3)
    x, ts = _random(sub, m, k, n, sets)
    xs = {"ternary": x, "int8": jax.random.randint(sub, (m, k), -127, 128, jnp.int8),
          "bf16": jax.random.normal(kf, (m, k), jnp.bfloat16)}
    ws = [packing.pack_bitplanes(t, axis=0) for t in ts]
    w_bf16 = [t.astype(jnp.bfloat16) for t in ts]
    flops = 2 * m * n * k
    timed = []
    for label, bs, act, fn, nbytes in _variants(m, k, n, sweep):
      timed.append((label, bs, jax.jit(lambda x, ws, fn=fn: [fn(x, w) for w in ws]),
                    (xs[act], ws), nbytes))
    timed.append(("xla: int8 dot", None, jax.jit(lambda x, ws: [lax.dot_general(
        x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32) for w in ws]),
                  (xs["int8"], ts), m * k + k * n + 4 * m * n))
    timed.append(("xla: bf16 dot", None, jax.jit(lambda x, ws: [lax.dot_general(
        x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32) for w in ws]),
                  (xs["bf16"], w_bf16), 2 * m * k + 2 * k * n + 4 * m * n))
    timed.append(("xla: unpack + int8 dot", None, jax.jit(lambda x, ws: [ops.xla_matmul(
        x, w) for w in ws]), (xs["int8"], ws), m * k + 8 * cdiv(k, 32) * n + 4 * m * n))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # compiles in parallel
      for _, _, fn, args, _ in timed:
        pool.submit(lambda fn, args: fn.lower(*args).compile(), fn, args)
    for label, bs, fn, args, nbytes in timed:
      row = dict(m=m, k=k, n=n, impl=label, block_sizes=dataclasses.asdict(bs) if bs else None)
      try:
        t_dev, t_mean, t_wall, kernels_us = device_time(fn, args, len(args[1]))
        row.update(us=t_dev, mean_us=t_mean, wall_us=t_wall, tops_eq=flops / t_dev / 1e6,
                   gb_per_s=nbytes / t_dev / 1e3, bytes=nbytes, kernels=kernels_us,
                   hbm_frac=nbytes / t_dev / 1e-6 / hbm_bytes_per_s())
      except Exception as e:  # a configuration that fails to compile or run is recorded
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
      rows.append(row)
      print(_fmt(row), flush=True)
    save(rows)
  return rows


def _fmt(r: dict) -> str:
  shape = f"{r['m']}x{r['k']}x{r['n']}"
  if "error" in r:
    return f"{shape:16s} {r['impl']:30s} ERROR {r['error'][:120]}"
  bs = r["block_sizes"]
  cfg = (f"{bs['block_m']}x{bs['block_n']}x{bs['block_k']}w s{bs['split_k']} "
         f"nw{bs['num_warps']} st{bs['num_stages']}") if bs else ""
  return (f"{shape:16s} {r['impl']:30s} {r['us']:10.2f} {r['wall_us']:10.2f} "
          f"{r['mean_us']:9.2f} {r['tops_eq']:8.1f} {r['gb_per_s']:8.0f} "
          f"{100 * r['hbm_frac']:6.1f}%  {cfg}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="bench_kernels.json", help="JSON file for the rows")
  p.add_argument("--check-only", action="store_true", help="only the bit-exactness check")
  p.add_argument("--sweep", action="store_true",
                 help="also time the popcount/dot tiles of _sweep (mma: sweep_gpu_kernels.py)")
  args = p.parse_args(argv)
  if jax.default_backend() != "gpu":
    p.error(f"needs a GPU (default backend: {jax.default_backend()})")
  failures = check()
  if failures:
    print("NOT BIT-EXACT:\n" + "\n".join(failures))
  if args.check_only:
    return 1 if failures else 0
  def save(rows):
    with open(args.out, "w") as f:
      json.dump(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                     hbm_peak_bytes_per_s=hbm_bytes_per_s(),
                     command=" ".join(sys.argv), check_failures=failures, rows=rows), f, indent=1)

  rows = bench(save, sweep=args.sweep)
  print(f"\n{'shape':16s} {'impl':30s} {'device µs':>10s} {'wall µs':>10s} {'mean µs':>9s} "
        f"{'TOPS-eq':>8s} "
        f"{'GB/s':>8s} {'HBM':>7s}  config")
  for r in rows:
    print(_fmt(r))
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
