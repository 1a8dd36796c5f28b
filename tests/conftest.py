"""Test-session settings shared by every test file, and the ``needs`` marker for data.

``@pytest.mark.needs("fashion_mnist")`` (any ``ternjax.data`` dataset, or ``"tfds"`` for
tensorflow-datasets) skips a test whose data the repository does not ship, with one line saying
how to provide it; with ``TERNJAX_REQUIRE_DATA=1`` (set by ``.ci/run``) it fails instead.
Tests marked ``full_test_set`` (whole test sets that take minutes on a CPU) are skipped unless
``--full-test-sets`` is given.
"""

import importlib.util
import os
from pathlib import Path

# xdist workers share one GPU: each would otherwise preallocate most of its memory.
if os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import pytest

from ternjax import data

REQUIRE_DATA = "TERNJAX_REQUIRE_DATA"

# Float references compare against exact integer kernels: on GPUs the default float32 matmul
# precision is TF32, which is not exact on small integers, so tests use full float32.
jax.config.update("jax_default_matmul_precision", "float32")


def missing(name: str) -> str | None:
  """Why ``name`` (a dataset or ``"tfds"``) is not available here, or None when it is."""
  if name == "tfds":
    if importlib.util.find_spec("tensorflow_datasets") is None:
      return "tensorflow-datasets is not installed: pip install -e '.[tfds]'"
    return None
  if data.find(name) is None:
    return f"{name} files not found: {data.where_to_put(name)}"
  return None


def _missing_for(item) -> str | None:
  """The first reason why a ``needs``-marked test cannot run here, or None."""
  return next((r for m in item.iter_markers("needs") for r in map(missing, m.args) if r), None)


FULL_TEST_SETS = "--full-test-sets"


def pytest_addoption(parser):
  parser.addoption(FULL_TEST_SETS, action="store_true",
                   help="also run the tests marked full_test_set (minutes on a CPU)")


def pytest_collection_modifyitems(config, items):
  """Runs ``slow`` tests first (with ``-n``, they then overlap the rest), marks the tests
  whose data is missing as skipped, unless ``$TERNJAX_REQUIRE_DATA``, and the
  ``full_test_set`` ones, unless ``--full-test-sets``."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
  if not config.getoption(FULL_TEST_SETS):
    for item in items:
      if item.get_closest_marker("full_test_set"):
        item.add_marker(pytest.mark.skip(reason=f"a whole test set: run with {FULL_TEST_SETS}"))
  if not os.environ.get(REQUIRE_DATA):
    for item in items:
      if reason := _missing_for(item):
        item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item):
  """Under ``$TERNJAX_REQUIRE_DATA`` (else skipped above), fails before the test's fixtures."""
  if reason := _missing_for(item):
    pytest.fail(f"{reason} (${REQUIRE_DATA} is set: this test must run)", pytrace=False)


@pytest.fixture
def experiment():
  """``experiment(name)``: the script ``experiments/NAME.py`` loaded as a module."""
  def load(name):
    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  return load


@pytest.fixture
def refused(capsys):
  """``refused(main, argv)``: runs a CLI's ``main`` in-process, asserts exit status 2 and one
  line on stderr (no traceback), and returns that line."""
  def run(main, argv):
    with pytest.raises(SystemExit) as exit_:
      main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err
  return run


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
  """No data anywhere: no ``$TERNJAX_DATA``, an empty cache, no shipped copy (offline paths)."""
  monkeypatch.delenv(data.ENV_VAR, raising=False)
  monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
  monkeypatch.setattr(data, "SHIPPED_DIR", tmp_path / "shipped")


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for a module's runs and subprocesses (test speed), of every
  compilation, however short (eager operations too: a subprocess compiles them again)."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("jax-cache"))
  old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cc.reset_cache()
  yield
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    del os.environ[name]
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  cc.reset_cache()
