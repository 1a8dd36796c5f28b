"""Sweep of the Hopper tensor-core ('mma') kernel against XLA and the other kernels, per shape
and activation type: the measured crossovers that :class:`ternjax.kernels.GpuTuning` encodes.

Every configuration is first checked against :func:`ternjax.ops.xla_matmul` on awkward
shapes (M = 1, K not a multiple of 32, N not a multiple of the block): int8 (W2A8) and
ternary codes bit-exact, TTQ's two sums exact, bf16 (W2A16) to float32 rounding. Only
configurations that pass are timed (device time from profiler events, as bench_kernels.py,
weights rotated through more than the L2). Writes JSON after each shape.

  python experiments/sweep_gpu_kernels.py --out experiments/results/sweep_gpu_kernels_h200.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
from bench_kernels import L2_ROTATION_BYTES, device_time, hbm_bytes_per_s
from jax import lax

from ternjax import ops, packing
from ternjax.kernels import BlockSizes, ternary_matmul_triton

B = BlockSizes
CHECK_SHAPES = [(1, 100, 33), (17, 1000, 129)]
SHAPES = [(16, 4096, 4096), (256, 4096, 4096), (1, 4096, 4096), (4096, 4096, 4096),
          (1, 4096, 11008), (16, 11008, 4096), (512, 4096, 4096), (1024, 4096, 4096),
          (2048, 4096, 4096)]


def configs(m: int) -> list[BlockSizes]:
  """The mma configurations timed at ``m`` rows (each compiles, so few). ``a=False``: split-K
  partial sums added by XLA instead of atomic adds into a zeroed output (no memset kernel)."""
  mma = lambda bm, bn, bk, s, nw=4, st=3, a=True, **kw: B(
      kernel="mma", block_m=bm, block_n=bn, block_k=bk, split_k=s, num_warps=nw,
      num_stages=st, atomic=a, **kw)
  if m <= 16:
    return [mma(16, 64, 8, 4), mma(16, 64, 8, 4, a=False), mma(16, 64, 8, 8, a=False),
            mma(16, 64, 4, 8, a=False), mma(16, 128, 4, 4), mma(16, 128, 4, 4, a=False),
            mma(16, 64, 8, 4, st=4, a=False)]
  if m <= 256:
    return [mma(64, 64, 4, 1), mma(64, 64, 4, 2, a=False), mma(64, 128, 4, 2, 8, a=False),
            mma(128, 128, 4, 2, 8), mma(128, 128, 4, 2, 8, a=False)]
  return [mma(128, 128, 4, 1, 8), mma(128, 256, 4, 1, 8), mma(128, 128, 8, 1, 8),
          mma(128, 128, 4, 1, 8, st=4)]


def _ints(key, shape, lo, hi):
  return jax.random.randint(key, shape, lo, hi, jnp.int8)


def check(bs: BlockSizes, key) -> list[str]:
  """Failures of ``bs`` on the awkward shapes (empty: all exact)."""
  bad = []
  mm = ternary_matmul_triton.ternary_matmul
  for m, k, n in CHECK_SHAPES:
    key, kx, kt, ks, kf = jax.random.split(key, 5)
    w = packing.pack_bitplanes(_ints(kt, (k, n), -1, 2), axis=0)
    x8, xt = _ints(kx, (m, k), -127, 128), _ints(kx, (m, k), -1, 2)
    ws, wsn = jax.random.uniform(ks, (2, n))
    xf = jax.random.normal(kf, (m, k), jnp.bfloat16)
    cases = {
        "int8": (mm(x8, w, block_sizes=bs), ops.xla_matmul(x8, w), 0),
        "ternary": (mm(xt, w, x_ternary=True, block_sizes=bs), ops.xla_matmul(xt, w), 0),
        "ttq": (mm(x8, w, w_scale=ws, w_scale_neg=wsn, block_sizes=bs),
                ops.xla_matmul(x8, w, w_scale=ws, w_scale_neg=wsn), 1e-6),
        "bf16": (mm(xf, w, block_sizes=bs), ops.xla_matmul(xf, w), 1e-5),
    }
    for name, (got, want, tol) in cases.items():
      ok = got.shape == want.shape and got.dtype == want.dtype and (
          bool(jnp.all(got == want)) if tol == 0 else
          float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1)) < tol)
      if not ok:
        bad.append(f"{(m, k, n)} {name}")
  return bad


def _variants(m, bs_list):
  """``(label, block_sizes, activation, fn(x, w))`` timed at one shape."""
  mm = ternary_matmul_triton.ternary_matmul
  out = []
  for bs in bs_list:
    for act in ("int8", "bf16"):
      out.append((f"mma {act}", bs, act, lambda x, w, bs=bs: mm(x, w, block_sizes=bs)))
  out.append(("dispatch ternary", None, "ternary",
              lambda x, w: ops.ternary_matmul(x, w, x_ternary=True)))
  out.append(("dispatch int8", None, "int8", lambda x, w: ops.ternary_matmul(x, w)))
  out.append(("dispatch bf16", None, "bf16", lambda x, w: ops.ternary_matmul(x, w)))
  out.append(("xla unpack int8", None, "int8", lambda x, w: ops.xla_matmul(x, w)))
  out.append(("xla unpack^T int8", None, "int8", lambda x, w: lax.dot_general(
      x, jnp.swapaxes(ops.xla.weight_values((w.pos, w.neg), False, jnp.int8)[0], 0, 1)[
          :, :x.shape[1]], (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="sweep_gpu_kernels.json")
  p.add_argument("--shapes", default=None, help="indices into SHAPES, comma-separated")
  args = p.parse_args(argv)
  if jax.default_backend() != "gpu":
    p.error(f"needs a GPU (default backend: {jax.default_backend()})")
  shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
  bw = hbm_bytes_per_s()
  key = jax.random.key(0)
  rows, checked = [], {}
  for m, k, n in shapes:
    todo = [bs for bs in configs(m) if bs not in checked]
    key, *subs = jax.random.split(key, len(todo) + 1)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # compiles in parallel
      futures = {bs: pool.submit(check, bs, sub) for bs, sub in zip(todo, subs)}
    for bs, fut in futures.items():
      try:
        checked[bs] = fut.result()
      except Exception as e:  # a configuration that does not compile is recorded
        checked[bs] = [f"{type(e).__name__}: {str(e)[:300]}"]
      print(f"check {bs}: {checked[bs] or 'exact'}", flush=True)
    good = [bs for bs in configs(m) if not checked[bs]]
    sets = int(min(64, max(4, L2_ROTATION_BYTES // (k * n * 2))))
    if m * k * n >= 2 ** 36:
      sets = 4
    key, kx, kt = jax.random.split(key, 3)
    ts = [_ints(kk, (k, n), -1, 2) for kk in jax.random.split(kt, sets)]
    ws = [packing.pack_bitplanes(t, axis=0) for t in ts]
    xs = {"ternary": _ints(kx, (m, k), -1, 2), "int8": _ints(kx, (m, k), -127, 128),
          "bf16": jax.random.normal(kx, (m, k), jnp.bfloat16)}
    timed = [(label, bs, act, jax.jit(lambda x, ws, fn=fn: [fn(x, w) for w in ws]),
              (xs[act], ws)) for label, bs, act, fn in _variants(m, good)]
    w_bf16 = [t.astype(jnp.bfloat16) for t in ts]
    timed.append(("xla bf16 dot", None, "bf16", jax.jit(lambda x, ws: [
        jnp.dot(x, w, preferred_element_type=jnp.float32) for w in ws]), (xs["bf16"], w_bf16)))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # compiles in parallel
      for _, _, _, f, a in timed:
        pool.submit(lambda f, a: f.lower(*a).compile(), f, a)
    packed = 8 * -(-k // 32) * n
    for label, bs, act, fn, fargs in timed:
      row = dict(m=m, k=k, n=n, impl=label, act=act,
                 block_sizes=dataclasses.asdict(bs) if bs else None)
      try:
        us, mean, wall, kernels_us = device_time(fn, fargs, sets)
        nbytes = (2 * k * n if label == "xla bf16 dot" else packed) + m * k * (
            2 if act == "bf16" else 1) + 4 * m * n
        row.update(us=us, mean_us=mean, wall_us=wall, tops_eq=2 * m * k * n / us / 1e6,
                   hbm_frac=nbytes / (us * 1e-6) / bw, kernels=kernels_us)
      except Exception as e:
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
      rows.append(row)
      print(json.dumps({**{kk: v for kk, v in row.items() if kk != "kernels"},
                        "kernel_us": [kern["us"] for kern in row.get("kernels", ())]}),
            flush=True)
    with open(args.out, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                     command=" ".join(sys.argv), checks={str(b): v for b, v in checked.items()},
                     rows=rows), f, indent=1)
  print("\nbest per shape and activation (device µs; ratio = XLA bf16 dot / best):")
  for m, k, n in shapes:
    here = [r for r in rows if (r["m"], r["k"], r["n"]) == (m, k, n) and "us" in r]
    ref = next((r["us"] for r in here if r["impl"] == "xla bf16 dot"), float("nan"))
    for act in ("ternary", "int8", "bf16"):
      cand = [r for r in here if r["act"] == act and r["impl"] != "xla bf16 dot"]
      if cand:
        b = min(cand, key=lambda r: r["us"])
        print(f"{m}x{k}x{n} {act:8s} {b['us']:8.2f} {ref / b['us']:5.2f}x "
              f"{100 * b['hbm_frac']:5.1f}% HBM  {b['impl']} {b['block_sizes']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
