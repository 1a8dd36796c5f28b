"""Inference export of any NNX model: packed ternary layers, serialized float graph, ONNX.

``export(model, dir, ...)`` traces one eval-mode call of ``model`` (any ``nnx.Module`` built from
:class:`~ternjax.TernaryLinear` / :class:`~ternjax.TernaryConv` and ordinary Flax layers and
code) with a symbolic batch size, and writes what inference needs; ``load(dir)`` returns a
jitted function of the export alone, needing none of the model's Python code.

Design. The trace (:mod:`ternjax.tracing`) replaces each ternary layer call by one equation of
the ``ternjax_ternary_layer`` primitive, whose operands are the layer's input codes (from the
layer's own ``quant.input_codes``) and its packed arrays: base-3 codes (five trits a byte),
per-channel scales, bias. The jaxpr is then cut at these equations into a graph of nodes:

* ``segment`` nodes: the float code between ternary layers (float layers, BatchNorms that could
  not be folded, pooling, residual adds, attention, ...) as ``jax.export``-serialized StableHLO
  (platforms cpu and cuda), taking their arrays as arguments;
* ``ternary`` nodes: a layer record (geometry, which operands) run at load time through
  :func:`ternjax.ops.ternary_matmul` / :func:`~ternjax.ops.ternary_conv`, so a GPU gets ternjax's
  Pallas / Triton kernels (custom calls that ``jax.export`` cannot serialize portably) and a CPU
  its shape-tuned XLA formulations; exact integer sums, scales in the epilogue. Grouped
  (depthwise) convolutions, which the ops do not cover, run as an exact float32 contraction of
  patches with the unpacked trits.

``model.onnx`` is the same graph for runtimes without JAX: converted by jax2onnx, ternary layers
in a portable form (the uint8 codes are initializers, unpacked by Div / Mod / compare nodes,
then an exact float32 MatMul of integer codes), run by onnxruntime and by ONNX's NumPy
reference evaluator (:mod:`ternjax.runtime_numpy`).

BatchNorm folding (eval mode, running statistics): a BatchNorm whose input is a linear or conv
layer's output and nothing else computes ``g·y + shift`` with ``g = γ/√(var + ε)``; for
``y = s·acc + b`` that is ``(g·s)·acc + (g·b + shift)``, so the per-channel scales (both ``αp``
and ``αn`` for TTQ) and the bias absorb it, and a float kernel's columns are multiplied by ``g``.
Any other BatchNorm runs as a per-channel affine ``x·scale + shift``.

Directory (format version 2): an Orbax checkpoint (``arrays/``: the arrays by name, e.g.
``fc2/codes``; ``metadata/``: JSON: names, shapes, classes, the graph, layer table, per-array
SHA-256), ``graph/*.jax`` (segments), ``model.onnx``, and ``checksums.json``: the SHA-256 of
every other file, checked before anything is read. Before it is renamed into place, the written
export is loaded by every runtime and compared with the model on a probe batch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import shutil
import uuid
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding
from jax import lax
from jax.extend import core as jcore

import ternjax
from ternjax import model_summary, ops, packing, runtime_numpy, tracing
from ternjax.runtime_numpy import (
  ARRAYS_ITEM,
  FORMAT_VERSION,
  METADATA_ITEM,
  ONNX_FILE,
  ExportError,
  check_arrays,
  check_images,
  sha256,
  unreadable_arrays,
)

__all__ = [
  "FORMAT_VERSION",
  "ExportError",
  "Inference",
  "TernarySpec",
  "export",
  "forward",
  "load",
  "model_card",
  "package",
  "size_report",
]

PLATFORMS = ("cpu", "cuda")
ONNX_OPSET = 21
PROBE_TOLERANCE = 0.05   # export check: max |Δlogit| ≤ this × max(1, max |logit|)


# --------------------------------------------------------------------------------------------
# The ternary layer as one primitive


@dataclasses.dataclass(frozen=True)
class TernarySpec:
  """What a ternary layer call computes, besides its arrays (a primitive parameter: hashable).

  ``operands`` names the call's operands in order: ``x`` (input codes, or floats), optionally
  ``x_scale``, then ``codes`` (the ``(rows, features)`` weight matrix as
  :func:`ternjax.packing.pack_trits`; conv kernels as :func:`ternjax.ops.kernel_to_matrix`),
  ``scale_pos``, optionally
  ``scale_neg`` (a scale for the −1 weights), ``bias``.
  """

  name: str
  kind: str                  # 'linear' | 'conv'
  rows: int
  features: int
  x_ternary: bool            # x holds ternary codes (popcount path)
  operands: tuple[str, ...]
  window: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  padding: str | tuple[tuple[int, int], ...] = "VALID"
  dilation: tuple[int, ...] = ()
  groups: int = 1

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> TernarySpec:
    tup = lambda v: tuple(tuple(p) if isinstance(p, list) else p for p in v)
    padding = d["padding"] if isinstance(d["padding"], str) else tup(d["padding"])
    return cls(**{**d, "operands": tuple(d["operands"]), "window": tuple(d["window"]),
                  "strides": tuple(d["strides"]), "dilation": tuple(d["dilation"]),
                  "padding": padding})


def _row_scale(x_scale, x_shape, keep: int):
  """A per-example (or scalar) input scale for ``x`` reshaped to ``(-1, *x_shape[-keep:])``."""
  if x_scale is None or jnp.ndim(x_scale) == 0:
    return x_scale
  lead = tuple(x_shape[:len(x_shape) - keep])
  return jnp.broadcast_to(x_scale, lead + (1,) * keep).reshape((-1,) + (1,) * keep)


def _exact_in_float32(spec: TernarySpec, dtype) -> None:
  """Raises unless float32 sums of ``dtype`` codes times trits are exact (|sum| ≤ 2^24)."""
  if not jnp.issubdtype(dtype, jnp.integer):
    return
  info = jnp.iinfo(dtype)
  largest = 1 if spec.x_ternary else max(-int(info.min), int(info.max))
  if spec.rows * largest > 2 ** 24:
    raise ExportError(f"{spec.name}: {spec.rows} rows of {dtype} codes can exceed 2^24: float32 "
                      "sums would not be exact")


def _float_sums(spec: TernarySpec, x, t, two_sums: bool, patches: bool) -> list:
  """Float32 ``Σ x·t`` (or ``Σ x·[t = ±1]``) of ``x`` (``(M, K)``, conv: NHWC) and trits
  ``t (rows, features)``: exact for integer codes (sums below 2^24, any summation order).

  Convolutions are a float convolution of the trits (an ONNX ``Conv``: im2col GEMMs in
  onnxruntime and the reference evaluator), or with ``patches`` GEMMs of
  :func:`ternjax.ops.conv_patches` (exact on every backend: a GPU's convolution may pick a
  Winograd or FFT algorithm).
  """
  _exact_in_float32(spec, x.dtype)
  ws = [(t == 1).astype(jnp.float32), (t == -1).astype(jnp.float32)] if two_sums else \
      [t.astype(jnp.float32)]
  x = x.astype(jnp.float32)
  hi = lax.Precision.HIGHEST
  g = spec.groups
  if spec.kind == "conv" and not patches:
    sp = "HWD"[:len(spec.window)]
    kernel = lambda w: jnp.moveaxis(w.reshape(-1, *spec.window, spec.features), 0, -2)
    return [lax.conv_general_dilated(x, kernel(w), spec.strides, spec.padding,
                                     rhs_dilation=spec.dilation, feature_group_count=g,
                                     dimension_numbers=(f"N{sp}C", f"{sp}IO", f"N{sp}C"),
                                     precision=hi) for w in ws]
  if spec.kind == "conv":
    x = ops.conv_patches(x, spec.window, spec.strides, spec.padding, spec.dilation)
  if g == 1:
    return [lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=hi) for w in ws]
  xg = x.reshape(*x.shape[:-1], g, spec.rows)  # (C, kh, kw) patches: group j is block j
  return [jnp.einsum("...gk,kgn->...gn", xg, w.reshape(spec.rows, g, -1),
                     precision=hi).reshape(*x.shape[:-1], spec.features) for w in ws]


def _ternary_call(spec: TernarySpec, x, x_scale, contract) -> jax.Array:
  """Reshapes ``x`` to rows (``(M, K)``, conv: one batch axis), runs ``contract(rows, scale)``
  and restores the leading axes (nnx.Linear / nnx.Conv accept several)."""
  keep = 1 if spec.kind == "linear" else len(spec.window) + 1  # K; or spatial axes and C
  lead = x.shape[:x.ndim - keep]
  out = contract(x.reshape((-1,) + x.shape[x.ndim - keep:]), _row_scale(x_scale, x.shape, keep))
  return out.reshape(tuple(lead) + out.shape[1:])


def _portable(spec, x, t, scale_pos, bias, x_scale=None, scale_neg=None, patches=False):
  def contract(rows, xs):
    accs = _float_sums(spec, rows, t, scale_neg is not None, patches)
    return ops.epilogue(*accs, x_scale=xs, w_scale=scale_pos, w_scale_neg=scale_neg) + bias
  return _ternary_call(spec, x, x_scale, contract)


def ternary_portable(spec: TernarySpec, x, codes, scale_pos, bias, x_scale=None,
                     scale_neg=None) -> jax.Array:
  """A ternary layer from its base-3 codes, in portable operations (the ONNX graph's form):
  unpack (integer division, remainder, compare), an exact float32 contraction, the epilogue,
  the bias."""
  t = packing.unpack_trits(codes, (spec.rows, spec.features), dtype=jnp.int8)
  return _portable(spec, x, t, scale_pos, bias, x_scale, scale_neg)


def ternary_dispatch(spec: TernarySpec, x, codes, scale_pos, bias, x_scale=None,
                     scale_neg=None, *, implementation=None) -> jax.Array:
  """A ternary layer through :mod:`ternjax.ops` (``codes`` as bitplanes): what ``load`` runs.

  Grouped convolutions, which the ops do not cover, run as exact float32 GEMMs of patches
  (:func:`_float_sums`).
  """
  if spec.groups != 1:
    t = packing.unpack_bitplanes(codes, jnp.int8)
    return _portable(spec, x, t, scale_pos, bias, x_scale, scale_neg, patches=True)

  def contract(rows, xs):
    kw = dict(x_ternary=spec.x_ternary, x_scale=xs, w_scale=scale_pos, w_scale_neg=scale_neg,
              implementation=implementation)
    if spec.kind == "linear":
      return ops.ternary_matmul(rows, codes, **kw) + bias
    return ops.ternary_conv(rows, codes, window=spec.window, strides=spec.strides,
                            padding=spec.padding, rhs_dilation=spec.dilation, **kw) + bias
  return _ternary_call(spec, x, x_scale, contract)


ternary_layer_p = jcore.Primitive("ternjax_ternary_layer")


@ternary_layer_p.def_abstract_eval
def _ternary_layer_abstract(*avals, spec):
  out = jax.eval_shape(lambda *a: ternary_portable(spec, **dict(zip(spec.operands, a))), *avals)
  return jax.core.ShapedArray(out.shape, out.dtype)


# Pass 1 marks dense outputs and BatchNorm inputs (identity) to find which BatchNorms fold.
_mark_p = jcore.Primitive("ternjax_mark")
_mark_p.def_abstract_eval(lambda x, *, path, role: x)


# --------------------------------------------------------------------------------------------
# Tracing the model into a graph


def _tuple(v, n: int) -> tuple[int, ...]:
  return (1,) * n if v is None else (int(v),) * n if isinstance(v, int) else tuple(map(int, v))


def _conv_geometry(path: str, conv: nnx.Conv) -> dict:
  nd = len(conv.kernel_size)
  if conv.mask is not None or _tuple(conv.input_dilation, nd) != (1,) * nd:
    raise ExportError(f"{path}: masked or input-dilated ternary convolutions are not exportable")
  padding = canonicalize_padding(conv.padding, nd)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise ExportError(f"{path}: ternary convolutions with padding {padding!r} are not "
                      "exportable (SAME, VALID or explicit pairs)")
  return dict(window=tuple(conv.kernel_size), strides=_tuple(conv.strides, nd),
              padding=padding if isinstance(padding, str) else
              tuple((int(a), int(b)) for a, b in padding),
              dilation=_tuple(conv.kernel_dilation, nd), groups=int(conv.feature_group_count))


def _ternary_inputs(quant) -> bool:
  """Whether a layer's input codes are ternary (they then take the popcount path)."""
  config = quant.config
  return bool(getattr(config, "ternary_activations", config.activations == "ternary"))


def _feature_axes(bn: nnx.BatchNorm, ndim: int) -> tuple[int, ...]:
  axes = bn.axis if isinstance(bn.axis, (tuple, list)) else (bn.axis,)
  return tuple(sorted(a % ndim for a in axes))


def _batchnorm_affine(bn: nnx.BatchNorm) -> tuple[jax.Array, jax.Array]:
  """``(gain, shift)`` with ``bn(y) = gain·y + shift`` in eval mode (running statistics)."""
  gain = lax.rsqrt(bn.var[...] + bn.epsilon)
  if getattr(bn, "scale", None) is not None:
    gain = gain * bn.scale[...]
  shift = -bn.mean[...] * gain
  if getattr(bn, "bias", None) is not None:
    shift = shift + bn.bias[...]
  return gain, shift


def _dense_or_bn(module) -> bool:
  return isinstance(module, (nnx.Linear, nnx.Conv, nnx.BatchNorm))


def _fold_plan(clone: nnx.Module, x: jax.ShapeDtypeStruct) -> dict[str, str]:
  """``{BatchNorm path: layer path}`` for each BatchNorm that folds into the layer before it:
  its input is that layer's output and nothing else uses it, both run once, and it normalizes
  the last axis (the layer's output features)."""
  calls = collections.Counter()

  def hook(module, call, args, kwargs):
    path = getattr(module, tracing.PATH_ATTR)
    calls[path] += 1
    if isinstance(module, nnx.BatchNorm):
      return call(_mark_p.bind(args[0], path=path, role="in"), *args[1:], **kwargs)
    return _mark_p.bind(call(*args, **kwargs), path=path, role="out")

  jaxpr = _traced(clone, x, hook)[0].jaxpr
  uses = collections.Counter(v for e in jaxpr.eqns for v in e.invars
                             if isinstance(v, jcore.Var))
  uses.update(v for v in jaxpr.outvars if isinstance(v, jcore.Var))
  marks = [e for e in jaxpr.eqns if e.primitive is _mark_p]
  produced = {e.outvars[0]: e.params["path"] for e in marks if e.params["role"] == "out"}
  modules = {tracing.path_name(p): m for p, m in nnx.iter_modules(clone)}
  plan = {}
  for e in marks:
    bn, (v,) = e.params["path"], e.invars
    layer = produced.get(v)
    if e.params["role"] != "in" or layer is None or uses[v] != 1 or calls[bn] != 1 or \
        calls[layer] != 1:
      continue
    features = modules[layer].kernel.shape[-1]
    if _feature_axes(modules[bn], v.aval.ndim) == (v.aval.ndim - 1,) and \
        modules[bn].num_features == features:
      plan[bn] = layer
  return plan


def _traced(model, x, hook, extra=None):
  """:func:`ternjax.tracing.trace`, its failures as one-line :class:`ExportError` s."""
  try:
    return tracing.trace(model, x, hook, extra)
  except ExportError:
    raise
  except Exception as err:  # the user's code: any error; one line says where it failed
    first = (str(err).splitlines() or [""])[0][:200]
    raise ExportError(f"tracing {type(model).__name__} on input {x.shape} failed: "
                      f"{type(err).__name__}: {first}") from err


@dataclasses.dataclass
class _Traced:
  """The traced inference function: graph nodes, segment jaxprs, arrays, layer records."""

  nodes: list[dict]
  segments: list[jcore.ClosedJaxpr]
  arrays: dict[str, np.ndarray]
  layers: dict[str, dict]
  x: jax.ShapeDtypeStruct
  output: str
  out_shape: tuple


def _ternary_arrays(layer, quant, affine) -> dict[str, jax.Array]:
  """A ternary layer's arrays, BatchNorm ``affine`` (gain, shift) folded in (None: none)."""
  kernel = layer.kernel[...]
  t, scale_pos, scale_neg = quant.weight_codes(kernel)
  n = kernel.shape[-1]
  gain, shift = affine if affine is not None else (jnp.ones(n), jnp.zeros(n))
  bias = layer.bias[...] if getattr(layer, "bias", None) is not None else jnp.zeros(n)
  matrix = ops.kernel_to_matrix(t) if isinstance(layer, nnx.Conv) else t
  arrays = {"codes": packing.pack_trits(matrix), "scale_pos": gain * scale_pos,
            "bias": gain * bias + shift}
  if scale_neg is not None:
    arrays["scale_neg"] = gain * scale_neg
  return arrays


def _export_arrays(clone: nnx.Module, plan: dict[str, str]) -> dict[str, np.ndarray]:
  """The arrays the export computes from the model, by name, in one jitted call (eager ops
  would compile one by one): ternary layers' codes and scales and biases (``path/codes``, ...),
  folded float layers' kernels and biases (their state names, or ``path/bn_shift`` without a
  bias), and BatchNorms that do not fold as ``path/gain``, ``path/shift``."""
  graphdef, state = nnx.split(clone)

  @jax.jit
  def compute(state):
    modules = {tracing.path_name(p): m for p, m in nnx.iter_modules(nnx.merge(graphdef, state))}
    folded = {layer: _batchnorm_affine(modules[bn]) for bn, layer in plan.items()}
    arrays = {}
    for path, m in modules.items():
      quant = tracing.ternary_quant(m)
      if quant is not None:
        arrays.update({f"{path}/{k}": v for k, v in
                       _ternary_arrays(m, quant, folded.get(path)).items()})
      elif isinstance(m, (nnx.Linear, nnx.Conv)) and path in folded:
        gain, shift = folded[path]
        arrays[f"{path}/kernel"] = m.kernel[...] * gain
        if getattr(m, "bias", None) is not None:
          arrays[f"{path}/bias"] = gain * m.bias[...] + shift
        else:
          arrays[f"{path}/bn_shift"] = shift
      elif isinstance(m, nnx.BatchNorm) and path not in plan:
        arrays[f"{path}/gain"], arrays[f"{path}/shift"] = _batchnorm_affine(m)
    return arrays

  return {k: np.asarray(v) for k, v in compute(state).items()}


def _spec_fields(path: str, layer, quant) -> dict:
  """A ternary layer's :class:`TernarySpec` fields but the operands."""
  kernel = layer.kernel
  conv = isinstance(layer, nnx.Conv)
  return dict(name=path, kind="conv" if conv else "linear",
              rows=int(kernel.size // kernel.shape[-1]), features=int(kernel.shape[-1]),
              x_ternary=_ternary_inputs(quant), **(_conv_geometry(path, layer) if conv else {}))


def _check_quantizers(clone: nnx.Module) -> None:
  """Refuses quantizers outside ternjax's layers (they would export as float code)."""
  owned = {id(tracing.ternary_quant(m)) for _, m in nnx.iter_modules(clone)}
  for path, m in nnx.iter_modules(clone):
    if hasattr(m, "weight_codes") and id(m) not in owned and \
        getattr(getattr(m, "config", None), "ternary_weights", False):
      raise ExportError(f"{tracing.path_name(path)}: a ternary quantizer outside TernaryLinear / "
                        "TernaryConv is not exportable packed; use those layers")


def _trace_model(model: nnx.Module, input_shape: Sequence[int]) -> _Traced:
  """Traces ``model`` in eval mode with a symbolic batch: pass 1 finds the BatchNorms that
  fold, pass 2 traces the inference function (ternary layers as :data:`ternary_layer_p`)."""
  batch, = jax.export.symbolic_shape("batch")
  x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  clone = tracing.hooked(model, _dense_or_bn)
  _check_quantizers(clone)
  plan = _fold_plan(clone, x)
  _, state = nnx.split(clone)
  values = {tracing.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
  computed = _export_arrays(clone, plan)
  extra = {k: v for k, v in computed.items() if k not in values}
  values.update(computed)
  specs, layers = {}, {}
  for path, m in ((tracing.path_name(p), m) for p, m in nnx.iter_modules(clone)):
    quant = tracing.ternary_quant(m)
    if quant is not None:
      specs[path] = _spec_fields(path, m, quant)
      c = quant.config
      layers[path] = dict(export=f"ternary_{specs[path]['kind']}", weights=c.weights,
                          activations=c.activations, act_threshold=c.act_threshold)
    elif isinstance(m, nnx.BatchNorm):
      layers[path] = dict(export="folded" if path in plan else "affine",
                          folded_into=plan.get(path))

  def hook(module, call, args, kwargs):
    path = getattr(module, tracing.PATH_ATTR)
    inputs = tracing.extra_inputs()
    if isinstance(module, nnx.BatchNorm):
      if path in plan:
        return args[0]
      y = args[0]
      shape = [y.shape[a] if a in _feature_axes(module, y.ndim) else 1 for a in range(y.ndim)]
      return y * inputs[f"{path}/gain"].reshape(shape) + inputs[f"{path}/shift"].reshape(shape)
    quant = tracing.ternary_quant(module)
    if quant is None:
      out = call(*args, **kwargs)
      return out + inputs[f"{path}/bn_shift"] if f"{path}/bn_shift" in inputs else out
    x, dtype = args[0], getattr(module, "dtype", None)
    if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(dtype)  # as the layer's own call (Flax promotes to its dtype)
    codes, x_scale = quant.input_codes(x)
    # Computed arrays are extra inputs, or replace a state leaf of the same name (the bias).
    state = {"bias": module.bias[...] if getattr(module, "bias", None) is not None else None}
    operands = {"x": codes, "x_scale": x_scale,
                **{k: inputs.get(f"{path}/{k}", state.get(k)) for k in ("codes", "scale_pos",
                                                                          "scale_neg", "bias")}}
    operands = {k: v for k, v in operands.items() if v is not None}
    spec = TernarySpec(**specs[path], operands=tuple(operands))
    out = ternary_layer_p.bind(*operands.values(), spec=spec)
    return out if dtype is None else out.astype(dtype)

  closed, names = _traced(clone, x, hook, extra)
  return _split_graph(closed, names, values, layers, x)


def _dce(jaxpr: jcore.Jaxpr) -> list:
  """The equations that the outputs need (or that have effects), in order."""
  live = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(v for v in eqn.invars if isinstance(v, jcore.Var))
  return kept[::-1]


def _jaxpr(invars, outvars, eqns) -> jcore.Jaxpr:
  """A jaxpr of some equations of a traced one (a segment, or one equation)."""
  info = jcore.DebugInfo("ternjax export", "segment", tuple(f"v{i}" for i in range(len(invars))),
                         tuple(f"out{i}" for i in range(len(outvars))))
  return jcore.Jaxpr([], invars, outvars, eqns, frozenset().union(*(e.effects for e in eqns)),
                     info)


def _split_graph(closed, names, values, layers, x) -> _Traced:
  """Cuts the jaxpr at the ternary layer equations into segment and ternary nodes."""
  jaxpr = closed.jaxpr
  name_of = dict(zip(jaxpr.invars, names))
  constants = iter(range(10 ** 9))

  def constant(value) -> str:  # an array the model's code made (a jaxpr constant or literal)
    key = f"const/{next(constants)}"
    values[key] = value
    return key

  for v, c in zip(jaxpr.constvars, closed.consts):
    name_of[v] = constant(c)
  eqns = _dce(jaxpr)
  for eqn in eqns:
    nested: list[str] = []
    visit = lambda e, scope, times, found=nested: found.append(e.params["spec"].name) \
        if e.primitive is ternary_layer_p else None
    for sub in tracing.sub_jaxprs(eqn):
      tracing.walk(sub, visit)
    if nested:
      raise ExportError(f"ternary layer {nested[0]} runs inside {eqn.primitive.name} (jit, "
                        "scan, remat, ...): export needs ternary layers called directly")
  groups, current = [], []
  for eqn in eqns:
    if eqn.primitive is ternary_layer_p:
      groups += [current, [eqn]] if current else [[eqn]]
      current = []
    else:
      current.append(eqn)
  if current:
    groups.append(current)

  later_uses = []  # vars read by groups after each one (and the output)
  used = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
  for group in reversed(groups):
    later_uses.append(set(used))
    used.update(v for e in group for v in e.invars if isinstance(v, jcore.Var))
  later_uses.reverse()

  def name(v):
    if isinstance(v, jcore.Literal):
      return constant(v.val)
    if v not in name_of:
      name_of[v] = f"v{len(name_of)}"
    return name_of[v]

  nodes, segments = [], []
  for group, later in zip(groups, later_uses):
    defined = {o for e in group for o in e.outvars}
    if group[0].primitive is ternary_layer_p:
      eqn, = group
      nodes.append(dict(op="ternary", spec=eqn.params["spec"].to_json(),
                        inputs=[name(v) for v in eqn.invars], outputs=[name(eqn.outvars[0])]))
      continue
    inputs = []
    for e in group:
      for v in e.invars:
        if isinstance(v, jcore.Var) and v not in defined and v not in inputs:
          inputs.append(v)
    outputs = [v for e in group for v in e.outvars if v in later]
    segments.append(jcore.ClosedJaxpr(_jaxpr(inputs, outputs, group), []))
    nodes.append(dict(op="segment", index=len(segments) - 1, inputs=[name(v) for v in inputs],
                      outputs=[name(v) for v in outputs]))
  out, = jaxpr.outvars if len(jaxpr.outvars) == 1 else (None,)
  if out is None:
    raise ExportError(f"the model returns {len(jaxpr.outvars)} arrays; export needs one "
                      "(the logits)")
  read = {n for node in nodes for n in node["inputs"]} | {name(out)}
  arrays = {}
  for k in sorted(read & set(values)):
    if jnp.issubdtype(values[k].dtype, jax.dtypes.prng_key):
      raise ExportError(f"the model reads the random key {k} in eval mode; export needs a "
                        "deterministic eval-mode model")
    arrays[k] = np.asarray(values[k])
  return _Traced(nodes, segments, arrays, layers, x, name(out), tuple(out.aval.shape))


# --------------------------------------------------------------------------------------------
# The inference function


def node_scope(index: int, node: dict) -> str:
  """The ``jax.named_scope`` of graph node ``index`` (the operation census reads it)."""
  kind = node["op"] if node["op"] == "segment" else f"ternary_{node['spec']['kind']}"
  return f"node{index:02d}_{kind}"


def forward(nodes: Sequence[dict], segments: Sequence[Callable], params: dict, images, *,
            ternary: Callable = ternary_dispatch, output: str,
            record: Callable | None = None) -> jax.Array:
  """Runs the export's graph on ``images``: segments (callables), ternary layers by
  ``ternary(spec, **operands)``, each node in its own named scope; ``record(index, outputs)``
  sees each node's outputs."""
  env = {**params, "images": images}
  for i, node in enumerate(nodes):
    args = [env[n] for n in node["inputs"]]
    with jax.named_scope(node_scope(i, node)):
      if node["op"] == "segment":
        outs = segments[node["index"]](*args)
      else:
        spec = TernarySpec.from_json(node["spec"])
        outs = [ternary(spec, **dict(zip(spec.operands, args)))]
    env.update(zip(node["outputs"], outs))
    if record is not None:
      record(i, outs)
  return env[output]


def _segment_specs(closed: jcore.ClosedJaxpr) -> list[jax.ShapeDtypeStruct]:
  return [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]


def _params(meta: dict, arrays: dict) -> dict:
  """Device arrays of an export; ternary codes as bitplanes (2 bits per weight), converted
  with NumPy (a jitted conversion would compile for most of the load time) from base-3 codes
  (format 3) or 2-bit codes (format 2)."""
  shapes = {node["inputs"][node["spec"]["operands"].index("codes")]:
            (node["spec"]["rows"], node["spec"]["features"])
            for node in meta["graph"]["nodes"] if node["op"] == "ternary"}
  if meta["format_version"] == 2:
    planes = lambda v, shape: packing.bitplanes_from_codes(v, shape[0], 0)
  else:
    planes = lambda v, shape: packing.pack_bitplanes(packing.unpack_trits(v, shape), axis=0)
  return jax.device_put({k: planes(np.asarray(v), shapes[k]) if k in shapes else v
                         for k, v in arrays.items()})


@dataclasses.dataclass(frozen=True, eq=False)
class Inference:
  """A loaded export: ``inference(images) -> logits``; ``metadata`` is the export's JSON.

  Images are checked against the export's input shape (any batch size, an empty batch gives an
  empty result) and must be floating point and finite.
  """

  metadata: dict
  params: dict
  segments: tuple
  implementation: str | Sequence[str] | None = None

  @functools.cached_property
  def function(self) -> Callable:
    """``function(params, images) -> logits``: the graph, not jitted (for tracing)."""
    graph = self.metadata["graph"]
    return functools.partial(forward, graph["nodes"], [s.call for s in self.segments],
                             ternary=functools.partial(ternary_dispatch,
                                                       implementation=self.implementation),
                             output=graph["output"])

  @functools.cached_property
  def _jitted(self):
    return jax.jit(lambda params, x: (self.function(params, x), jnp.all(jnp.isfinite(x))))

  def __call__(self, images) -> jax.Array:
    check_images(images, self.metadata)
    if images.shape[0] == 0:
      return jnp.zeros((0, len(self.metadata["classes"])), jnp.float32)
    logits, finite = self._jitted(self.params, jnp.asarray(images, jnp.float32))
    if not finite:
      raise ValueError("the images hold non-finite values (NaN or infinity)")
    return logits

  def jaxpr(self, batch: int = 1) -> jcore.ClosedJaxpr:
    """The inference function's jaxpr for ``batch`` images (for the operation census)."""
    x = jnp.zeros((batch, *self.metadata["input_shape"]), jnp.float32)
    return jax.make_jaxpr(self.function)(self.params, x)


# --------------------------------------------------------------------------------------------
# Save and load


def _nest(flat: dict) -> dict:
  """``{'a/b': x}`` -> ``{'a': {'b': x}}`` (the Orbax item's tree)."""
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    flat.update(_flatten(v, name + "/") if isinstance(v, dict) else {name: v})
  return flat


def _checkpointer() -> ocp.Checkpointer:
  # The calling process alone writes or reads an export (process 0 of a multi-process run): no
  # barriers with the other processes.
  solo = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                            active_processes={jax.process_index()})
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      composite_options=ocp.CompositeOptions(multiprocessing_options=solo), **{
          ARRAYS_ITEM: ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=False),
          METADATA_ITEM: ocp.JsonCheckpointHandler()}), multiprocessing_options=solo)


def _save_checkpoint(path: Path, arrays: dict, meta: dict) -> None:
  with _checkpointer() as ckptr:
    ckptr.save(path, ocp.args.Composite(**{ARRAYS_ITEM: ocp.args.PyTreeSave(_nest(arrays)),
                                           METADATA_ITEM: ocp.args.JsonSave(meta)}))


def _restore_arrays(directory: Path, meta: dict) -> dict:
  restore_args = _nest({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in meta["arrays"]})
  try:
    with _checkpointer() as ckptr:
      restored = ckptr.restore(directory.absolute(), ocp.args.Composite(**{
          ARRAYS_ITEM: ocp.args.PyTreeRestore(restore_args=restore_args)}))
    arrays = _flatten(restored[ARRAYS_ITEM])
  except Exception as err:  # Orbax / TensorStore raise many types; one line says what failed.
    raise unreadable_arrays(directory, err) from err
  check_arrays(arrays, meta, directory)
  return arrays


def _read_segments(directory: Path, meta: dict) -> tuple:
  platform = jax.export.default_export_platform()
  if platform not in meta["platforms"]:
    raise ExportError(f"{directory}: exported for {', '.join(meta['platforms'])}, not for this "
                      f"{platform} backend; export the model again with platforms=(..., "
                      f"{platform!r})")
  segments = []
  for file in meta["graph"]["segments"]:
    try:
      segment = jax.export.deserialize(bytearray((directory / file).read_bytes()))
      # The StableHLO inside is read only when the segment is first called; read it now. A
      # newer jax's serialization fails here (jax.export is forward compatible for weeks only).
      segment.mlir_module()
    except Exception as err:
      raise ExportError(f"{directory}: cannot deserialize {file}, written by jax "
                        f"{meta['jax_version']}, with this jax {jax.__version__} "
                        f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}); "
                        "export the model with this jax, or run its model.onnx "
                        "(ternjax.runtime_numpy)") from err
    segments.append(segment)
  return tuple(segments)


def load(directory, *, model: str | None = None, implementation=None) -> Inference:
  """Loads an export as a jitted inference function (:class:`Inference`).

  ``model`` checks the architecture's name; ``implementation`` selects the ternary op
  implementation (default: the dispatch's, see :mod:`ternjax.ops`). Every file is checked
  against ``checksums.json`` first. Raises :class:`ExportError` (one line, naming the file) for
  a missing, truncated, corrupted or edited export, another format version or another model.
  """
  directory = Path(directory)
  meta = runtime_numpy.verify(directory, model)
  arrays = _restore_arrays(directory, meta)
  return Inference(meta, _params(meta, arrays), _read_segments(directory, meta),
                   implementation)


def write_atomic(target, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
  """Runs ``write(tmp)`` on a hidden path beside ``target`` and renames it into place.

  A failed ``write`` leaves ``target`` as it was. An existing ``target`` is an error unless
  ``overwrite``; then it is renamed aside, replaced, and deleted (restored if the rename fails).
  """
  target = Path(target).absolute()
  if target.exists() and not overwrite:
    raise ExportError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
  target.parent.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = target.with_name(f".{target.name}.partial-{tag}")
  old = target.with_name(f".{target.name}.old-{tag}")
  try:
    write(tmp)
    if target.exists():
      os.rename(target, old)
      try:
        os.rename(tmp, target)
      except BaseException:
        os.rename(old, target)
        raise
    elif tmp.is_dir():
      os.rename(tmp, target)  # fails if a non-empty target appeared meanwhile: never clobbers
    else:
      os.link(tmp, target)    # fails if target appeared meanwhile
  finally:
    for leftover in (tmp, old):
      if leftover.is_dir():
        shutil.rmtree(leftover, ignore_errors=True)
      elif leftover.exists():
        leftover.unlink()
  return target


# --------------------------------------------------------------------------------------------
# ONNX


@contextlib.contextmanager
def _quiet(*loggers: str):
  """Silences chatty loggers (onnx_ir warns about values without types) for a block."""
  saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
  for logger, _ in saved:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in saved:
      logger.setLevel(level)


def _max_pool_slices(x, *, window_dimensions, window_strides, padding, base_dilation,
                     window_dilation):
  """``reduce_window_max`` as the maximum of strided slices, one per window offset (exact)."""
  if any(d != 1 for d in base_dilation):
    raise ExportError("max pooling with base dilation has no ONNX form here")
  low = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  if any(p != (0, 0) for p in map(tuple, padding)):  # jnp.pad: jax2onnx's lax.pad fails
    x = jnp.pad(x, padding, constant_values=low)     # on symbolic dimensions
  out = [(n - (w - 1) * d - 1) // s + 1 for n, w, d, s in
         zip(x.shape, window_dimensions, window_dilation, window_strides)]
  result = None
  for offset in itertools.product(*map(range, window_dimensions)):
    start = [o * d for o, d in zip(offset, window_dilation)]
    limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out, window_strides)]
    piece = lax.slice(x, start, limit, window_strides)
    result = piece if result is None else lax.max(result, piece)
  return result


def _pad_constant(x, value, *, padding_config):
  """``lax.pad`` (constant, no interior or negative padding) as a concatenation of strided
  copies of an edge slice set to ``value``: jax2onnx's ``pad`` conversion fails on symbolic
  batch sizes (ResNet's option-A shortcuts pad channels)."""
  if any(i != 0 or lo < 0 or hi < 0 for lo, hi, i in padding_config):
    raise ExportError("interior or negative padding has no ONNX form here")
  for axis, (lo, hi, _) in enumerate(padding_config):
    if lo or hi:
      fill = lax.slice_in_dim(x, 0, 1, axis=axis) * 0 + value
      x = jnp.concatenate([fill] * lo + [x] + [fill] * hi, axis=axis)
  return x


# Primitives that segments replay through another function for jax2onnx: (operands, params).
_ONNX_REPLACEMENTS = {
    "reduce_window_max": lambda args, params: _max_pool_slices(args[0], **params),
    "pad": lambda args, params: _pad_constant(*args, **params),
}


def _replaced(jaxpr: jcore.Jaxpr) -> bool:
  """Whether ``jaxpr`` (or a jaxpr called from it) holds a primitive to replace."""
  return any(e.primitive.name in _ONNX_REPLACEMENTS or
             any(_replaced(sub) for sub in tracing.sub_jaxprs(e)) for e in jaxpr.eqns)


def _onnx_segment(closed: jcore.ClosedJaxpr) -> Callable:
  """A segment as a function for jax2onnx, with :data:`_ONNX_REPLACEMENTS` (jax2onnx makes an
  N-d MaxPool of NHWC pooling, which onnxruntime does not run, and fails on ``lax.pad`` of a
  symbolic batch), also inside the jitted functions a segment calls (``jnp.pad`` is one)."""
  if not _replaced(closed.jaxpr):
    return jcore.jaxpr_as_fun(closed)
  jaxpr = closed.jaxpr

  def one(eqn):  # a single equation as a function of its variables
    ins = list(dict.fromkeys(v for v in eqn.invars if isinstance(v, jcore.Var)))
    return ins, jcore.jaxpr_as_fun(jcore.ClosedJaxpr(_jaxpr(ins, eqn.outvars, [eqn]), []))

  def fn(*args):
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    for eqn in jaxpr.eqns:
      replace = _ONNX_REPLACEMENTS.get(eqn.primitive.name)
      inner = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit") else None
      if replace is not None:
        outs = [replace([read(v) for v in eqn.invars], eqn.params)]
      elif isinstance(inner, jcore.ClosedJaxpr) and _replaced(inner.jaxpr):
        outs = _onnx_segment(inner)(*map(read, eqn.invars))
      else:
        ins, f = one(eqn)
        outs = f(*map(read, ins))
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]
  return fn


def _onnx_model(traced: _Traced, model_name: str) -> bytes:
  """The graph as ONNX (jax2onnx), ternary layers portable, the arrays as initializers."""
  try:
    import jax2onnx
    import onnx
    from onnx import numpy_helper
  except ImportError as err:
    raise ExportError(f"the ONNX export needs jax2onnx ({err}): pip install 'ternjax[onnx]', "
                      "or pass onnx=False") from None
  names = list(traced.arrays)
  segments = [_onnx_segment(s) for s in traced.segments]

  def fn(*args):
    return forward(traced.nodes, segments, dict(zip(names, args[:-1])), args[-1],
                   ternary=ternary_portable, output=traced.output)

  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in traced.arrays.values()] + [traced.x]
  try:
    with _quiet("onnx_ir", "jax2onnx"):
      proto = jax2onnx.to_onnx(fn, specs, model_name=model_name, opset=ONNX_OPSET,
                               input_names=names + ["images"], output_names=["logits"])
  except Exception as err:  # an operation jax2onnx does not convert, for example
    raise ExportError(f"ONNX conversion failed ({type(err).__name__}: "
                      f"{(str(err).splitlines() or [''])[0][:200]}); pass onnx=False to "
                      "export without model.onnx") from err
  graph = proto.graph
  kept = [i for i in graph.input if i.name not in traced.arrays]
  del graph.input[:]
  graph.input.extend(kept)
  graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in traced.arrays.items())
  onnx.checker.check_model(proto)
  return proto.SerializeToString()


# --------------------------------------------------------------------------------------------
# Export


def _float32_bytes(model: nnx.Module) -> int:
  """Bytes of the model's parameters and batch statistics as float32 (the baseline size)."""
  state = nnx.state(model, nnx.Param, nnx.BatchStat)
  return 4 * sum(int(np.size(v)) for v in jax.tree.leaves(state))


def _method(layers: dict) -> str:
  ternary = [l for l in layers.values() if l["export"].startswith("ternary")]
  weights = sorted({l["weights"] for l in ternary}) or ["fp"]
  acts = sorted({l["activations"] for l in ternary if l["activations"] != "none"})
  return "/".join(weights) + (f" weights, {'/'.join(acts)} activations" if acts else " weights")


def _roles(traced: _Traced) -> dict[str, str]:
  """Each array's role: ternary ``codes``, ``scales`` (weights' and inputs'), ``bias``, or
  ``float`` (everything else: float layers, affines, ...)."""
  roles = dict.fromkeys(traced.arrays, "float")
  for node in traced.nodes:
    if node["op"] == "ternary":
      for operand, name in zip(node["spec"]["operands"], node["inputs"]):
        role = {"codes": "codes", "bias": "bias", "x": None}.get(operand, "scales")
        if role and name in roles:
          roles[name] = role
  return roles


def _agreement(got, expected) -> float:
  """max |Δ| relative to max(1, max |expected|)."""
  got, expected = np.asarray(got), np.asarray(expected)
  return float(np.max(np.abs(got - expected)) / max(1.0, float(np.max(np.abs(expected)))))


def _check_written(path: Path, model: nnx.Module, probe: np.ndarray, onnx: bool,
                   tolerance: float = PROBE_TOLERANCE) -> dict:
  """Loads the written export with every runtime and compares it with ``model`` (eval)."""
  reference = nnx.clone(model)
  reference.eval()
  graphdef, state = nnx.split(reference)
  expected = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, probe))
  results = {"jax": np.asarray(load(path)(probe))}
  if onnx:
    for engine in runtime_numpy.ENGINES:
      results[engine] = runtime_numpy.load(path, engine=engine)(probe)
  report = {"model": _agreement(results["jax"], expected)}
  report.update({k: _agreement(v, results["jax"]) for k, v in results.items() if k != "jax"})
  for runtime, error in report.items():
    if not error <= tolerance:
      against = "the model in eval mode" if runtime == "model" else "the JAX runtime"
      raise ExportError(f"the written export's {'jax' if runtime == 'model' else runtime} "
                        f"runtime disagrees with {against} on a probe batch (max |Δ| "
                        f"{error:.3g} of the logits' scale); nothing written")
  return report


def _compute_dtype(model: nnx.Module, dtype) -> nnx.Module:
  """``model``, or a copy whose modules compute in ``dtype`` (their ``dtype`` attribute, where
  set). Flax layers promote their parameters to their ``dtype`` before using them, so the
  copy's are rounded to the dtype they were computed in (a bfloat16 model's kernels to
  bfloat16 values, stored as float32): its ternary layers then quantize the very weights the
  model quantized (their codes and scales are the model's) and its float layers multiply by
  the same values."""
  if dtype is None:
    return model
  modules = [m for _, m in nnx.iter_modules(model)
             if getattr(m, "dtype", None) not in (None, jnp.dtype(dtype))]
  if not modules:
    return model
  clone = nnx.clone(model)
  for _, m in nnx.iter_modules(clone):
    own = getattr(m, "dtype", None)
    if own is None or jnp.dtype(own) == jnp.dtype(dtype):
      continue
    for value in vars(m).values():
      if isinstance(value, nnx.Param) and jnp.issubdtype(value.dtype, jnp.floating):
        value[...] = value[...].astype(own).astype(value.dtype)
    if (quant := tracing.ternary_quant(m)) is not None:
      quant.weight_dtype = jnp.dtype(own)  # its statistics (threshold, scales) as computed
    object.__setattr__(m, "dtype", jnp.dtype(dtype))
  return clone


def _float32_precision(fn):
  """Runs ``fn`` at ``jax.default_matmul_precision('highest')``: the export's float code is
  traced and serialized at float32 precision, so that it computes the same on a CPU and a GPU
  (whose default, TF32, rounds float32 inputs to 10 bits, differently per compiled graph)."""
  @functools.wraps(fn)
  def at_float32(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)
  return at_float32


@_float32_precision
def export(model: nnx.Module, directory, *, model_name: str, input_shape: Sequence[int],
           classes: int | Sequence[str], method: str | None = None,
           accuracy: float | None = None, input_divisor: float = 255.0,
           extra: dict | None = None, overwrite: bool = False, onnx: bool = True,
           platforms: Sequence[str] = PLATFORMS, probe=None,
           tolerance: float = PROBE_TOLERANCE, compute_dtype="float32") -> Path:
  """Writes ``model`` (eval mode: running statistics) as an inference export; returns its path.

  Float code is traced at float32 precision (``jax.default_matmul_precision('highest')``): on
  a GPU, compare the export with the model evaluated in that context.

  Args:
    model: any NNX module called as ``model(images)``, returning logits.
    directory: the export directory; must not exist unless ``overwrite``.
    model_name: the architecture's name (``load(dir, model=...)`` checks it).
    input_shape: one input's shape, without the batch, e.g. ``(28, 28, 1)``.
    classes: the number of classes or their names; must match the model's output size.
    method: a description of the quantization (default: derived from the layers).
    accuracy: the test accuracy to record, if measured.
    input_divisor: the model's input is ``uint8 images / input_divisor`` (as
      :func:`ternjax.train.preprocess`); ``ternjax-predict`` applies it.
    extra: more JSON metadata (dataset, preprocessing, training config, ...).
    onnx: also write ``model.onnx`` (needs jax2onnx) for onnxruntime and the NumPy runtime.
    platforms: the ``jax.export`` platforms of the serialized segments.
    probe: inputs on which the written export must agree with the model (default: four
      uniform random images in [0, 1)).
    tolerance: the largest max |Δ| allowed there, relative to max(1, max |logit|); two
      bfloat16 computations of a deep network (``compute_dtype=None``) can differ by more
      than the float32 default.
    compute_dtype: the float code's compute dtype: the exported copy's modules compute in it
      (a model trained in bfloat16 exports as float32: ONNX runtimes lack bfloat16 kernels for
      most operators, and the ternary layers' integer sums are exact either way); None keeps
      the model's.
  """
  if Path(directory).exists() and not overwrite:
    raise ExportError(f"{Path(directory).absolute()} exists; pass overwrite=True "
                      "(--overwrite) to replace it")
  model = _compute_dtype(model, compute_dtype)
  input_shape = tuple(int(d) for d in input_shape)
  classes = [str(c) for c in (range(classes) if isinstance(classes, int) else classes)]
  traced = _trace_model(model, input_shape)
  out_shape = traced.out_shape
  if len(out_shape) != 2 or out_shape[1] != len(classes):
    raise ExportError(f"the model outputs {tuple(out_shape)[1:]} per input of shape "
                      f"{input_shape}, expected {len(classes)} class logits")
  try:
    segments = [jax.export.export(jax.jit(jcore.jaxpr_as_fun(s)), platforms=tuple(platforms))(
        *_segment_specs(s)).serialize() for s in traced.segments]
  except Exception as err:
    raise ExportError(f"jax.export of the model's float code failed ({type(err).__name__}: "
                      f"{(str(err).splitlines() or [''])[0][:200]})") from err
  onnx_bytes = _onnx_model(traced, model_name) if onnx else None
  rows = model_summary.summary(model, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  layers = [dict(dataclasses.asdict(r), **traced.layers.get(r.name, {})) for r in rows.layers]
  roles = _roles(traced)
  files = [f"graph/segment{i:03d}.jax" for i in range(len(segments))]
  meta = dict(format_version=FORMAT_VERSION, ternjax_version=ternjax.__version__,
              jax_version=jax.__version__, model=model_name,
              method=method or _method(traced.layers), input_shape=list(input_shape),
              input_dtype="float32", classes=classes,
              accuracy=None if accuracy is None else float(accuracy),
              input_divisor=float(input_divisor), float32_bytes=_float32_bytes(model),
              extra=extra or {}, platforms=list(platforms),
              onnx=dict(file=ONNX_FILE, opset=ONNX_OPSET) if onnx else None,
              layers=layers,
              arrays={k: dict(shape=list(a.shape), dtype=str(a.dtype), sha256=sha256(a),
                              role=roles[k]) for k, a in traced.arrays.items()},
              graph=dict(nodes=traced.nodes, output=traced.output, segments=files))
  meta = json.loads(json.dumps(meta))  # plain JSON types (tuples -> lists)
  probe = np.asarray(probe if probe is not None else np.random.default_rng(0).random(
      (4, *input_shape), dtype=np.float32), np.float32)

  def write(tmp: Path) -> None:
    _save_checkpoint(tmp, traced.arrays, meta)
    (tmp / "graph").mkdir()
    for file, data in zip(files, segments):
      (tmp / file).write_bytes(data)
    if onnx_bytes is not None:
      (tmp / ONNX_FILE).write_bytes(onnx_bytes)
    runtime_numpy.write_checksums(tmp)
    _check_written(tmp, model, probe, onnx, tolerance)

  return write_atomic(directory, write, overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Size and packaging


def size_report(directory) -> dict:
  """Bytes of an export: arrays by role, files on disk, and bits per ternary weight.

  Array sizes are the stored arrays' raw bytes (``codes``: base-3, 1.6 bits per weight in
  format 3, 2 bits in format 2; ``scales``: the weights'
  ``scale_pos`` / ``scale_neg`` and the inputs' scales; ``bias`` of ternary layers; ``float``:
  everything else). ``disk_bytes`` counts every file of the export directory, ``orbax_bytes``
  the Orbax checkpoint (zstd-compressed chunks, so possibly below the raw arrays),
  ``onnx_bytes`` the ONNX file; ``onnx_bits_with_scales`` is read from the ONNX file's own
  initializers (so it shows whether the ONNX weights stay packed). Bits are None for an
  export without ternary weights.
  """
  directory = Path(directory)
  meta = runtime_numpy.verify(directory)
  size = collections.Counter({f"{r}_bytes": 0 for r in ("codes", "scales", "bias", "float")},
                             ternary_weights=0)
  for info in meta["arrays"].values():
    size[f"{info['role']}_bytes"] += math.prod(info["shape"]) * np.dtype(info["dtype"]).itemsize
  seen = set()
  for node in meta["graph"]["nodes"]:
    if node["op"] == "ternary" and node["spec"]["name"] not in seen:
      seen.add(node["spec"]["name"])
      size["ternary_weights"] += node["spec"]["rows"] * node["spec"]["features"]
  files = [f for f in directory.rglob("*") if f.is_file()]
  size["disk_bytes"] = sum(f.stat().st_size for f in files)
  size["orbax_bytes"] = sum(f.stat().st_size for f in files if f.relative_to(directory).parts[0]
                            in (ARRAYS_ITEM, METADATA_ITEM, "_CHECKPOINT_METADATA"))
  size["graph_bytes"] = sum(f.stat().st_size for f in (directory / "graph").rglob("*"))
  size["array_bytes"] = sum(size[f"{r}_bytes"] for r in ("codes", "scales", "bias", "float"))
  size["float32_bytes"] = meta["float32_bytes"]
  weights = size["ternary_weights"]
  bits = lambda *roles: 8 * sum(size[f"{r}_bytes"] for r in roles) / weights if weights else None
  report = dict(size, bits_codes=bits("codes"), bits_with_scales=bits("codes", "scales"),
                bits_with_scales_biases=bits("codes", "scales", "bias"))
  if meta["onnx"]:
    import onnx
    from onnx import numpy_helper
    path = directory / meta["onnx"]["file"]
    report["onnx_bytes"] = path.stat().st_size
    packed = sum(numpy_helper.to_array(i).nbytes for i in onnx.load(path).graph.initializer
                 if meta["arrays"].get(i.name, {}).get("role") in ("codes", "scales"))
    report["onnx_bits_with_scales"] = 8 * packed / weights if weights else None
  return report


def _layer_line(layer: dict) -> str:
  shape = "-" if layer["output_shape"] is None else str(tuple(layer["output_shape"]))
  method = (f"{layer['weights']} / {layer['activations']}" if "weights" in layer else
            f"folded into {layer['folded_into']}" if layer.get("folded_into") else
            "per-channel affine" if layer.get("export") == "affine" else "float")
  macs = "-" if layer["macs"] is None else f"{layer['macs']:,}"
  return f"| {layer['name']} | {layer['kind']} | {shape} | {layer['params']:,} | {macs} | {method} |"


def model_card(meta: dict, size: dict) -> str:
  """A markdown model card: architecture, method, accuracy, size and how to run it."""
  accuracy = "not recorded" if meta["accuracy"] is None else f"{meta['accuracy']:.4f}"
  dataset = meta["extra"].get("dataset", "the training dataset")
  layers = "\n".join(_layer_line(l) for l in meta["layers"])
  classes = ", ".join(meta["classes"][:10]) + (" ..." if len(meta["classes"]) > 10 else "")
  ratio = size["float32_bytes"] / size["disk_bytes"]
  nodes = collections.Counter(n["op"] for n in meta["graph"]["nodes"])
  onnx_line = (f"| model.onnx | {size['onnx_bytes']:,} ({size['onnx_bits_with_scales']:.3f} "
               "bits/weight for codes and scales) |\n" if meta["onnx"] else "")
  return f"""# {meta['model']}: ternjax export

- Method: {meta['method']}
- Test accuracy: {accuracy} ({dataset})
- Input: {meta['input_shape']} without the batch, float32: uint8 pixels / {meta['input_divisor']:g}
- Classes: {len(meta['classes'])} ({classes})
- ternjax {meta['ternjax_version']}, jax {meta['jax_version']}, export format {meta['format_version']}
- Graph: {nodes['ternary']} ternary layers (run through ternjax.ops), {nodes['segment']} float segments (jax.export: {', '.join(meta['platforms'])})

## Layers (in call order; MACs per example)

| layer | type | output | params | MACs | weights / inputs |
|---|---|---|---|---|---|
{layers}

## Size

| | bytes |
|---|---|
| ternary weights | {size['ternary_weights']:,} weights |
| ternary codes | {size['codes_bytes']:,} ({size['bits_codes']:.3f} bits/weight) |
| scales | {size['scales_bytes']:,} ({size['bits_with_scales']:.3f} bits/weight with codes) |
| biases of ternary layers | {size['bias_bytes']:,} |
| float arrays | {size['float_bytes']:,} |
| all arrays | {size['array_bytes']:,} |
| Orbax checkpoint on disk | {size['orbax_bytes']:,} |
{onnx_line}| export directory on disk | {size['disk_bytes']:,} |
| the float32 model | {size['float32_bytes']:,} ({ratio:.1f}x the export on disk) |

## Run

```bash
ternjax-predict export/ --dataset {meta['extra'].get('dataset', 'mnist')}   # or image files; --runtime numpy
```

```python
from ternjax import export
net = export.load("export/", model={meta['model']!r})  # jitted
logits = net(uint8_images / {meta['input_divisor']:g})
```

```python
from ternjax import runtime_numpy  # no JAX: the ONNX graph with onnx.reference (or onnxruntime)
net = runtime_numpy.load("export/")
logits = net(uint8_images / {meta['input_divisor']:g})
```
"""


def package(directory, zip_path, *, overwrite: bool = False) -> Path:
  """Writes a zip of the export (``export/``), ``metadata.json`` and ``MODEL_CARD.md``.

  The export is loaded (and so verified) first; the zip is written atomically.
  """
  directory = Path(directory)
  meta = load(directory).metadata
  card = model_card(meta, size_report(directory))

  def write(tmp: Path) -> None:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
      for f in sorted(directory.rglob("*")):
        if f.is_file():
          z.write(f, str(Path("export") / f.relative_to(directory)))
      z.writestr("metadata.json", json.dumps(meta, indent=1))
      z.writestr("MODEL_CARD.md", card)

  return write_atomic(zip_path, write, overwrite=overwrite)
