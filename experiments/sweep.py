"""Hyper-parameter search per method with Optuna: lr, batch size, TWN's δ, TTQ's t, ADMM's ρ.

  python experiments/sweep.py --task lenet5-mnist --trials 24 --epochs 10 --parallel 15
  python experiments/compare_methods.py --task lenet5-mnist \
      --best experiments/results/sweep-lenet5-mnist/sweep.json

One Optuna study per method (TPE sampler, seeded; stored in ``--work``/optuna.journal, so a
cut sweep continues with the same command), whose first trial is the comparison's default
settings (:func:`default_params`); each trial is one training (experiments/methods.py,
``--parallel`` processes sharing the GPU) scored on validation accuracy: the last
``methods.VALIDATION_SIZE`` training images are held out and the test set is not used.
``--out``/sweep.json holds every trial and the best configuration per method (the format
compare_methods.py ``--best`` reads); it is rewritten after each trial.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import methods

BATCH_SIZES = {"lenet5-mnist": (64, 128, 256), "resnet20-cifar10": (128, 256, 512)}


# The QuantConfig fields searched per method (stochastic: δ of its scale, TWN's α; ADMM: ρ's
# schedule and the training forward): ("float", low, high[, log]) or ("categorical", choices).
SPACE = {
    "twn": {"delta": ("float", 0.3, 1.2)},
    "stochastic": {"delta": ("float", 0.3, 1.2)},
    "ttq": {"ttq_threshold": ("float", 0.01, 0.3, True)},
    "admm": {"admm_rho": ("float", 1e-6, 1e-2, True),
             "admm_rho_end": ("float", 1e-2, 1e2, True),
             "admm_every": ("categorical", (50, 100, 200)),
             "admm_forward": ("categorical", ("float", "projected"))},
}


def _suggest(trial, name: str, kind: str, *args):
  if kind == "float":
    low, high, *log = args
    return trial.suggest_float(name, low, high, log=bool(log and log[0]))
  return trial.suggest_categorical(name, args[0])


def suggest(trial, method: str, base_lr: float, batch_sizes) -> dict:
  """A trial's ``lr``, ``batch_size`` and ``quant`` (the fields of :data:`SPACE` over
  ``methods.DEFAULTS``)."""
  quant = methods.method_quant(method, {name: _suggest(trial, name, *space)
                                        for name, space in SPACE.get(method, {}).items()})
  return {"lr": trial.suggest_float("lr", base_lr / 4, base_lr * 4, log=True),
          "batch_size": trial.suggest_categorical("batch_size", tuple(batch_sizes)),
          "quant": quant}


def default_params(method: str, recipe, batch_sizes) -> dict:
  """The comparison's settings without a sweep (the recipe's lr and batch size, the method's
  ``methods.DEFAULTS`` or quantizer defaults) as the parameters of :func:`suggest`: each
  study's first trial, so that the best found is never one the defaults beat on validation."""
  from ternjax import QuantConfig

  default, given = QuantConfig(weights=method), methods.DEFAULTS.get(method, {})
  params = {"lr": recipe.lr}
  if recipe.batch_size in batch_sizes:
    params["batch_size"] = recipe.batch_size
  params.update({name: given[name] if name in given else getattr(default, name)
                 for name in SPACE.get(method, {})})
  return params


def _trial_row(t) -> dict:
  return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
          **t.user_attrs}


def summary(args, studies: dict, command: str) -> dict:
  """The sweep.json content: every trial, and per method the best trial's configuration."""
  import optuna

  best = {}
  for method, study in studies.items():
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if done:
      t = max(done, key=lambda t: t.value)
      best[method] = {"validation_accuracy": t.value, "trial": t.number,
                      **t.user_attrs["config"]}
  return {"task": args.task, "command": command, "epochs": args.epochs, "limit": args.limit,
          "objective": f"validation accuracy: the last {methods.VALIDATION_SIZE} training "
                       "images held out (a fifth of them with --limit), seed 0",
          "trials": {m: [_trial_row(t) for t in s.trials] for m, s in studies.items()},
          "best": best}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line, exit 2
  p.add_argument("--task", choices=tuple(methods.TASKS), default="lenet5-mnist")
  p.add_argument("--methods", nargs="+", choices=methods.METHODS, default=list(methods.METHODS))
  p.add_argument("--trials", type=int, default=20, help="trials per method")
  p.add_argument("--epochs", type=int, help="epochs per trial (default: the recipe's)")
  p.add_argument("--batch-sizes", nargs="+", type=int, help="choices (default: per task)")
  p.add_argument("--limit", type=int, help="use only the first N train examples")
  p.add_argument("--parallel", type=int, default=1, help="trials at a time (sharing the GPU)")
  p.add_argument("--time-limit", type=float,
                 help="seconds; then running trials are killed (rerun the command to go on)")
  p.add_argument("--seed", type=int, default=0, help="the samplers' seed")
  p.add_argument("--data-dir", help="data root (else $TERNJAX_DATA, else ~/.cache/ternjax)")
  p.add_argument("--work", help="trial run directories and the Optuna journal "
                                "(default runs/sweep-TASK)")
  p.add_argument("--out", help="where sweep.json goes (default experiments/results/sweep-TASK)")
  args = p.parse_args(argv)
  for name in ("trials", "parallel", "limit", "epochs"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      p.error(f"--{name} must be positive, got {getattr(args, name)}")
  if args.batch_sizes and min(args.batch_sizes) < 1:
    p.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
  args.batch_sizes = args.batch_sizes or BATCH_SIZES[args.task]
  args.work = Path(args.work or f"runs/sweep-{args.task}")
  args.out = Path(args.out or f"experiments/results/sweep-{args.task}")
  return args


def main(argv=None) -> dict:
  import optuna

  args = parse_args(argv)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  command = "python experiments/sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
  args.work.mkdir(parents=True, exist_ok=True)
  args.out.mkdir(parents=True, exist_ok=True)
  storage = optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(str(args.work / "optuna.journal")))
  studies = {m: optuna.create_study(
      study_name=f"{args.task}-{m}", storage=storage, direction="maximize",
      sampler=optuna.samplers.TPESampler(seed=args.seed), load_if_exists=True)
      for m in args.methods}
  for study in studies.values():  # trials of a cut sweep that never finished
    for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
      study.tell(t.number, state=optuna.trial.TrialState.FAIL)
  _, recipe = methods.recipe(args.task)
  for method, study in studies.items():
    if not study.trials:
      study.enqueue_trial(default_params(method, recipe, args.batch_sizes))

  def pending():
    """Specs, asked from the studies one at a time as places free up (round robin)."""
    left = {m: args.trials - sum(t.state == optuna.trial.TrialState.COMPLETE
                                 for t in s.trials) for m, s in studies.items()}
    while any(n > 0 for n in left.values()):
      for method in [m for m, n in left.items() if n > 0]:
        left[method] -= 1
        trial = studies[method].ask()
        config = suggest(trial, method, recipe.lr, args.batch_sizes)
        trial.set_user_attr("config", config)
        yield {"task": args.task, "method": method, "seed": 0, "epochs": args.epochs,
               "limit": args.limit, "data_dir": args.data_dir, "validation": True,
               "overwrite": True, "trial": trial.number,
               "workdir": str(args.work / f"{method}-t{trial.number}"), **config}

  def done(spec, result, why, log_tail):
    study = studies[spec["method"]]
    if result is None:
      study.tell(spec["trial"], state=optuna.trial.TrialState.FAIL)
      print(f"{spec['method']} trial {spec['trial']}: {why}; log tail:\n{log_tail}", flush=True)
    else:
      study.tell(spec["trial"], result["test_accuracy"])
      print(f"{spec['method']} trial {spec['trial']}: validation "
            f"{100 * result['test_accuracy']:.2f}% {spec['quant']} lr {spec['lr']:.2e} "
            f"batch {spec['batch_size']}", flush=True)
    (args.out / "sweep.json").write_text(json.dumps(summary(args, studies, command),
                                                    indent=2) + "\n")

  methods.run_all(pending(), args.parallel, args.time_limit, done)
  result = summary(args, studies, command)
  (args.out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
  for method, best in result["best"].items():
    print(f"best {method}: validation {100 * best['validation_accuracy']:.2f}% "
          f"(trial {best['trial']}): lr {best['lr']:.3g}, batch {best['batch_size']}, "
          f"{best['quant']}")
  return result


if __name__ == "__main__":
  main()
