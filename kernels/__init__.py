"""GPU kernels for ternjax's dispatch (installed as ``ternjax.kernels``).

Registers ``'pallas'`` (Pallas, Triton lowering) and ``'triton'`` (raw Triton through
jax-triton) as implementations that run on GPUs, and the ``'gpu'`` policy, first in the GPU
defaults, which picks what was measured fastest for the shape (:class:`GpuTuning`) and runs
convolutions of float activations and int8 codes directly (``ops.conv.direct_conv``). Off a GPU
they raise ``NotImplementedError``, so the dispatch falls through to ``'xla'``; importing this
package needs neither a GPU nor jax-triton. :mod:`ternjax.ops` imports it the first time it
looks up a name; it imports :mod:`ternjax.ops`, never the other way round at import time.
"""

from __future__ import annotations

from ternjax import ops
from ternjax.kernels.common import GPU_TUNING, BlockSizes, GpuTuning

try:
  from ternjax.kernels import ternary_matmul_pallas
except ImportError:  # a jax without Pallas' Triton backend
  ternary_matmul_pallas = None
try:
  from ternjax.kernels import ternary_matmul_triton
except ImportError:  # jax-triton / triton absent, or a CPU-only jax
  ternary_matmul_triton = None

BACKENDS = tuple(module.BACKEND for module in (ternary_matmul_pallas, ternary_matmul_triton)
                 if module is not None)
for _backend in BACKENDS:
  ops.register(_backend.name, _backend.matmul, platforms=("gpu",),
               interpret=_backend.interpret)
ops.register_policy("gpu", GPU_TUNING.choose, platforms=("gpu",), conv=ops.conv.direct_conv)

__all__ = ["BACKENDS", "GPU_TUNING", "BlockSizes", "GpuTuning", "ternary_matmul_pallas",
           "ternary_matmul_triton"]
