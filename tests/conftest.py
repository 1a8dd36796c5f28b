"""Test-session settings shared by every test file."""

import jax

# Float references compare against exact integer kernels: on GPUs the default float32 matmul
# precision is TF32, which is not exact on small integers, so tests use full float32.
jax.config.update("jax_default_matmul_precision", "float32")
