"""Data parallel training: 4 devices and 2 processes give one device's losses; failures end in
one line; a run killed with several processes resumes with any number of them.

Processes talk over the loopback address only, and every wait is bounded.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "mnist.py"
_spec = importlib.util.spec_from_file_location("mnist_cli", SCRIPT)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

# One epoch is 20 steps of a BatchNorm MLP; stochastic weights also exercise the model's PRNG.
RUN = ["--limit", "1000", "--batch-size", "50", "--weights", "stochastic"]

FOUR_DEVICES = """
import dataclasses, json, re, sys
import jax, numpy as np
from flax import nnx
import ternjax as tj
from ternjax import data, distributed, train

assert jax.device_count() == 4
small = data.load("mnist").subset(1000)
config = train.TrainConfig(epochs=1, batch_size=48, optimizer="sgd", lr=0.05, nesterov=True,
                           shift=2, flip=True)
mlp = lambda: tj.models.mlp(tj.QuantConfig(weights="twn"), rngs=nnx.Rngs(default=0, quant=1))
mesh = distributed.make_mesh(4)

def twenty_steps(mesh):  # epoch 1 of the loop by hand: per-step losses, parameters, HLO
  model = mlp()
  optimizer = nnx.Optimizer(model, train.make_optimizer(config, 20, model)[0], wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  replicated, rows = distributed.sharding(mesh), distributed.sharding(mesh, None, "data")
  batches = np.random.default_rng([0, 1]).permutation(1000)[:960].reshape(20, 48)
  args = (*distributed.put((state, small.x_train, small.y_train), replicated),
          jax.device_put(batches.astype(np.int32), rows),
          distributed.put(jax.random.key(0), replicated))
  compiled = train.make_train_chunk(graphdef, config, mesh).lower(*args).compile()
  state, (losses, _) = compiled(*args)
  params = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
  return np.asarray(losses), jax.tree.leaves(params), compiled.as_text()

(one, params, plain), (four, _, hlo) = twenty_steps(None), twenty_steps(mesh)
np.testing.assert_allclose(four, one, rtol=1e-5)
assert "all-reduce" in hlo and "f32[12,784]" in hlo and "f32[48,784]" not in hlo, "not sharded"
# On one device the data-parallel step compiles to the plain one but for sharding annotations.
cut = lambda line: re.split(r", (sharding|frontend_attributes|metadata)=", line)[0]
ops = lambda hlo: sorted(re.sub(r"%[\\w.-]+", "", cut(l))
                         for l in hlo.splitlines()[1:] if " = " in l)
assert ops(twenty_steps(distributed.make_mesh(1))[2]) == ops(plain), "the mesh path differs"

model = mlp()
summary = train.train_and_evaluate(config, model, small, f"{sys.argv[1]}/four", mesh=mesh)
loss = json.loads(open(f"{sys.argv[1]}/four/metrics.jsonl").readline())["train_loss"]
np.testing.assert_allclose(loss, one.mean(), rtol=1e-5)
assert summary["devices"] == 4
for a, b in zip(params, jax.tree.leaves(nnx.state(model, nnx.Param))):
  assert b.sharding.device_set == {jax.devices()[0]}  # back on one device
  np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
try:
  train.train_and_evaluate(dataclasses.replace(config, batch_size=50), mlp(), small,
                           f"{sys.argv[1]}/odd", mesh=mesh)
  raise AssertionError("a batch of 50 on 4 devices was accepted")
except ValueError as err:
  assert "not a multiple of the 4 devices" in str(err)
print("ok")
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(cache: Path) -> dict:
  """The subprocesses' environment: on CPU (also on a GPU machine: these test CPU devices and
  gloo), with a compilation cache shared by a test's runs (every compilation, however short)."""
  return {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}


def _metrics(run: Path) -> list[dict]:
  return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_four_devices_match_one(tmp_path):
  """XLA's host-device flag must be set before JAX starts: a subprocess."""
  env = {**_env(tmp_path / "cache"), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0 and proc.stdout.endswith("ok\n"), proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_and_a_killed_run_resumes(tmp_path):
  """Two processes train epochs 1-2 of 4; process 1 is killed; process 0 stops at once with one
  line; the run resumes with ONE process and follows the one-process run."""
  env = _env(tmp_path / "cache")
  reference = subprocess.run([sys.executable, str(SCRIPT), *RUN, "--epochs", "4",
                              "--out", str(tmp_path / "ref")], env=env, capture_output=True,
                             text=True, timeout=600, check=False)
  assert reference.returncode == 0, reference.stderr[-2000:]

  run, port = tmp_path / "run", _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(SCRIPT), *RUN, "--epochs", "4", "--out", str(run),
       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
       "--init-timeout", "120", "--heartbeat-timeout", "30"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  try:
    for line in procs[0].stdout:
      if line.startswith("epoch   2/4"):
        procs[1].send_signal(signal.SIGKILL)
        break
    t0 = time.monotonic()
    code = procs[0].wait(timeout=60)
    stopped = time.monotonic() - t0
  finally:
    for p in procs:
      p.kill()
  out, err = procs[0].communicate()
  assert code == 1, err[-3000:]
  assert stopped < 25, f"took {stopped:.0f} s (the heartbeat timeout is 30 s)"
  assert err.strip().count("\n") == 0 and err.startswith("error: process 0 of 2 stopped: ")
  assert "--resume" in err and "Traceback" not in out + err
  assert "epoch" not in procs[1].communicate()[0]  # logs come from process 0 only
  assert _metrics(run)[0]["epoch"] == 1

  resumed = subprocess.run([sys.executable, str(SCRIPT), *RUN, "--epochs", "4", "--out",
                            str(run), "--resume"], env=env, capture_output=True, text=True,
                           timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stdout
  one, ref = _metrics(run), _metrics(tmp_path / "ref")
  assert [m["epoch"] for m in one] == [1, 2, 3, 4]
  summary = json.loads((run / "summary.json").read_text())
  assert summary["processes"] == 1
  cut = summary["resumed_from_epoch"]  # epochs 1..cut ran on two processes (20 steps each)
  assert cut >= 1
  loss = lambda runs, key: np.array([m[key] for m in runs])
  np.testing.assert_allclose(loss(one, "train_loss")[:cut], loss(ref, "train_loss")[:cut],
                             rtol=1e-5)
  # Later epochs drift apart a little: ternary codes flip where weights sit at rounding distance
  # from a threshold. Test losses also move with the biases before BatchNorm, whose gradient is
  # rounding noise that Adam scales up to full steps (they shift the running means).
  np.testing.assert_allclose(loss(one, "train_loss"), loss(ref, "train_loss"), rtol=1e-2)
  np.testing.assert_allclose(loss(one, "test_loss"), loss(ref, "test_loss"), rtol=1e-2)


def test_unreachable_coordinator_stops_with_one_line(tmp_path):
  port = _free_port()  # nothing listens there
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, str(SCRIPT), *RUN, "--out", str(tmp_path / "run"),
                         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                         "--process-id", "1", "--init-timeout", "2"],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
  assert f"cannot reach the coordinator 127.0.0.1:{port} in 2 s" in proc.stderr
  assert time.monotonic() - t0 < 60 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, words", [
    (["--devices", "0"], "--devices: must be an integer of at least 1"),
    (["--devices", "4096"], "--devices 4096: this run has"),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "127.0.0.1:1234"], "go together"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in [0, 2)"),
    (["--init-timeout", "0"], "--init-timeout: must be an integer of at least 1"),
    (["--local-device-ids", "0"], "goes with --coordinator"),
    (["--cluster", "--local-device-ids", "a"], "device numbers"),
])
def test_bad_distributed_arguments_one_line(argv, words, refused, tmp_path):
  err = refused(cli.main, argv + ["--out", str(tmp_path / "run")])
  assert words in err, err
  assert not (tmp_path / "run").exists()
