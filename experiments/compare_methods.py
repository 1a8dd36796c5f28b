"""FP, TWN, TTQ, stochastic and ADMM weights side by side: same data, seeds and budget.

  python experiments/compare_methods.py --task lenet5-mnist --parallel 15
  python experiments/compare_methods.py --task resnet20-cifar10 --parallel 15 --epochs 40 \\
      --time-limit 470
  python experiments/compare_methods.py --task lenet5-mnist --best sweep/sweep.json  # tuned
  python experiments/compare_methods.py --task lenet5-mnist --limit 256 --epochs 1 --seeds 0

Every run is one process of experiments/methods.py (``--parallel`` at a time, sharing the GPU)
training through the shared loop with the task's recipe (mnist.py / cifar10.py ``RECIPES``),
the method's settings (``methods.DEFAULTS``, else the quantizer's, updated with a sweep's best
configuration with ``--best``). Run directories go under ``--work`` and are resumed: a call
cut by ``--time-limit`` (or killed) continues with the same command, finished runs are only
read. ``--out`` receives results.csv (one row per run), results.md (mean ± std over seeds,
the goals), results.json (everything, with the test accuracy of every epoch),
accuracy_vs_size.png and accuracy_over_epochs.png.

Deployed size: every run's trained model is exported (ternjax.export) and its size is the
export directory on disk.
The test accuracy of every method is that of the deployed (ternary) weights: eval mode uses
the codes (ADMM: the hard projection of its float weights).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
from pathlib import Path

import methods

# Goal: every ternary method within this many points of FP (mean over seeds); a reference.
GOALS = {"lenet5-mnist": {"within": 0.2},
         "resnet20-cifar10": {"within": 0.5, "reference": ("TTQ paper, ResNet-20", 91.13)}}
CSV_FIELDS = ("task", "method", "seed", "status", "epochs", "test_accuracy",
              "test_accuracy_exact", "best_test_accuracy", "train_time_s", "compile_time_s",
              "sparsity", "deployed_bytes", "size_source", "float32_bytes", "lr", "batch_size",
              "quant", "device", "workdir")


def settings(method: str, best: dict | None, batch_size: int | None) -> dict:
  """``lr``, ``batch_size`` (None: the recipe's) and ``quant`` of a method's runs: the sweep's
  best configuration if given, its ``quant`` over ``methods.DEFAULTS``
  (:func:`methods.method_quant`); ``batch_size`` overrides both."""
  found = (best or {}).get(method, {})
  return {"lr": found.get("lr"), "batch_size": batch_size or found.get("batch_size"),
          "quant": methods.method_quant(method, found.get("quant"))}


def specs(args, best) -> list[dict]:
  work = Path(args.work)
  return [{"task": args.task, "method": m, "seed": s, "epochs": args.epochs,
           "limit": args.limit, "data_dir": args.data_dir, "overwrite": args.overwrite,
           "workdir": str(work / f"{m}-s{s}"), **settings(m, best, args.batch_size)}
          for s in args.seeds for m in args.methods]


def row(spec: dict, result: dict | str) -> dict:
  """A results.csv row: ``status`` 'done', or (``result`` a string) why there is no result."""
  base = {"task": spec["task"], "method": spec["method"], "seed": spec["seed"],
          "workdir": spec["workdir"], "quant": json.dumps(spec["quant"])}
  if isinstance(result, str):
    metrics = Path(spec["workdir"]) / "metrics.jsonl"
    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    return {**base, "status": f"{result} ({done} epochs saved)"}
  deployed = result.get("export_disk_bytes", result["packed_bytes"])
  return {**base, "status": "done", "epochs": result["epochs"],
          "test_accuracy": result["test_accuracy"],
          "test_accuracy_exact": result.get("test_accuracy_exact"),
          "best_test_accuracy": result["best_test_accuracy"],
          "train_time_s": round(result["train_time_s"], 1),
          "compile_time_s": round(result["compile_time_s"], 1), "sparsity": result["sparsity"],
          "deployed_bytes": deployed,
          "size_source": "export on disk" if "export_disk_bytes" in result
                         else "summary packed bytes",
          "float32_bytes": result["float32_bytes"], "lr": result["train"]["lr"],
          "batch_size": result["train"]["batch_size"], "device": result["device"]}


def curves(spec: dict) -> list[float]:
  path = Path(spec["workdir"]) / "metrics.jsonl"
  lines = path.read_text().splitlines() if path.exists() else []
  return [json.loads(l)["test_accuracy"] for l in lines if l.strip()]


def _mean_std(values: list[float]) -> tuple[float, float]:
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict], method_order) -> dict[str, dict]:
  """Per method: accuracies (percent) over seeds, their mean and std, size, sparsity, time."""
  out = {}
  for m in method_order:
    done = [r for r in rows if r["method"] == m and r["status"] == "done"]
    if not done:
      continue
    acc = [100 * r["test_accuracy"] for r in sorted(done, key=lambda r: r["seed"])]
    mean, std = _mean_std(acc)
    out[m] = {"seeds": sorted(r["seed"] for r in done), "accuracy": acc, "mean": mean,
              "std": std, "deployed_bytes": statistics.fmean(r["deployed_bytes"] for r in done),
              "size_source": done[0]["size_source"],
              "sparsity": None if done[0]["sparsity"] is None
                          else statistics.fmean(r["sparsity"] for r in done),
              "train_time_s": statistics.fmean(r["train_time_s"] for r in done)}
    if done[0].get("test_accuracy_exact") is not None:
      out[m]["exact_mean"] = statistics.fmean(100 * r["test_accuracy_exact"] for r in done)
  return out


def markdown(args, stats: dict, rows: list[dict], command: str) -> str:
  goal = GOALS[args.task]
  fp = stats.get("fp")
  lines = [f"# Method comparison: {args.task}", "",
           f"Command: `{command}`", "",
           f"Machine: {rows[0].get('device', '?') if rows else '?'}; {platform.node()}; "
           f"{args.parallel} runs at a time sharing it. Final-epoch test accuracy of the "
           "deployed (ternary) weights, mean ± std over seeds.", ""]
  exact = any("exact_mean" in s for s in stats.values())
  head = ["method", "test accuracy %", "Δ vs FP (points)",
          f"goal: within {goal['within']} of FP", "seeds → accuracy %", "deployed bytes",
          "× smaller than FP", "sparsity", "train s"]
  if exact:
    head.insert(2, "exact records %")
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m, s in stats.items():
    delta = None if fp is None else s["mean"] - fp["mean"]
    met = "-" if m == "fp" or delta is None else ("yes" if delta >= -goal["within"] else "**no**")
    cells = [m, f"{s['mean']:.2f} ± {s['std']:.2f}",
             "-" if delta is None or m == "fp" else f"{delta:+.2f}", met,
             " / ".join(f"{s_}: {a:.2f}" for s_, a in zip(s["seeds"], s["accuracy"])),
             f"{s['deployed_bytes']:,.0f}",
             "-" if fp is None else f"{fp['deployed_bytes'] / s['deployed_bytes']:.1f}",
             "-" if s["sparsity"] is None else f"{100 * s['sparsity']:.1f}%",
             f"{s['train_time_s']:.0f}"]
    if exact:
      cells.insert(2, f"{s.get('exact_mean', float('nan')):.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  size_source = next(iter(stats.values()))["size_source"] if stats else ""
  lines += ["", f"Deployed size: {size_source}."]
  if "reference" in goal:
    name, value = goal["reference"]
    for label, key in (("Best ternary method", "mean"),
                       ("On the exact test records (the figure comparable to a paper's test set)",
                        "exact_mean")):
      ternary = {m: s[key] for m, s in stats.items() if m != "fp" and key in s}
      if ternary:
        m = max(ternary, key=ternary.get)
        lines.append(f"{label}: {m} {ternary[m]:.2f}% "
                     f"({'above' if ternary[m] > value else 'not above'} {name}: {value}%).")
  missing = [r for r in rows if r["status"] != "done"]
  if missing:
    lines += ["", "Runs without a result (not in the table): " + ", ".join(
        f"{r['method']} seed {r['seed']}: {r['status']}" for r in missing)]
  settings_lines = sorted({f"{r['method']}: lr {r.get('lr')}, batch {r.get('batch_size')}, "
                           f"quant {r['quant']}" for r in rows if r["status"] == "done"})
  lines += ["", "Settings: " + "; ".join(settings_lines) + "."]
  return "\n".join(lines) + "\n"


def plots(out: Path, stats: dict, all_curves: dict, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for m, s in stats.items():
    ax.errorbar(s["deployed_bytes"] / 1024, s["mean"], yerr=s["std"], fmt="o", capsize=3,
                label=m)
    ax.annotate(m, (s["deployed_bytes"] / 1024, s["mean"]), textcoords="offset points",
                xytext=(5, 5))
  ax.set(xscale="log", xlabel=f"deployed size, KiB ({next(iter(stats.values()))['size_source']})"
         if stats else "deployed size, KiB", ylabel="test accuracy %", title=title)
  _save(fig, ax, out / "accuracy_vs_size.png", legend=bool(stats))

  fig, ax = plt.subplots(figsize=(6, 4))
  finals = []
  for m, runs in all_curves.items():
    runs = [c for c in runs if c]
    if not runs:
      continue
    n = min(map(len, runs))
    mean = [100 * statistics.fmean(c[e] for c in runs) for e in range(n)]
    finals.append(mean[-1])
    ax.plot(range(1, n + 1), mean, label=f"{m} ({len(runs)} seeds)")
  if finals:
    ax.set_ylim(max(0, min(finals) - 3), min(100, max(finals) + 0.5))
  ax.set(xlabel="epoch", ylabel="test accuracy % (mean over seeds)", title=title)
  _save(fig, ax, out / "accuracy_over_epochs.png", legend=bool(finals))


def _save(fig, ax, path: Path, legend: bool) -> None:
  """Grid, legend (when something was drawn), tight layout; writes the PNG, frees the figure."""
  import matplotlib.pyplot as plt

  ax.grid(alpha=0.3)
  if legend:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line, exit 2
  p.add_argument("--task", choices=tuple(methods.TASKS), default="lenet5-mnist")
  p.add_argument("--methods", nargs="+", choices=methods.METHODS, default=list(methods.METHODS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--epochs", type=int, help="epochs of every run (default: the recipe's)")
  p.add_argument("--limit", type=int, help="use only the first N train and test examples")
  p.add_argument("--batch-size", type=int, help="every run's batch size (default: the "
                                                  "recipe's, or --best's)")
  p.add_argument("--parallel", type=int, default=1, help="runs at a time (sharing the GPU)")
  p.add_argument("--time-limit", type=float,
                 help="seconds; then running runs are killed (rerun the command to resume)")
  p.add_argument("--best", help="a sweep.py JSON: use its best configuration per method")
  p.add_argument("--data-dir", help="data root (else $TERNJAX_DATA, else ~/.cache/ternjax)")
  p.add_argument("--work", help="run directories (default runs/compare-TASK)")
  p.add_argument("--out", help="results (default experiments/results/compare-TASK)")
  p.add_argument("--overwrite", action="store_true",
                 help="start every run again (deletes its run directory)")
  args = p.parse_args(argv)
  for name in ("parallel", "limit", "epochs", "batch_size"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
  args.best_config = None
  if args.best:
    try:
      sweep = json.loads(Path(args.best).read_text())
    except (OSError, json.JSONDecodeError) as err:
      p.error(f"--best {args.best}: cannot read it as JSON ({err})")
    if sweep.get("task") != args.task or "best" not in sweep:
      p.error(f"--best {args.best}: not a sweep.py summary for task {args.task}")
    args.best_config = sweep["best"]
  args.work = args.work or f"runs/compare-{args.task}"
  args.out = args.out or f"experiments/results/compare-{args.task}"
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  command = "python experiments/compare_methods.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  runs = specs(args, args.best_config)
  results = {}

  def done(spec, result, why, log_tail):
    results[(spec["method"], spec["seed"])] = result or why
    status = f"{100 * result['test_accuracy']:.2f}%" if result else f"{why}; log tail:\n{log_tail}"
    print(f"{spec['method']} seed {spec['seed']}: {status}", flush=True)

  methods.run_all(runs, args.parallel, args.time_limit, done)
  rows = [row(s, results.get((s["method"], s["seed"]), "not started")) for s in runs]
  stats = aggregate(rows, args.methods)
  all_curves = {m: [curves(s) for s, r in zip(runs, rows) if s["method"] == m and
                    r["status"] == "done"] for m in args.methods}
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  table = markdown(args, stats, rows, command)
  (out / "results.md").write_text(table)
  (out / "results.json").write_text(json.dumps(
      {"task": args.task, "command": command, "rows": rows, "stats": stats,
       "curves": all_curves}, indent=2) + "\n")
  plots(out, stats, all_curves, args.task)
  print(table)
  return {"rows": rows, "stats": stats}


if __name__ == "__main__":
  main()
