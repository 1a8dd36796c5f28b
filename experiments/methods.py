"""The tasks and methods of the method comparison (compare_methods.py, sweep.py), and one
training run of them, run as its own process so that several share one GPU.

  python experiments/methods.py SPEC_JSON     # one run (what compare_methods / sweep launch)

A run's spec (JSON): ``task``, ``method`` (a weight quantizer name), ``seed``, ``workdir`` and
optionally ``epochs``, ``lr``, ``batch_size``, ``quant`` (QuantConfig fields, e.g.
``{"delta": 0.6}``, ADMM's ``admm_rho_end`` and ``stochastic_anneal_fraction``:
:func:`resolve_quant`), ``limit``,
``data_dir``, ``validation`` (hold out the last ``VALIDATION_SIZE`` training images and test
on them: what the sweep tunes on), ``overwrite``.
The run trains through the shared loop (``train_and_evaluate``; resuming what ``workdir``
holds), exports the trained model (``workdir/export``, ternjax.export without the ONNX file:
the packed arrays a deployment loads) and writes ``workdir/result.json``: the spec, the loop's
summary and the deployed size (the export's).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("fp", "twn", "ttq", "stochastic", "admm")
VALIDATION_SIZE = 5000  # training images held out for the sweep's objective
# Method settings where the quantizer's defaults are not the comparison's: ADMM's ρ grows
# geometrically from admm_rho to admm_rho_end over the run; the stochastic draws' noise falls
# to the deterministic rounding over the first half of the run (resolve_quant).
DEFAULTS = {"admm": {"admm_rho": 1e-4, "admm_rho_end": 1.0, "admm_every": 100},
            "stochastic": {"stochastic_anneal_fraction": 0.5}}


def method_quant(method: str, chosen: dict | None = None) -> dict:
  """A method's ``quant``: its :data:`DEFAULTS`, updated with ``chosen`` (a sweep's fields)."""
  return {**DEFAULTS.get(method, {}), **(chosen or {})}


@dataclasses.dataclass(frozen=True)
class Task:
  dataset: str
  model: str
  script: str            # the experiment script whose recipe (RECIPES[model]) the runs use


TASKS = {
    "lenet5-mnist": Task("mnist", "lenet5", "mnist"),
    "resnet20-cifar10": Task("cifar10", "resnet20", "cifar10"),
}


def recipe(task: str):
  """The task's experiment script (mnist.py / cifar10.py, a module next to this one) and its
  recipe for the model (``RECIPES[model]``, a TrainConfig)."""
  script = importlib.import_module(TASKS[task].script)
  return script, script.RECIPES[TASKS[task].model]


def build_model(task: str, quant, seed: int):
  """The task's model, set up as its experiment script does (seeded streams 'default' and
  'quant'; CIFAR: first conv float, bf16 compute)."""
  import jax
  from flax import nnx

  from ternjax import models

  key = jax.random.key(seed)
  rngs = nnx.Rngs(default=jax.random.fold_in(key, 0), quant=jax.random.fold_in(key, 1))
  if task == "lenet5-mnist":
    return models.lenet5(quant, rngs=rngs)
  script, _ = recipe(task)
  return models.CIFAR_MODELS["resnet20"](quant, fp_first=True, fp_last=False,
                                         dtype=script.DTYPES["bfloat16"], rngs=rngs)


def _validation_split(data):
  """The training set minus its last VALIDATION_SIZE images, tested on those images."""
  n = len(data.y_train) - min(VALIDATION_SIZE, len(data.y_train) // 5)
  return dataclasses.replace(data, name=f"{data.name}-validation", x_train=data.x_train[:n],
                             y_train=data.y_train[:n], x_test=data.x_train[n:],
                             y_test=data.y_train[n:])


def train_config(spec: dict):
  """The recipe with the spec's overrides (epochs, lr, batch_size, seed)."""
  _, config = recipe(spec["task"])
  given = {k: spec.get(k) for k in ("epochs", "lr", "batch_size")}
  return dataclasses.replace(config, seed=spec["seed"],
                             **{k: v for k, v in given.items() if v is not None})


def resolve_quant(quant: dict, steps: int) -> dict:
  """QuantConfig fields from a spec's ``quant``: ``admm_rho_end`` (ρ after the run's ``steps``
  optimizer steps) becomes the geometric ``admm_growth`` that reaches it from ``admm_rho``;
  ``stochastic_anneal_fraction`` (of the run) becomes ``stochastic_anneal`` (steps)."""
  from ternjax import QuantConfig

  quant = dict(quant)
  if "stochastic_anneal_fraction" in quant:
    quant["stochastic_anneal"] = round(quant.pop("stochastic_anneal_fraction") * steps)
  if "admm_rho_end" in quant:
    end, default = quant.pop("admm_rho_end"), QuantConfig(weights="admm")
    rho, every = (quant.get(k, getattr(default, k)) for k in ("admm_rho", "admm_every"))
    quant["admm_growth"] = max((end / rho) ** (min(every, steps) / max(steps, 1)), 1.0)
  return quant


def run(spec: dict) -> dict:
  """Trains (or resumes) one run; returns and writes its ``result.json``."""
  import ternjax as tj
  from ternjax import data as tjdata
  from ternjax import export as tjexport
  from ternjax.train import train_and_evaluate

  task = TASKS[spec["task"]]
  workdir = Path(spec["workdir"])
  data = tjdata.load(task.dataset, data_dir=spec.get("data_dir"))
  if spec.get("limit"):
    data = data.subset(spec["limit"])
  subsets = None
  if spec.get("validation"):
    data = _validation_split(data)
  elif task.dataset == "cifar10":
    script, _ = recipe(spec["task"])
    n = len(data.y_test)
    subsets = {"exact": list(range(min(script.EXACT_TEST_RECORDS, n)))}
  config = train_config(spec)
  steps = config.epochs * (len(data.y_train) // config.batch_size)
  quant = tj.QuantConfig(weights=spec["method"], **resolve_quant(spec.get("quant", {}), steps))
  model = build_model(spec["task"], quant, spec["seed"])
  meta = {"task": spec["task"], "model": task.model, "weights": spec["method"],
          "quant": spec.get("quant", {}), "limit": spec.get("limit"),
          "validation": bool(spec.get("validation"))}
  overwrite = bool(spec.get("overwrite"))
  summary = train_and_evaluate(config, model, data, workdir, resume=not overwrite,
                               overwrite=overwrite, meta=meta, test_subsets=subsets)
  table = tj.summary(model)
  size = {"packed_bytes": table.packed_bytes, "float32_bytes": table.float_bytes}
  if not spec.get("validation"):
    model.eval()
    path = tjexport.export(model, workdir / "export", model_name=task.model,
                           input_shape=data.x_test.shape[1:], classes=data.num_classes,
                           accuracy=summary["test_accuracy"], extra=meta, overwrite=True,
                           onnx=False)
    report = tjexport.size_report(path)
    size.update(export_disk_bytes=report["disk_bytes"], export_array_bytes=report["array_bytes"],
                bits_with_scales=report["bits_with_scales"])
  result = {**spec, **summary, **size, "train": dataclasses.asdict(config),
            "quant_config": dataclasses.asdict(quant), "spec": spec}
  (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
  return result


def finished(spec: dict) -> dict | None:
  """The ``result.json`` of a run that already ended with exactly ``spec`` (None with
  ``overwrite``, or when there is none, it cannot be read or it was for other settings: the
  run is then started again, resuming its checkpoints)."""
  path = Path(spec["workdir"]) / "result.json"
  if spec.get("overwrite") or not path.exists():
    return None
  try:
    result = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  return result if isinstance(result, dict) and result.get("spec") == spec else None


def launch(spec: dict, log: Path) -> subprocess.Popen:
  """Starts ``run(spec)`` in a new process (GPU memory allocated on demand, so that several
  share a GPU; one persistent compilation cache next to the run directories)."""
  (Path(spec["workdir"]) / "result.json").unlink(missing_ok=True)
  cache = Path(spec["workdir"]).parent / "jax-cache"
  env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_COMPILATION_CACHE_DIR": str(cache),
         **os.environ, "PYTHONUNBUFFERED": "1"}
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, __file__, json.dumps(spec)], stdout=f,
                            stderr=subprocess.STDOUT, env=env)


def run_all(specs, parallel: int, time_limit: float | None = None, on_done=None):
  """Runs ``specs`` (an iterable, consumed as places free up) as ``parallel`` concurrent
  processes; calls ``on_done(spec, result or None, why, log_tail)`` as each ends (``why``:
  why there is no result, else None); a run already :func:`finished` is only read. Past
  ``time_limit`` seconds the running ones are killed and no new one starts (their
  checkpoints stay: the same command resumes them)."""
  start, running, pending = time.monotonic(), [], iter(specs)
  expired = lambda: time_limit is not None and time.monotonic() - start > time_limit
  # SIGTERM (e.g. from `timeout`) ends this process through the finally below, which kills
  # the runs: none outlives the command.
  previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  try:
    while True:
      while len(running) < parallel and not expired():
        spec = next(pending, None)
        if spec is None:
          break
        if (result := finished(spec)) is not None:
          if on_done:
            on_done(spec, result, None, "")
          continue
        log = Path(spec["workdir"]).parent / "logs" / (Path(spec["workdir"]).name + ".log")
        running.append((spec, log, launch(spec, log)))
      if not running:
        return
      time.sleep(0.2)
      for item in list(running):
        spec, log, proc = item
        if proc.poll() is None and not expired():
          continue
        killed = proc.poll() is None
        if killed:
          proc.kill()
          proc.wait()
        running.remove(item)
        path = Path(spec["workdir"]) / "result.json"
        result = json.loads(path.read_text()) if proc.returncode == 0 and path.exists() else None
        why = None if result else ("killed at the time limit" if killed
                                   else f"failed (exit {proc.returncode}, log {log})")
        if on_done:
          on_done(spec, result, why, log.read_text(errors="replace")[-2000:])
  finally:
    for _, _, proc in running:
      proc.kill()
      proc.wait()
    signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
  run(json.loads(sys.argv[1]))
