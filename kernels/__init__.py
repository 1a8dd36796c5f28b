"""GPU kernels for ternjax's dispatch (installed as ``ternjax.kernels``).

Registers with :func:`ternjax.ops.register`: ``'pallas'`` (Pallas, Triton lowering),
``'triton'`` (raw Triton through jax-triton) and ``'gpu'``, first in the GPU defaults, which
runs what was measured fastest for the shape on an H100 (:func:`fastest`;
experiments/results/bench_kernels.md). Off a GPU they raise ``NotImplementedError``, so the
dispatch falls through to ``'xla'``; importing this package needs neither a GPU nor jax-triton.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ternjax import ops
from ternjax.kernels.common import BlockSizes  # noqa: F401

try:
  from ternjax.kernels import ternary_matmul_pallas
except ImportError:  # a jax without Pallas' Triton backend
  ternary_matmul_pallas = None
try:
  from ternjax.kernels import ternary_matmul_triton
except ImportError:  # jax-triton / triton absent, or a CPU-only jax
  ternary_matmul_triton = None

# Measured on an H100 (bench_kernels.md), device µs:
#   1×4096×4096 and 128×784×256: XLA's fused popcount (2.2, 1.4) beats the kernels (3.3, 6.7),
#     whose split-K memset / reduction and launch cost more than the work;
#   16×4096×4096: Pallas popcount 9.5 (XLA popcount 14.3); 256×4096×4096: Pallas dot 36.5
#     (XLA unpack + int8 dot 48.1);
#   4096³: XLA unpack + cuBLAS int8 dot 94 beats the Pallas dot (314).
XLA_POPCOUNT_UP_TO = 2**26  # M·K·N
KERNELS_UP_TO_M = 512


def fastest(x, w, *, x_ternary=False, **kwargs):
  """The fastest measured implementation for the shape of ``x`` and ``w``."""
  m, k = x.shape
  n = w.pos.shape[1]
  if x_ternary and m * k * n <= XLA_POPCOUNT_UP_TO:
    return ops.xla_matmul(x, w, x_ternary=True, **kwargs)
  if m >= KERNELS_UP_TO_M or ternary_matmul_pallas is None:
    if jnp.issubdtype(x.dtype, jnp.integer):  # ternary codes are int8 codes too
      x = x.astype(jnp.int8)
      return ops.xla_matmul(x, w, **kwargs)
    return ops.xla_matmul(x, w, x_ternary=x_ternary, **kwargs)
  return ternary_matmul_pallas.ternary_matmul(x, w, x_ternary=x_ternary, **kwargs)


def _on_gpu(name: str, fn):
  def call(x, w, **kwargs):
    if jax.default_backend() != "gpu":
      raise NotImplementedError(f"{name} kernels need a GPU (default backend: "
                                f"{jax.default_backend()})")
    return fn(x, w, **kwargs)
  return call


for _name, _module in (("triton", ternary_matmul_triton), ("pallas", ternary_matmul_pallas)):
  if _module is not None:
    ops.register(_name, _on_gpu(_name, _module.ternary_matmul), backends=("gpu",))
ops.register("gpu", _on_gpu("gpu", fastest), backends=("gpu",))
