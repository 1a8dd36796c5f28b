"""Data parallelism with JAX's own runtime: the process group, the device mesh, process-0 output.

One process per machine (or per GPU) runs the same program. :func:`setup` joins the processes
with ``jax.distributed.initialize`` and returns a 1-D :class:`~jax.sharding.Mesh` whose
``data`` axis spans the chosen devices of every process. :mod:`ternjax.train` shards each batch
along that axis and replicates parameters and optimizer state (Flax's GSPMD pattern); under
``jit`` XLA inserts the all-reduces: gradients, BatchNorm statistics of the global batch, metrics.

Failures stay bounded in time: a process that cannot reach the coordinator stops after
``--init-timeout`` seconds; a collective that fails because a peer died ends the run with one
line (:func:`stop_on_failure`); a peer that stops sending heartbeats for ``--heartbeat-timeout``
seconds makes JAX end the others (JAX prints that itself, with its C++ log after a clear first
line: it exposes no hook for the message).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from ternjax import cli

DATA = "data"  # the mesh axis the batch is sharded along


class DistributedError(ValueError):
  """Flags that cannot work, or a process group that cannot form (one line for the user)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """``--devices`` and the multi-process flags (``jax.distributed.initialize``'s arguments)."""
  g = parser.add_argument_group("devices and processes")
  g.add_argument("--devices", type=cli.positive_int,
                 help="devices to train on, over all processes (default: all; the batch "
                      "size is global and must be a multiple)")
  g.add_argument("--coordinator", metavar="HOST:PORT",
                 help="process 0's address; start one process per machine (or per GPU) with "
                      "the same --coordinator and --num-processes and --process-id 0..N-1")
  g.add_argument("--num-processes", type=cli.positive_int)
  g.add_argument("--process-id", type=cli.non_negative_int)
  g.add_argument("--local-device-ids", metavar="I,J",
                 help="the GPUs of this machine that this process uses (default: all; e.g. one "
                      "process per GPU: --local-device-ids 0, 1, ...)")
  g.add_argument("--cluster", action="store_true",
                 help="take what is not given from the cluster launcher's environment "
                      "(SLURM, Open MPI, mpi4py, Kubernetes: JAX's auto-detection)")
  g.add_argument("--init-timeout", type=cli.positive_int, default=300,
                 help="seconds to wait for every process to join (default 300)")
  g.add_argument("--heartbeat-timeout", type=cli.positive_int, default=100,
                 help="seconds without a heartbeat after which a process counts as dead and "
                      "the others stop (default 100)")


def check_arguments(args: argparse.Namespace) -> None:
  """Raises :class:`DistributedError` for flags that cannot work together; touches no device."""
  given = [args.coordinator, args.num_processes, args.process_id]
  if not args.cluster and any(v is not None for v in given) and None in given:
    raise DistributedError("--coordinator, --num-processes and --process-id go together (or "
                           "add --cluster to read the missing ones from the cluster launcher)")
  if args.coordinator is not None:
    _host_port(args.coordinator)
  if args.local_device_ids is not None:
    _ids(args.local_device_ids)
    if not (args.cluster or args.coordinator):
      raise DistributedError("--local-device-ids goes with --coordinator (or --cluster)")
  if None not in (args.process_id, args.num_processes) and args.process_id >= args.num_processes:
    raise DistributedError(f"--process-id must be in [0, {args.num_processes}), got "
                           f"{args.process_id}")


def setup(args: argparse.Namespace) -> Mesh:
  """Joins the process group when asked (call before anything touches a device); the mesh.

  Raises :class:`DistributedError` for flags that cannot work and when the coordinator
  cannot be reached in ``--init-timeout`` seconds.
  """
  check_arguments(args)
  if args.cluster or args.coordinator is not None:
    # CPU processes exchange collectives over TCP with gloo (on GPU, NCCL is used).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not args.cluster and args.process_id != 0:
      _wait_for(args.coordinator, args.init_timeout)
    # A loopback coordinator listens on loopback only (JAX's default: every interface).
    host = args.coordinator and _host_port(args.coordinator)[0]
    local = host in ("localhost", "127.0.0.1", "::1")
    ids = args.local_device_ids and _ids(args.local_device_ids)
    try:
      jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                 local_device_ids=ids,
                                 initialization_timeout=args.init_timeout,
                                 heartbeat_timeout_seconds=args.heartbeat_timeout,
                                 coordinator_bind_address=args.coordinator if local else None)
    except (ValueError, RuntimeError) as err:  # --cluster without a launcher, a busy port...
      raise DistributedError(f"jax.distributed.initialize: {str(err).strip()[:300]}") from None
  return make_mesh(args.devices)


def make_mesh(devices: int | None = None) -> Mesh:
  """A 1-D ``data`` mesh over ``devices`` devices (default all): the first
  ``devices / process_count`` devices of every process."""
  total, processes = jax.device_count(), jax.process_count()
  n = devices or total
  if n > total or n % processes:
    raise DistributedError(f"--devices {n}: this run has {total} device(s) in {processes} "
                     "process(es), and each process must hold the same number")
  by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(processes)]
  chosen = [d for local in by_process for d in local[:n // processes]]
  return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,), devices=chosen)


def sharding(mesh: Mesh | None, *spec) -> NamedSharding | None:
  """``NamedSharding(mesh, P(*spec))``: ``sharding(mesh)`` replicates, ``sharding(mesh, DATA)``
  splits the leading axis over the devices; ``None`` (the default device) without a mesh."""
  return None if mesh is None else NamedSharding(mesh, P(*spec))


def put(tree, sharding: NamedSharding | None):
  """``jax.device_put`` of a pytree, PRNG keys too (as their raw data: a multi-process
  ``device_put`` takes no key arrays)."""
  def put_leaf(x):
    if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.device_put(x, sharding)
    data = jax.device_put(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.tree.map(put_leaf, tree)


def is_main() -> bool:
  """Whether this is process 0, the one that logs and writes files."""
  return jax.process_index() == 0


def log(message: str) -> None:
  """Prints on process 0 only (through tqdm, so that a progress bar stays intact)."""
  if is_main():
    tqdm.write(message)


def barrier(name: str) -> None:
  """Waits until every process gets here (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_only(context, otherwise=None):
  """Enters ``context`` on process 0 only (the others get ``otherwise``). If entering raises
  there, every process raises (the others a :class:`DistributedError` pointing to process 0's
  message), so that none waits for the rest."""
  with contextlib.ExitStack() as stack:
    error, value = None, otherwise
    if is_main():
      try:
        value = stack.enter_context(context)
      except Exception as err:  # noqa: BLE001 (re-raised below, on every process)
        error = err
    if jax.process_count() > 1:
      failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
      if failed and error is None:
        raise DistributedError("process 0 stopped before training: see its message")
    if error is not None:
      raise error
    yield value


@contextlib.contextmanager
def stop_on_failure():
  """With several processes, a failed collective (a peer died) ends this one: one line on
  stderr, exit status 1. ``os._exit`` skips JAX's shutdown barrier, which would wait for the
  dead peer and then abort with a C++ stack trace."""
  try:
    yield
  except (jax.errors.JaxRuntimeError, ValueError) as err:
    if jax.process_count() == 1 or not _is_runtime_failure(err):
      raise
    first = str(err).strip().splitlines()[0][:300]
    sys.stdout.flush()
    print(f"error: process {jax.process_index()} of {jax.process_count()} lost the others "
          f"({first}); the last finished checkpoint is intact: start all processes again with "
          "--resume", file=sys.stderr, flush=True)
    os._exit(1)


def _is_runtime_failure(err: Exception) -> bool:
  # XLA reports a failed collective as a status string ("UNKNOWN: Gloo all-reduce failed ...");
  # on some paths it arrives as a ValueError.
  return isinstance(err, jax.errors.JaxRuntimeError) or str(err).startswith(
      ("UNKNOWN:", "INTERNAL:", "UNAVAILABLE:", "DEADLINE_EXCEEDED:", "ABORTED:"))


def _host_port(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f"--coordinator must be HOST:PORT, got {address!r}")
  return host.strip("[]"), int(port)


def _ids(text: str) -> list[int]:
  ids = text.split(",")
  if not all(i.strip().isdigit() for i in ids):
    raise DistributedError(f"--local-device-ids must be device numbers like 0,1, got {text!r}")
  return [int(i) for i in ids]


def _wait_for(address: str, timeout: float) -> None:
  """Waits until the coordinator accepts connections (JAX itself aborts with a stack trace)."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection(_host_port(address), timeout=1).close()
      return
    except OSError as err:
      if time.monotonic() > deadline:
        raise DistributedError(f"cannot reach the coordinator {address} in {timeout} s "
                               f"({err.strerror or err}): is process 0 running there?") from None
      time.sleep(0.2)
