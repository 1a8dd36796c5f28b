"""Load time of each shipped zoo model (goal: ternjax.zoo.load(name) in at most 1 s on CPU).

  python experiments/bench_zoo.py                  # every entry, runtimes jax and onnxruntime
  python experiments/bench_zoo.py --repeats 5 --runtimes jax

Each measurement is a fresh Python process (nothing cached in memory; the files in the page
cache after the first): the time to import ternjax.zoo (and its runtime's libraries), then
``zoo.load(name)`` (verifies every file's SHA-256, reads the arrays, deserializes the segments
or builds the ONNX session), then the first call on one image (JIT compilation for the JAX
runtime) and a second call. Medians over --repeats processes; written to
experiments/results/zoo_load.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from ternjax import zoo

RESULTS = Path(__file__).parent / "results"
FRESH = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from ternjax import zoo
if sys.argv[2] == "jax":
  import jax, ternjax.export  # the runtime's libraries: imported before the load is timed
else:
  import onnxruntime, ternjax.runtime_numpy
t1 = time.perf_counter()
net = zoo.load(sys.argv[1], runtime=sys.argv[2])
t2 = time.perf_counter()
x = np.zeros((1, *net.metadata["input_shape"]), np.float32)
np.asarray(net(x))
t3 = time.perf_counter()
np.asarray(net(x))
t4 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, first_call_s=t3 - t2, call_s=t4 - t3)))
"""


def measure(name: str, runtime: str, repeats: int) -> dict:
  runs = []
  for _ in range(repeats):
    out = subprocess.run([sys.executable, "-c", FRESH, name, runtime], capture_output=True,
                         text=True, check=True)
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  return {"name": name, "runtime": runtime, "repeats": repeats,
          **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
          "max_load_s": max(r["load_s"] for r in runs)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--runtimes", nargs="+", choices=zoo.RUNTIMES, default=["jax", "onnxruntime"])
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  rows = [measure(n, r, args.repeats) for n in zoo.list() for r in args.runtimes]
  lines = ["| model | runtime | import s | zoo.load s (median / max) | first call s | call s | "
           "disk bytes |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    size = zoo.card(r["name"])["size"]["disk_bytes"]
    lines.append(f"| {r['name']} | {r['runtime']} | {r['import_s']:.2f} | {r['load_s']:.3f} / "
                 f"{r['max_load_s']:.3f} | {r['first_call_s']:.3f} | {r['call_s']:.4f} | "
                 f"{size:,} |")
  text = "\n".join(lines)
  print(text)
  command = "python experiments/bench_zoo.py " + " ".join(argv or sys.argv[1:])
  machine = f"{platform.machine()} CPU, {platform.python_version()}"
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "zoo_load.json").write_text(json.dumps(dict(command=command.strip(), machine=machine,
                                                     rows=rows), indent=1) + "\n")
  (out / "zoo_load.md").write_text(
      f"# Zoo load time\n\nCommand: `{command.strip()}`; {machine}. Medians of fresh "
      f"processes (the script's docstring says what each column is). Goal: zoo.load ≤ 1 s.\n\n"
      f"{text}\n")
  return 0 if all(r["max_load_s"] <= 1.0 for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
