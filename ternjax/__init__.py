"""ternjax: ternary neural networks ({-1, 0, +1} weights and activations) in JAX and Flax NNX."""

from ternjax import ops, packing, quantizers
from ternjax import models
from ternjax.layers import (QuantConfig, Summary, TernaryConv, TernaryConvGeneral,
                            TernaryDotGeneral, TernaryLinear, TernaryOperands, summary)
from ternjax.ops import ternary_conv, ternary_matmul
from ternjax.packing import (Bitplanes, pack_bitplanes, pack_codes, unpack_bitplanes,
                             unpack_codes)

__version__ = "0.1.0"
