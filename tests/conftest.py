"""Test-session settings shared by every test file, and the ``needs`` marker for data.

``@pytest.mark.needs("fashion_mnist")`` (any ``ternjax.data`` dataset, or ``"tfds"`` for
tensorflow-datasets) skips a test whose data the repository does not ship, with one line saying
how to provide it; with ``TERNJAX_REQUIRE_DATA=1`` (set by ``.ci/run``) it fails instead.
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


def pytest_collection_modifyitems(items):
  """Runs ``slow`` tests first (with ``-n``, they then overlap the rest), and marks the tests
  whose data is missing as skipped, unless ``$TERNJAX_REQUIRE_DATA``."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
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
  """A persistent compilation cache for a module's runs and subprocesses (test speed)."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("jax-cache"))
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", path)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  cc.reset_cache()
  yield
  del os.environ["JAX_COMPILATION_CACHE_DIR"]
  jax.config.update("jax_compilation_cache_dir", old)
  cc.reset_cache()
