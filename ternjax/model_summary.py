"""``summary(model, x)`` (``ternjax.summary``): a per-layer table in the order the layers run,
with MACs (like Larq's).

One call ``model(x)`` is traced in eval mode (:mod:`ternjax.tracing`), every module hooked, so
rows come in call order with their output shapes. Multiply-accumulates (MACs) of ``nnx.Linear``
/ ``nnx.Conv`` layers (ternjax layers included) are ``outputs × kernel rows``; other modules'
MACs (attention's einsums, a model's own ``x @ w``) are read from the jaxpr's
``dot_general`` / ``conv_general_dilated`` equations, attributed to the innermost module that
runs them. A row is a ternary layer (its quantizer's parameters included), a module owning
parameters directly, or a module with MACs of its own. Without ``x`` nothing is traced: rows
come in attribute order, without shapes or MACs.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ternjax import packing, tracing


@dataclasses.dataclass(frozen=True)
class LayerSummary:
  name: str
  kind: str
  params: int
  bits_per_weight: int
  float_bytes: int
  packed_bytes: int
  sparsity: float | None
  scales: str
  output_shape: tuple | None = None   # of the first call (None: not traced or not called)
  macs: int | None = None             # multiply-accumulates of the traced call


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-layer table of a model: what :func:`summary` returns; ``str()`` renders it."""

  layers: tuple[LayerSummary, ...]

  @property
  def params(self) -> int:
    return sum(l.params for l in self.layers)

  @property
  def float_bytes(self) -> int:
    return sum(l.float_bytes for l in self.layers)

  @property
  def packed_bytes(self) -> int:
    return sum(l.packed_bytes for l in self.layers)

  @property
  def macs(self) -> int:
    return sum(l.macs or 0 for l in self.layers)

  @property
  def ternary_macs(self) -> int:
    """MACs of the layers with ternary weights."""
    return sum(l.macs or 0 for l in self.layers if l.bits_per_weight == 2)

  def __str__(self) -> str:
    head = ("layer", "type", "output", "params", "bits/w", "float32 B", "packed B", "MACs",
            "sparsity", "scales")
    shape = lambda s: "-" if s is None else str(tuple(s))
    rows = [head] + [
        (l.name, l.kind, shape(l.output_shape), f"{l.params:,}", str(l.bits_per_weight or "-"),
         f"{l.float_bytes:,}", f"{l.packed_bytes:,}", "-" if l.macs is None else f"{l.macs:,}",
         "-" if l.sparsity is None else f"{l.sparsity:.1%}", l.scales)
        for l in self.layers]
    ratio = self.float_bytes / max(self.packed_bytes, 1)
    traced = any(l.macs is not None for l in self.layers)
    macs = (f"{self.ternary_macs / max(self.macs, 1):.0%} ternary" if traced else "")
    rows.append(("total", "", "", f"{self.params:,}", "", f"{self.float_bytes:,}",
                 f"{self.packed_bytes:,}", f"{self.macs:,}" if traced else "-", macs,
                 f"{ratio:.1f}x smaller"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    left = (0, 1, 2, 9)
    fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    rule = "-" * len(fmt(rows[0]))
    return "\n".join([fmt(rows[0]), rule, *map(fmt, rows[1:-1]), rule, fmt(rows[-1])])


def _scale_text(values: dict[str, np.ndarray]) -> str:
  return " ".join(f"{k} {np.mean(v):.3g}" + (f"±{np.std(v):.2g}" if v.size > 1 else "")
                  for k, v in values.items())


def _ternary_stats(model: nnx.Module) -> dict[str, tuple[float, dict, bool]]:
  """Per ternary layer: the fraction of zero codes, its scales, whether both signs have one
  (computed in one jitted call: eager ops would compile one by one)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def stats(state):
    out = {}
    for path, m in nnx.iter_modules(nnx.merge(graphdef, state)):
      quant = tracing.ternary_quant(m)
      if quant is not None:
        t, sp, sn = quant.weight_codes(m.kernel[...])
        scales = {"α": sp} if sn is None else {"αp": sp, "αn": sn}
        if getattr(quant, "act_scale", None) is not None:
          scales["s_act"] = quant.act_scale[...]
        out[tracing.path_name(path)] = (jnp.mean(t == 0), scales)
    return out

  names = ("α", "αp", "αn", "s_act")  # jit returns dicts sorted by key
  return {k: (float(z), {n: np.asarray(sc[n]) for n in names if n in sc})
          for k, (z, sc) in stats(state).items()}


def _layer_summary(name: str, module: nnx.Module, params: list, stats) -> LayerSummary:
  count = sum(int(np.prod(v.shape)) for v in params)
  float_bytes = 4 * count
  kind = tracing.original_type(module).__name__
  if stats is None:
    return LayerSummary(name, kind, count, 32 if count else 0, float_bytes, float_bytes,
                        None, "")
  sparsity, scales = stats
  kernel = module.kernel
  # Base-3 codes as the export stores them (five trits a byte), float32 for the other params
  # (bias, learned scales) and for the per-channel scale that TWN / stochastic derive from
  # the kernel.
  n = kernel.shape[-1]
  derived = 0 if "αn" in scales else n
  packed = -(-kernel.size // packing.TRITS_PER_BYTE) + 4 * (count - kernel.size + derived)
  return LayerSummary(name, kind, count, 2, float_bytes, packed, sparsity, _scale_text(scales))


def _owners(model: nnx.Module) -> tuple[dict, dict]:
  """Row owner of each module path (a ternary layer owns its quantizer) and each row's params."""
  modules = {tracing.path_name(p): m for p, m in nnx.iter_modules(model)}
  owner = {path: path for path in modules}
  for path, m in modules.items():
    quant = tracing.ternary_quant(m)
    home = next((sub for sub, s in modules.items() if quant is not None and s is quant), None)
    for sub in modules:  # the quantizer and its own modules (weight and input quantizers)
      if home is not None and (sub == home or sub.startswith(home + "/")):
        owner[sub] = path
  params: dict[str, list] = {}
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    parts = tracing.path_name(p).split("/")
    home = next(h for h in ("/".join(parts[:k]) for k in range(len(parts) - 1, -1, -1))
                if h in modules)
    params.setdefault(owner[home], []).append(v)
  return owner, params


def _trace(model: nnx.Module, x) -> tuple[dict, dict]:
  """Per module path, in call order: the first call's output shape; and each path's MACs."""
  clone = tracing.hooked(model, lambda m: True)
  order: dict[str, tuple | None] = {}
  index: list[str] = []

  def hook(module, call, args, kwargs):
    path = getattr(module, tracing.PATH_ATTR)
    if path not in index:
      index.append(path)
    first = path not in order
    order.setdefault(path, None)  # rows in the order the calls start (a block before its layers)
    with jax.named_scope(f"ternjax_module{index.index(path)}"):
      out = call(*args, **kwargs)
    if first:
      order[path] = tuple(out.shape) if hasattr(out, "shape") else None
    return out

  spec = x if isinstance(x, jax.ShapeDtypeStruct) else (
      jax.ShapeDtypeStruct(tuple(x), jnp.float32) if isinstance(x, (tuple, list))
      else jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)))
  jaxpr, _ = tracing.trace(clone, spec, hook)
  macs: dict[str, int] = {}

  def visit(eqn, scope, times):
    found = re.findall(r"ternjax_module(\d+)", scope)
    n = tracing.contraction_macs(eqn)
    if found and n:
      path = index[int(found[-1])]
      macs[path] = macs.get(path, 0) + times * n
  tracing.walk(jaxpr.jaxpr, visit)
  return order, macs


def summary(model: nnx.Module, x=None) -> Summary:
  """Per-layer parameters, bits per weight, float vs packed bytes, MACs, sparsity and scales.

  Args:
    model: any NNX module.
    x: an example input (array, ``jax.ShapeDtypeStruct`` or shape tuple, batch included; one
      example gives MACs per example). With it, one eval-mode call is traced: rows come in call
      order with output shapes and MACs. Without it, rows come in attribute order.

  Packed bytes count ternary kernels as the export's base-3 codes (1.6 bits per weight) plus
  float32 scales and biases; float
  layers stay float32. Like Larq's model summary: ``print(summary(model, x))``.
  """
  owner, params = _owners(model)
  modules = {tracing.path_name(p): m for p, m in nnx.iter_modules(model)}
  order, macs = _trace(model, x) if x is not None else ({}, {})
  stats = _ternary_stats(model)
  row_macs: dict[str, int] = {}
  for path, n in macs.items():
    row = owner[path]
    if not isinstance(modules[row], (nnx.Linear, nnx.Conv)):  # those: counted from shapes
      row_macs[row] = row_macs.get(row, 0) + n
  called = [p for p in order if owner[p] == p]
  rows = []
  for path in called + [p for p in modules if p not in order and owner[p] == p]:
    module = modules[path]
    if not (params.get(path) or row_macs.get(path) or path in stats):
      continue
    shape = order.get(path)
    n = row_macs.get(path, 0)
    if isinstance(module, (nnx.Linear, nnx.Conv)) and shape is not None:
      kernel = module.kernel
      n += math.prod(shape) * kernel.size // kernel.shape[-1]
    layer = _layer_summary(path or type(model).__name__, module, params.get(path, []),
                           stats.get(path))
    rows.append(dataclasses.replace(layer, output_shape=shape,
                                    macs=n if x is not None and shape is not None else None))
  return Summary(tuple(rows))
