"""Runs a named set of CIFAR-10 trainings and benchmarks concurrently on one GPU, and gathers
their results into few files (a GPU call brings back at most 8 files).

  python experiments/cifar10_batch.py probe --data-dir /root/c10/bin --out $OUT
  python experiments/cifar10_batch.py main1 --data-dir /root/c10/bin --out $OUT --budget-s 420
  python experiments/cifar10_batch.py main2 ...  # after main1 on the same machine
  python experiments/cifar10_batch.py zoo --data-dir /root/c10/bin --out $OUT --limit-s 330
  python experiments/cifar10_batch.py twins --data-dir /root/c10/bin --out $OUT --limit-s 240
  python experiments/cifar10_batch.py aternary --data-dir /root/c10/bin --out $OUT

Plans are phases run one after another; the runs of a phase share the GPU as separate
processes (XLA_PYTHON_CLIENT_PREALLOCATE=false, one persistent compilation cache, so the seeds
of one model compile once). Every run is killed after --limit-s seconds (its metrics.jsonl and
checkpoints stay; ``cifar10.py --resume`` continues it). Run directories (with checkpoints)
live under --work; --out receives results.md and results.json (every run's summary, the
benchmark rows), cifar10_PLAN.tar.gz (each run's summary/metrics/report JSON, PNGs and log
tail), and the confusion and confidence PNGs of the best ternary ResNet-18.

Runs with ``--export`` (the ``zoo`` and ``twins`` plans) also get, in results.json/md, the
export's size (bytes, bits per ternary weight: ternjax.export.size_report) and its inference
throughput on this GPU (ternjax-predict's measurement, the JAX runtime on the 10,000 test
images); the exports of the zoo's entries (``ZOO``) come back as zoo_exports.tar.gz, which
``experiments/build_zoo.py --from-batch`` turns into zoo entries.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from ternjax import cli

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cifar10 import RECIPES  # noqa: E402

CIFAR = [sys.executable, str(HERE / "cifar10.py")]
BENCH = [sys.executable, str(HERE / "bench_train.py")]
TRAIN_EXAMPLES = 50_000
KEPT = ("summary.json", "metrics.jsonl", "report.json", "confusion.png", "confidence.png",
        "bench_train.json")


def _train(name, model, *extra, epochs=None):
  return name, model, [*CIFAR, "--model", model, *extra], epochs


def _exported(name, model, *extra, epochs=None):
  return _train(name, model, *extra, "--export", f"{{work}}/exports/{name}", epochs=epochs)


# Epochs of the zoo and twins plans (float and ternary twins get the same), sized so that each
# plan's runs, sharing one H200, train and export in about 330 / 240 s.
ZOO_EPOCHS = {"resnet20": 60, "mobilenetv2": 20, "vit_tiny": 30}
# run name -> zoo entry name (experiments/build_zoo.py --from-batch)
ZOO = {"resnet20-ttq": "resnet20-cifar10-ttq", "resnet20-twn": "resnet20-cifar10-twn",
       "mobilenetv2-twn": "mobilenetv2-cifar10-twn", "vit_tiny-twn": "vit_tiny-cifar10-twn",
       "mobilenetv2-twn-fpdw": "mobilenetv2-cifar10-twn-fpdw"}


def plans() -> dict[str, list[list[tuple]]]:
  """name -> phases -> (run name, model, argv, epochs or None: the model's --epochs).

  ``{work}`` in an argument is the --work folder (``main2`` fine-tunes ``main1``'s float runs,
  so it runs on the same machine after it).
  """
  probe = [
      [_train(f"{m}-{w}", m, "--weights", w, epochs=2) for m in ("resnet20", "resnet18", "vgg7")
       for w in ("fp", "twn")],
      [("bench", None, [*BENCH, "--steps", "20", "--repeats", "3"], None)],
  ]
  main1 = [[_train(f"resnet20-fp-s{s}", "resnet20", "--weights", "fp", "--seed", str(s))
            for s in (0, 1, 2)] + [
      _train("resnet18-twn", "resnet18", "--weights", "twn"),
      _train("resnet18-fp", "resnet18", "--weights", "fp"),  # also: exact vs degraded records
  ]]
  main2 = [[_train(f"resnet20-twn-ft-s{s}", "resnet20", "--weights", "twn", "--seed", str(s),
                   "--init-from", f"{{work}}/resnet20-fp-s{s}", "--lr", "0.02",
                   "--warmup-epochs", "0", epochs=30) for s in (0, 1, 2)] + [
      _train("resnet18-twn-aternary", "resnet18", "--weights", "twn", "--activations", "ternary"),
      _train("vgg7-fp", "vgg7", "--weights", "fp"),
      _train("vgg7-twn", "vgg7", "--weights", "twn"),
  ]]
  zoo = [[_exported(f"{m}-{w}", m, "--weights", w, epochs=ZOO_EPOCHS[m])
          for m, w in (("resnet20", "ttq"), ("resnet20", "twn"), ("mobilenetv2", "twn"),
                       ("vit_tiny", "twn"))]]
  twins = [
      [_exported("mobilenetv2-fp", "mobilenetv2", "--weights", "fp",
                 epochs=ZOO_EPOCHS["mobilenetv2"]),
       _exported("mobilenetv2-twn-fpdw", "mobilenetv2", "--weights", "twn", "--fp-depthwise",
                 epochs=ZOO_EPOCHS["mobilenetv2"]),
       _exported("vit_tiny-fp", "vit_tiny", "--weights", "fp", epochs=ZOO_EPOCHS["vit_tiny"])],
      [("bench", None, [*BENCH, "--models", "resnet18", "mobilenetv2", "vit_tiny", "--weights",
                        "fp", "twn", "--steps", "10", "--repeats", "2"], None)],
  ]
  # Ternary activations (LSQ gradient scale per example, the scale at the lr): the recipe's 40
  # epochs and the 80-epoch schedule.
  wa = ("resnet18", "--weights", "twn", "--activations", "ternary")
  aternary = [[_train("resnet18-twn-aternary", *wa),
               _train("resnet18-twn-aternary-e80", *wa, epochs=80)]]
  return {"probe": probe, "main1": main1, "main2": main2, "zoo": zoo, "twins": twins,
          "aternary": aternary}


def fit_epochs(phase, args, work: Path, env) -> dict[str, int]:
  """Per-model epochs so that the phase's summed step time fits --budget-s.

  Benchmarks each (model, fp / twn) of the phase alone first (experiments/bench_train.py at the
  recipe's batch), predicts every run's time as epochs × steps per epoch × its step time, and
  scales the recipes' epochs by one factor (at most 1). Runs sharing the GPU overlap, so the
  sum over-estimates the wall time of small models: the fit is conservative.
  """
  models = sorted({m for _, m, _, _ in phase if m})
  out = work / "fit" / "bench_train.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  subprocess.run([*BENCH, "--models", *models, "--weights", "fp", "twn", "--steps", "20",
                  "--repeats", "2", "--out", str(out)], env=env, check=True)
  rows = json.loads(out.read_text())["rows"]
  step_s = {(r["model"], r["weights"]): r["step_ms"] / 1e3 for r in rows}
  batch = {r["model"]: r["batch"] for r in rows}
  recipe = {m: args.epochs.get(m) or RECIPES[m].epochs for m in models}
  cost = lambda m, argv, e: e * (TRAIN_EXAMPLES // batch[m]) * step_s[
      (m, "fp" if argv[argv.index("--weights") + 1] == "fp" else "twn")]
  fixed = sum(cost(m, a, e) for _, m, a, e in phase if m and e)
  scaled = sum(cost(m, a, recipe[m]) for _, m, a, e in phase if m and not e)
  factor = min(1.0, max(args.budget_s - fixed, 0) / scaled) if scaled else 1.0
  fitted = {m: max(1, int(recipe[m] * factor)) for m in models}
  print(f"fit: predicted {fixed + scaled:.0f} s of steps for budget {args.budget_s:.0f} s, "
        f"epochs x{factor:.2f}: {fitted}", flush=True)
  return fitted


def _launch(name, model, argv, epochs, args, work: Path, env,
            fitted: dict) -> tuple[str, subprocess.Popen]:
  argv = [a.format(work=work) for a in argv]
  if model is not None:
    epochs = args.epochs.get(model) or epochs or fitted.get(model)
    argv += ["--data-dir", str(args.data_dir), "--out", str(work / name), "--overwrite"]
    argv += ["--epochs", str(epochs)] if epochs else []
  else:
    argv += ["--out", str(work / name / "bench_train.json")]
    (work / name).mkdir(parents=True, exist_ok=True)
  log = open(work / f"{name}.log", "w")
  print(f"start {name}: {' '.join(argv[1:])}", flush=True)
  return name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_plan(args) -> list[dict]:
  work = Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1",
         "JAX_COMPILATION_CACHE_DIR": str(work / "jax-cache")}
  results = []
  for phase in plans()[args.plan]:
    fitted = fit_epochs(phase, args, work, env) if args.budget_s else {}
    start = time.monotonic()
    procs = [_launch(*run, args, work, env, fitted) for run in phase]
    for name, proc in procs:
      try:
        code = proc.wait(timeout=max(args.limit_s - (time.monotonic() - start), 1))
      except subprocess.TimeoutExpired:
        proc.kill()
        code = f"killed after {args.limit_s} s"
      results.append({"run": name, "exit": code, "wall_s": round(time.monotonic() - start, 1)})
      print(f"done {name}: exit {code}, {results[-1]['wall_s']} s", flush=True)
  return results


def exported(export: Path, data_dir: Path) -> dict:
  """An export's size and its inference throughput on this machine (ternjax-predict)."""
  from ternjax import export as tjexport
  size = tjexport.size_report(export)
  result = {"disk_bytes": size["disk_bytes"], "array_bytes": size["array_bytes"],
            "bits_with_scales": size["bits_with_scales"],
            "ternary_weights": size["ternary_weights"], "float32_bytes": size["float32_bytes"]}
  try:
    run = subprocess.run([sys.executable, "-m", "ternjax.predict", str(export), "--json",
                          "--batch-size", "500", "--data-dir", str(data_dir)],
                         capture_output=True, text=True, check=True, timeout=120)
    timed = json.loads(run.stdout)
    result.update(export_accuracy=timed["accuracy"], infer_images_per_s=timed["images_per_s"])
  except (subprocess.SubprocessError, ValueError) as err:
    result["infer_error"] = f"{type(err).__name__}: {str(err)[:200]}"
  return result


def gather(args, results: list[dict]) -> None:
  """Writes the results, then the zoo's exports, then measures each export (size, inference
  throughput) and rewrites the results: a call cut short still brings back what was done."""
  work, out = Path(args.work), Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows, bench = [], []
  with tarfile.open(out / f"cifar10_{args.plan}.tar.gz", "w:gz") as tar:
    for r in results:
      run = work / r["run"]
      for name in KEPT:
        if (run / name).exists():
          tar.add(run / name, f"{r['run']}/{name}")
      log = work / f"{r['run']}.log"
      tail = log.read_text(errors="replace")[-20000:] if log.exists() else ""
      info = tarfile.TarInfo(f"{r['run']}/log_tail.txt")
      info.size = len(tail.encode())
      tar.addfile(info, io.BytesIO(tail.encode()))
      if (run / "bench_train.json").exists():
        bench = json.loads((run / "bench_train.json").read_text())["rows"]
      metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
                 if l.strip()] if (run / "metrics.jsonl").exists() else []
      summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() \
          else {}
      last = metrics[-1] if metrics else {}
      rows.append({**r, "epochs_done": last.get("epoch"),
                   "test_accuracy": last.get("test_accuracy"),
                   "test_accuracy_exact": last.get("test_accuracy_exact"),
                   "test_accuracy_degraded": last.get("test_accuracy_degraded"),
                   "train_time_s": summary.get("train_time_s",
                                               sum(m["epoch_time"] for m in metrics)),
                   "compile_time_s": summary.get("compile_time_s"),
                   "train_images_per_s": summary.get("train_images_per_s"),
                   "sparsity": last.get("sparsity")})
  write_results(out, args.plan, rows, bench)
  exports = {r["run"]: work / "exports" / r["run"] for r in results
             if (work / "exports" / r["run"] / "checksums.json").exists()}
  zoo = {ZOO[run]: run for run in exports if run in ZOO}
  if zoo:
    with tarfile.open(out / "zoo_exports.tar.gz", "w:gz") as tar:
      for entry, run in zoo.items():
        tar.add(exports[run], entry)
      listing = json.dumps(sorted(zoo)).encode()
      info = tarfile.TarInfo("zoo_entries.json")
      info.size = len(listing)
      tar.addfile(info, io.BytesIO(listing))
  best = work / "resnet18-twn"
  for name in ("confusion.png", "confidence.png"):
    if (best / name).exists():
      (out / f"resnet18-twn-{name}").write_bytes((best / name).read_bytes())
  for row in rows:
    if row["run"] in exports:
      row.update(exported(exports[row["run"]], args.data_dir))
      write_results(out, args.plan, rows, bench)
  print((out / "results.md").read_text())


def write_results(out: Path, plan: str, rows: list[dict], bench: list[dict]) -> None:
  """results.json and results.md of the plan's runs (and exports, benchmark rows)."""
  (out / "results.json").write_text(json.dumps({"plan": plan, "runs": rows,
                                                "bench": bench}, indent=2) + "\n")
  pct = lambda v: "-" if v is None else f"{100 * v:.2f}"
  bits = lambda v: "-" if v is None else f"{v:.3f}"
  lines = [f"# CIFAR-10 plan '{plan}'", "",
           "| run | exit | epochs | test % | exact 0..999 % | degraded % | train s | compile s "
           "| img/s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['run']} | {r['exit']} | {r['epochs_done']} | {pct(r['test_accuracy'])} "
                 f"| {pct(r['test_accuracy_exact'])} | {pct(r['test_accuracy_degraded'])} "
                 f"| {r['train_time_s'] or 0:.0f} | {r['compile_time_s'] or 0:.0f} "
                 f"| {r['train_images_per_s'] or 0:,.0f} |")
  sized = [r for r in rows if "disk_bytes" in r]
  if sized:
    lines += ["", "| run | export bytes | bits/weight (codes+scales) | ternary weights | float32 "
              "bytes | export acc % | inference img/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['disk_bytes']:,} | {bits(r['bits_with_scales'])} | "
              f"{r['ternary_weights']:,} | {r['float32_bytes']:,} | "
              f"{pct(r.get('export_accuracy'))} | {r.get('infer_images_per_s', 0):,.0f} |"
              for r in sized]
  if bench:
    lines += ["", "| model | weights | batch | ms/step | img/s | x float |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {b['model']} | {b['weights']} | {b['batch']} | {b['step_ms']:.2f} "
              f"| {b['images_per_s']:,.0f} | {b['vs_float'] or 1:.3f} |" for b in bench]
  (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
  p = cli.Parser(description=__doc__.splitlines()[0])
  p.add_argument("plan", choices=tuple(plans()))
  p.add_argument("--data-dir", required=True, type=cli.existing_dir,
                 help="folder holding the CIFAR-10 .bin files")
  p.add_argument("--out", required=True, help="where the gathered results go ($OUT)")
  p.add_argument("--work", default="/tmp/cifar10_runs", help="run directories (checkpoints)")
  p.add_argument("--epochs", nargs="*", default=[], metavar="MODEL=N",
                 help="epochs per model (over the plan's and the recipe's)")
  p.add_argument("--limit-s", type=cli.positive_float, default=510,
                 help="wall-clock limit per phase")
  p.add_argument("--budget-s", type=cli.positive_float,
                 help="fit the recipes' epochs to this many seconds of summed step time")
  args = p.parse_args(argv)
  try:
    args.epochs = {k: int(v) for k, v in (e.split("=") for e in args.epochs)}
  except ValueError:
    p.error(f"--epochs takes MODEL=N pairs, got {args.epochs}")
  gather(args, run_plan(args))


if __name__ == "__main__":
  main()
