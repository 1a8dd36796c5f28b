"""The command lines' one argument-validation and error path (shared by every script).

A training script builds a :class:`Parser`, adds its own arguments and the shared ones
(:func:`add_run_arguments`: validated as they are parsed), calls :func:`preflight` on the
parsed arguments before it reads data or writes a file, and runs its body in
``with errors():``, so that the project's known errors (bad data, export, checkpoint or
settings) end the command with one line on stderr and exit status 2, never a traceback::

  parser = cli.Parser(description="...")
  cli.add_run_arguments(parser)
  args = cli.preflight(parser, parser.parse_args(argv))
  with cli.errors():
    ...
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import sys
from pathlib import Path

from ternjax import data

# The errors whose message says what to do, by module. Looked up in sys.modules: a module that
# is not imported raised none (and the NumPy runtime must run without importing JAX).
KNOWN_ERRORS = (("ternjax.data", "DataError"), ("ternjax.runtime_numpy", "ExportError"),
                ("ternjax.train", "TrainError"), ("ternjax.distributed", "DistributedError"))


class Parser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose errors are one line (no usage block), exit status 2."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message}\n")


def integer(low: int):
  """An argparse type: an integer of at least ``low``."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = low - 1
    if value < low:
      raise argparse.ArgumentTypeError(f"must be an integer of at least {low}, got {text!r}")
    return value
  return parse


positive_int, non_negative_int = integer(1), integer(0)


def positive_float(text: str) -> float:
  """An argparse type: a finite number above 0 (refuses ``inf`` and ``nan``)."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text!r}")
  return value


def existing_dir(text: str) -> Path:
  """An argparse type: a directory that exists (a typo is refused, not silently replaced)."""
  path = Path(text).expanduser()
  if not path.is_dir():
    raise argparse.ArgumentTypeError(f"{text}: no such directory")
  return path


def add_run_arguments(p: argparse.ArgumentParser, *, export: bool = True) -> None:
  """The arguments every training script shares: run length, data, run directory and (if
  ``export``) the export."""
  p.add_argument("--epochs", type=positive_int)
  p.add_argument("--batch-size", type=positive_int)
  p.add_argument("--lr", type=positive_float, help="peak learning rate")
  p.add_argument("--scale-lr", type=positive_float,
                 help="learning-rate multiplier of learned quantizer scales (TTQ's α)")
  p.add_argument("--seed", type=non_negative_int, default=0)
  p.add_argument("--source", choices=data.SOURCES, default="files",
                 help="standard files (verified, downloaded if missing) or TFDS")
  p.add_argument("--data-dir", type=existing_dir,
                 help=f"data root, must exist (else ${data.ENV_VAR}, else ~/.cache/ternjax)")
  p.add_argument("--limit", type=positive_int, help="use only the first N train and test examples")
  p.add_argument("--out", help="run directory")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in --out from its latest checkpoint (verified)")
  p.add_argument("--resume-from", type=positive_int, metavar="EPOCH",
                 help="continue from this epoch's checkpoint (later ones are moved aside)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the run in --out (kept aside until the new one's first epoch "
                 "is saved)")
  if export:
    p.add_argument("--export", metavar="DIR",
                   help="after training, write an inference export to DIR (ternjax.export; "
                   "an existing DIR is refused before training unless --overwrite)")


def _unusable(path: Path) -> str | None:
  """Why a directory cannot be made at ``path`` (None if it can): a file on the way."""
  if path.exists() and not path.is_dir():
    return "is a file, not a directory"
  parent = next((p for p in path.absolute().parents if p.exists()), None)
  if parent is not None and not parent.is_dir():
    return f"cannot be created: {parent} is a file"
  return None


def preflight(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
  """Checks the shared run arguments together, before any data is read or file written."""
  if args.resume_from is not None:
    args.resume = True
  if args.resume and args.overwrite:
    parser.error("--resume and --overwrite exclude each other")
  export = getattr(args, "export", None)
  for flag, path in (("--out", args.out), ("--export", export)):
    if path is not None and (why := _unusable(Path(path))):
      parser.error(f"{flag} {path} {why}")
  if export is not None:
    export = Path(args.export).absolute()
    if args.out is not None and export == Path(args.out).absolute():
      parser.error("--export and --out must be different directories")
    if export.exists() and not args.overwrite:
      parser.error(f"--export {args.export} exists: pass --overwrite to replace it, or another "
                   "--export (checked before training)")
  return args


def command_line() -> str:
  """This process's command line as a shell command (recorded in exports: how it was made)."""
  return shlex.join([Path(sys.executable).name, *sys.argv])


def export_trained(args: argparse.Namespace, model, data, result: dict, meta: dict,
                   classes) -> Path:
  """Writes ``--export`` after training: the test accuracy, dataset, run settings and this
  command line go into the export's metadata (``extra``); returns its path. Without jax2onnx
  installed (a GPU image, for example), the export has no ``model.onnx`` (said so)."""
  import importlib.util

  from ternjax import export as tjexport
  onnx = importlib.util.find_spec("jax2onnx") is not None
  if not onnx:
    print("note: jax2onnx is not installed: the export has no model.onnx (JAX runtime only)",
          flush=True)
  path = tjexport.export(model, args.export, model_name=meta["model"],
                         input_shape=data.x_test.shape[1:], classes=list(classes),
                         accuracy=result["test_accuracy"], overwrite=args.overwrite,
                         extra={"dataset": data.name, **meta, "command": command_line(),
                                "summary": result}, onnx=onnx)
  print(f"export: {path} ({tjexport.size_report(path)['disk_bytes']:,} bytes on disk)",
        flush=True)
  return path


@contextlib.contextmanager
def errors(parser: argparse.ArgumentParser | None = None):
  """Turns the project's known errors in the body into one line on stderr and exit status 2
  (``parser`` names the command; by default the script's name, as argparse does)."""
  try:
    yield
  except Exception as err:
    known = tuple(getattr(sys.modules[m], name) for m, name in KNOWN_ERRORS if m in sys.modules)
    if not isinstance(err, known):
      raise
    (parser or Parser()).error((str(err).strip().splitlines() or [type(err).__name__])[0])
