"""ternjax: ternary neural networks ({-1, 0, +1} weights and activations) in JAX and Flax NNX.

Public names are imported on first use (PEP 562), so that ``ternjax.runtime_numpy`` runs an
export with NumPy alone, without importing JAX.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("convert", "data", "distributed", "export", "layers", "model_summary", "models",
               "ops", "packing", "predict", "quantizers", "report", "runtime_numpy", "tracing",
               "train", "zoo")
_NAMES = {
    "ternjax.convert": ("Rule", "ternarize"),
    "ternjax.layers": ("QuantConfig", "TernaryConv", "TernaryConvGeneral", "TernaryDotGeneral",
                       "TernaryLinear", "TernaryOperands"),
    "ternjax.ops": ("ternary_conv", "ternary_matmul"),
    "ternjax.model_summary": ("LayerSummary", "Summary", "summary"),
    "ternjax.packing": ("Bitplanes", "pack_bitplanes", "pack_codes", "unpack_bitplanes",
                        "unpack_codes"),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}
__all__ = [*_SUBMODULES, *_MODULE_OF]


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"ternjax.{name}")
  if name in _MODULE_OF:
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
  raise AttributeError(f"module 'ternjax' has no attribute {name!r}")


def __dir__():
  return sorted(__all__ + ["__version__"])
