"""Test-session settings shared by every test file."""

import os

import jax
import pytest

# Float references compare against exact integer kernels: on GPUs the default float32 matmul
# precision is TF32, which is not exact on small integers, so tests use full float32.
jax.config.update("jax_default_matmul_precision", "float32")


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
