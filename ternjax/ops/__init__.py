"""Ternary matmul and convolution behind one dispatch point.

``ternary_matmul(x, w)`` contracts activations ``x`` of shape ``(M, K)`` with ternary weights
``w`` packed as :class:`~ternjax.packing.Bitplanes` along ``K``; ``ternary_conv`` does the same
for NHWC convolutions. Where things live:

==============  ===================================================================
``api``         the entry points (operands checked once) and the ``'xla'`` implementation
``base``        the implementation and policy tables, ``register``, the epilogue
``xla``         the XLA reference and the exact building blocks of every XLA form
``cpu``         the CPU formulations and their tuning table (:class:`CpuTuning`)
``conv``        patches + matmul, direct CPU convolutions, ``kernel_to_matrix``
``arg_specs``   the shapes that tests and benchmarks share
==============  ===================================================================

The GPU kernels (``ternjax.kernels``: ``'pallas'``, ``'triton'`` and the ``'gpu'`` policy)
register themselves when first needed; ``'xla'`` is always present, runs everywhere and is the
reference.
"""

from ternjax.ops.api import ternary_conv, ternary_matmul, xla_matmul
from ternjax.ops.base import (
    DEFAULTS,
    ENV_VAR,
    IMPLEMENTATIONS,
    POLICIES,
    Implementation,
    Policy,
    candidates,
    check_operands,
    epilogue,
    implementations,
    register,
    register_policy,
)
from ternjax.ops.conv import conv_patches, kernel_to_matrix, xla_conv
from ternjax.ops.cpu import CPU_TUNING, CpuTuning
from ternjax.ops.xla import popcount_matmul

__all__ = [
    "CPU_TUNING", "DEFAULTS", "ENV_VAR", "IMPLEMENTATIONS", "POLICIES", "CpuTuning",
    "Implementation", "Policy", "candidates", "check_operands", "conv_patches", "epilogue",
    "implementations", "kernel_to_matrix", "popcount_matmul", "register", "register_policy",
    "ternary_conv", "ternary_matmul", "xla_conv", "xla_matmul",
]
