"""ternjax.cli: the shared argument types, pre-flight checks and one-line error path."""

import argparse
import importlib.util
from pathlib import Path

import pytest

from ternjax import cli, data, runtime_numpy, train

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _script(name):
  spec = importlib.util.spec_from_file_location(f"{name}_cli", EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _parser():
  p = cli.Parser(prog="tool")
  cli.add_run_arguments(p)
  return p


@pytest.mark.parametrize("kind, text, ok", [
    (cli.positive_int, "3", 3), (cli.positive_int, "0", None), (cli.positive_int, "1.5", None),
    (cli.non_negative_int, "0", 0), (cli.non_negative_int, "-1", None),
    (cli.positive_float, "1e-3", 1e-3), (cli.positive_float, "0", None),
    (cli.positive_float, "inf", None), (cli.positive_float, "-inf", None),
    (cli.positive_float, "nan", None), (cli.positive_float, "x", None),
])
def test_types(kind, text, ok):
  if ok is None:
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
      kind(text)
  else:
    assert kind(text) == ok


def test_existing_dir(tmp_path):
  assert cli.existing_dir(str(tmp_path)) == tmp_path
  (tmp_path / "f").write_text("")
  for bad in (tmp_path / "missing", tmp_path / "f"):
    with pytest.raises(argparse.ArgumentTypeError, match="no such directory"):
      cli.existing_dir(str(bad))


def test_preflight_resume_from_implies_resume(tmp_path):
  p = _parser()
  args = cli.preflight(p, p.parse_args(["--out", str(tmp_path / "run"), "--resume-from", "2"]))
  assert args.resume and args.resume_from == 2


@pytest.mark.parametrize("error", [data.DataError("no data\nmore"), runtime_numpy.ExportError(
    "bad export"), train.TrainError("bad run")])
def test_known_errors_one_line_exit_2(error, capsys):
  with pytest.raises(SystemExit) as exit_, cli.errors(_parser()):
    raise error
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err == f"tool: error: {str(error).splitlines()[0]}\n"


def test_other_errors_are_not_hidden():
  """A bug is a traceback, not a one-line refusal."""
  with pytest.raises(KeyError), cli.errors(_parser()):
    raise KeyError("a bug")


@pytest.mark.parametrize("script", ["mnist", "cifar10"])
@pytest.mark.parametrize("argv, words", [
    (["--lr", "inf"], "argument --lr: must be a finite positive number, got 'inf'"),
    (["--data-dir", "/a/typo"], "argument --data-dir: /a/typo: no such directory"),
    (["--out", "{tmp}/file"], "is a file, not a directory"),
    (["--resume-from", "0"], "argument --resume-from: must be an integer of at least 1"),
    (["--resume", "--overwrite"], "exclude each other"),
])
def test_every_training_script_on_the_shared_path(script, argv, words, tmp_path, refused):
  """The same flags get the same one-line refusal in each script, before anything is written
  (a wrong --data-dir is refused although $TERNJAX_DATA, set for the tests, holds the data)."""
  (tmp_path / "file").write_text("mine")
  argv = [a.format(tmp=tmp_path) for a in argv]
  err = refused(_script(script).main,
                argv + ["--out", str(tmp_path / "run")] * ("--out" not in argv))
  assert words in err, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
