"""Inference export: a packed Orbax checkpoint, BatchNorm folded, run by a jitted function.

``export(model, dir, ...)`` writes an ``nnx.Sequential`` of the :mod:`ternjax.models`
vocabulary as an Orbax checkpoint holding only what inference needs; ``load(dir)`` returns a
jitted function of the export alone (no float shadow weights) that runs the ternary layers
through :func:`ternjax.ops.ternary_matmul` / :func:`~ternjax.ops.ternary_conv`, so it uses the
GPU kernels where registered and the XLA implementation elsewhere.

Format (version 1), two Orbax items:

* ``metadata/``: JSON: ``format_version``, ``ternjax_version``, ``model``, ``method``,
  ``input_shape``, ``classes``, ``accuracy``, ``input_divisor``, ``float32_bytes`` (the
  trained model's parameters and batch statistics as float32), ``extra``, and ``layers``, one
  dict per layer with its kind, geometry and its arrays' shape, dtype and SHA-256;
* ``arrays/``: per layer with parameters (keyed by its index in ``layers``):

  ============================  =================================================================
  kind                          arrays
  ============================  =================================================================
  ``ternary_linear``,           ``codes`` uint8 ``(⌈K/4⌉, N)``: 2-bit codes of the ``(K, N)``
  ``ternary_conv``              weight matrix along K (:func:`~ternjax.packing.pack_codes`; conv:
                                :func:`~ternjax.ops.kernel_to_matrix`), ``scale_pos`` ``(N,)``,
                                ``scale_neg`` ``(N,)`` (TTQ only), ``bias`` ``(N,)``,
                                ``act_scale`` ``()`` (ternary inputs)
  ``linear``, ``conv``          float ``kernel``, ``bias``, ``act_scale`` (ternary inputs)
  ``affine``                    ``scale``, ``shift``: a BatchNorm after no linear or conv layer
  ``relu``, ``max_pool``,       none (dropout is dropped: identity in eval mode)
  ``flatten``
  ============================  =================================================================

BatchNorm folding (eval mode, running statistics): a BatchNorm right after a linear or conv
layer computes ``γ·(y − μ)/σ + β`` with ``σ = √(var + ε)`` on ``y = s·acc + b``; with
``g = γ/σ`` that is ``(g·s)·acc + (g·(b − μ) + β)``, so the per-channel scales (both ``αp``
and ``αn`` for TTQ) and the bias absorb it; a float kernel's columns are multiplied by ``g``.
This is exact math whatever follows (ReLU, pooling, or the next layer's activation quantizer,
which then sees the same values up to float rounding).

Saving is atomic: Orbax writes into a hidden temporary directory beside the target, which is
renamed into place only when complete; an existing export is replaced only with
``overwrite=True`` (renamed aside, then deleted once the new one is in place).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
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
from jax import lax

import ternjax
from ternjax import ops, packing, quantizers
from ternjax.layers import TernaryOperands
from ternjax.models import Flatten, MaxPool, ReLU
from ternjax.runtime_numpy import (ARRAYS_ITEM, FORMAT_VERSION, METADATA_ITEM, ExportError,
                                   check_arrays, read_metadata, sha256, unreadable_arrays)

__all__ = ["ExportError", "FORMAT_VERSION", "Inference", "export", "forward", "load",
           "model_card", "package", "size_report"]


# --------------------------------------------------------------------------------------------
# Model -> layer specs and arrays


def _tuple(v, n: int) -> list[int]:
  return [int(v)] * n if isinstance(v, int) else [int(a) for a in v]


def _conv_geometry(layer: nnx.Conv) -> dict:
  nd = len(layer.kernel_size)
  padding = layer.padding
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      raise ExportError(f"conv padding {padding!r} is not exportable (SAME, VALID or pairs)")
  else:
    pads = [padding] * nd if isinstance(padding, int) else list(padding)
    padding = [[int(p)] * 2 if isinstance(p, int) else [int(a) for a in p] for p in pads]
  if layer.feature_group_count != 1 or _tuple(layer.input_dilation or 1, nd) != [1] * nd \
      or layer.mask is not None:
    raise ExportError("grouped, input-dilated or masked convolutions are not exportable")
  return dict(window=list(layer.kernel_size), strides=_tuple(layer.strides or 1, nd),
              padding=padding, dilation=_tuple(layer.kernel_dilation or 1, nd))


def _batchnorm_affine(bn: nnx.BatchNorm | None, n: int):
  """``(gain, shift)`` with ``bn(y) = gain·y + shift`` in eval mode (identity for None)."""
  if bn is None:
    return jnp.ones(n, jnp.float32), jnp.zeros(n, jnp.float32)
  if bn.axis not in (-1,) or bn.num_features != n:
    raise ExportError(f"BatchNorm over axis {bn.axis} with {bn.num_features} features cannot "
                      f"follow a layer of {n} output channels")
  gain = lax.rsqrt(bn.var[...] + bn.epsilon)
  if bn.use_scale:
    gain = gain * bn.scale[...]
  shift = -bn.mean[...] * gain + (bn.bias[...] if bn.use_bias else 0)
  return gain, shift


def _dense(layer: nnx.Linear | nnx.Conv, bn: nnx.BatchNorm | None):
  """Spec and arrays of a linear or conv layer, with the BatchNorm after it (or None) folded."""
  kernel = layer.kernel[...]
  n = kernel.shape[-1]
  conv = isinstance(layer, nnx.Conv)
  quant = getattr(layer, "quant", None)
  config = quant.config if isinstance(quant, TernaryOperands) else None
  ternary = config is not None and config.ternary_weights
  spec = dict(kind=("ternary_" if ternary else "") + ("conv" if conv else "linear"),
              weights=config.weights if config else "fp",
              activations=config.activations if config else "none",
              act_threshold=config.act_threshold if config else None,
              rows=math.prod(kernel.shape[:-1]), features=[int(kernel.shape[-2]), n])
  if conv:
    spec.update(_conv_geometry(layer))
  gain, shift = _batchnorm_affine(bn, n)
  bias = layer.bias[...] if layer.use_bias else jnp.zeros(n, jnp.float32)
  arrays = {"bias": gain * bias + shift}
  if ternary:
    t, scale_pos, scale_neg = quant.weight_codes(kernel)
    arrays["codes"] = packing.pack_codes(ops.kernel_to_matrix(t) if conv else t, axis=0)
    arrays["scale_pos"] = gain * scale_pos
    if scale_neg is not None:
      arrays["scale_neg"] = gain * scale_neg
  else:
    arrays["kernel"] = kernel * gain
  if spec["activations"] == "ternary":
    arrays["act_scale"] = quant.act_scale[...]
  return spec, arrays


def convert(model: nnx.Sequential) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
  """The export's layer specs and arrays (float32 / uint8 NumPy) of an ``nnx.Sequential``."""
  if not isinstance(model, nnx.Sequential):
    raise ExportError(f"export needs an nnx.Sequential of ternjax.models' layer vocabulary, "
                      f"got {type(model).__name__}")
  layers, specs, arrays, i = list(model.layers), [], {}, 0
  while i < len(layers):
    layer = layers[i]
    follower = layers[i + 1] if i + 1 < len(layers) else None
    arr = {}
    if isinstance(layer, (nnx.Linear, nnx.Conv)):
      bn = follower if isinstance(follower, nnx.BatchNorm) else None
      spec, arr = _dense(layer, bn)
      i += bn is not None
    elif isinstance(layer, nnx.BatchNorm):
      spec = dict(kind="affine")
      arr = dict(zip(("scale", "shift"), _batchnorm_affine(layer, layer.num_features)))
    elif isinstance(layer, ReLU):
      spec = dict(kind="relu")
    elif isinstance(layer, Flatten):
      spec = dict(kind="flatten")
    elif isinstance(layer, MaxPool):
      spec = dict(kind="max_pool", window=[layer.window] * 2, strides=[layer.strides] * 2)
    elif isinstance(layer, nnx.Dropout):
      spec = None
    else:
      raise ExportError(f"layer {i} ({type(layer).__name__}) is not in the export vocabulary "
                        "(see ternjax.models)")
    i += 1
    if spec is None:
      continue
    if arr:
      arrays[str(len(specs))] = {k: np.asarray(v) for k, v in arr.items()}
      spec["arrays"] = {k: dict(shape=list(v.shape), dtype=str(v.dtype), sha256=sha256(v))
                        for k, v in arrays[str(len(specs))].items()}
    specs.append(spec)
  return specs, arrays


# --------------------------------------------------------------------------------------------
# Inference function


def _spatial(n: int) -> str:
  return "HWD"[:n]


def _dense_forward(spec, p, x, implementation):
  x, x_scale = quantizers.activation_codes(spec["activations"], x, p.get("act_scale"),
                                           spec["act_threshold"])
  conv = spec["kind"] in ("conv", "ternary_conv")
  padding = spec.get("padding")
  padding = padding if isinstance(padding, str) else tuple(map(tuple, padding or ()))
  if "w" in p:  # ternary weights: integer contraction, scales in the epilogue
    kwargs = dict(x_ternary=spec["activations"] == "ternary", x_scale=x_scale,
                  w_scale=p["scale_pos"], w_scale_neg=p.get("scale_neg"),
                  implementation=implementation)
    if conv:
      out = ops.ternary_conv(x, p["w"], window=spec["window"], strides=spec["strides"],
                             padding=padding, rhs_dilation=spec["dilation"], **kwargs)
    else:
      out = ops.ternary_matmul(x, p["w"], **kwargs)
    return out + p["bias"]
  if x_scale is not None:  # float weights on quantized inputs, as in training
    x = x_scale * x.astype(jnp.float32)
  if conv:
    sp = _spatial(len(spec["window"]))
    out = lax.conv_general_dilated(x, p["kernel"], spec["strides"], padding,
                                   rhs_dilation=spec["dilation"],
                                   dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"))
  else:
    out = lax.dot_general(x, p["kernel"], (((x.ndim - 1,), (0,)), ((), ())))
  return out + p["bias"]


def _max_pool(spec, p, x, implementation):
  del p, implementation
  window = (1, *spec["window"], 1)
  return lax.reduce_window(x, -jnp.inf, lax.max, window, (1, *spec["strides"], 1), "VALID")


LAYERS: dict[str, Callable] = {
    "ternary_linear": _dense_forward, "ternary_conv": _dense_forward,
    "linear": _dense_forward, "conv": _dense_forward,
    "affine": lambda spec, p, x, impl: x * p["scale"] + p["shift"],
    "relu": lambda spec, p, x, impl: jnp.maximum(x, 0),
    "flatten": lambda spec, p, x, impl: x.reshape(x.shape[0], -1),
    "max_pool": _max_pool,
}


def layer_scope(index: int, spec: dict) -> str:
  """The ``jax.named_scope`` of layer ``index`` (the operation census reads it)."""
  return f"layer{index:02d}_{spec['kind']}"


def forward(layers: Sequence[dict], params: dict, images: jax.Array, *,
            implementation=None) -> jax.Array:
  """Logits of NHWC ``images``: the export's layers in order, each in its own named scope."""
  x = jnp.asarray(images, jnp.float32)
  for i, spec in enumerate(layers):
    with jax.named_scope(layer_scope(i, spec)):
      x = LAYERS[spec["kind"]](spec, params.get(str(i), {}), x, implementation)
  return x


def inference_params(layers: Sequence[dict], arrays: dict) -> dict:
  """Device arrays of the export; ternary codes become bitplanes (still 2 bits per weight)."""
  params = {}
  for key, arr in arrays.items():
    p = {k: jnp.asarray(v) for k, v in arr.items() if k != "codes"}
    if "codes" in arr:
      p["w"] = packing.bitplanes_from_codes(jnp.asarray(arr["codes"]), layers[int(key)]["rows"], 0)
    params[key] = p
  return params


@dataclasses.dataclass(frozen=True)
class Inference:
  """A loaded export: ``inference(images) -> logits``; ``metadata`` is the export's JSON."""

  metadata: dict
  params: dict
  implementation: str | Sequence[str] | None = None

  @functools.cached_property
  def _jitted(self):
    return jax.jit(functools.partial(forward, self.metadata["layers"],
                                     implementation=self.implementation))

  def __call__(self, images) -> jax.Array:
    return self._jitted(self.params, images)

  def jaxpr(self, batch: int = 1) -> jax.core.ClosedJaxpr:
    """The inference function's jaxpr for ``batch`` images (for the operation census)."""
    x = jnp.zeros((batch, *self.metadata["input_shape"]), jnp.float32)
    fn = functools.partial(forward, self.metadata["layers"], implementation=self.implementation)
    return jax.make_jaxpr(fn)(self.params, x)


# --------------------------------------------------------------------------------------------
# Save and load


def _float32_bytes(model: nnx.Module) -> int:
  """Bytes of the model's parameters and batch statistics as float32 (the baseline size)."""
  state = nnx.state(model, nnx.Param, nnx.BatchStat)
  return 4 * sum(int(np.size(v)) for v in jax.tree.leaves(state))


def _method(specs: list[dict]) -> str:
  weights = sorted({s["weights"] for s in specs if s["kind"].startswith("ternary")}) or ["fp"]
  acts = sorted({s["activations"] for s in specs if s.get("activations", "none") != "none"})
  return "/".join(weights) + (f" weights, {'/'.join(acts)} activations" if acts else " weights")


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
    ckptr.save(path, ocp.args.Composite(**{ARRAYS_ITEM: ocp.args.PyTreeSave(arrays),
                                           METADATA_ITEM: ocp.args.JsonSave(meta)}))


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


def export(model: nnx.Sequential, directory, *, model_name: str, input_shape: Sequence[int],
           classes: int | Sequence[str], method: str | None = None,
           accuracy: float | None = None, input_divisor: float = 255.0,
           extra: dict | None = None, overwrite: bool = False) -> Path:
  """Writes ``model`` (eval mode: running statistics) as an inference export; returns its path.

  Args:
    model: an ``nnx.Sequential`` of the :mod:`ternjax.models` layer vocabulary.
    directory: the export directory; must not exist unless ``overwrite``.
    model_name: the architecture's name (``load(dir, model=...)`` checks it).
    input_shape: one input's shape, NHWC without the batch, e.g. ``(28, 28, 1)``.
    classes: the number of classes or their names; must match the model's output size.
    method: a description of the quantization (default: derived from the layers).
    accuracy: the test accuracy to record, if measured.
    input_divisor: the model's input is ``uint8 images / input_divisor`` (as
      :func:`ternjax.train.preprocess`); ``ternjax-predict`` applies it.
    extra: more JSON metadata (dataset, preprocessing, training config, ...).
  """
  specs, arrays = convert(model)
  classes = [str(c) for c in (range(classes) if isinstance(classes, int) else classes)]
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  try:
    out = jax.eval_shape(functools.partial(forward, specs), inference_params(specs, arrays), x)
  except (TypeError, ValueError) as err:
    raise ExportError(f"input shape {tuple(input_shape)} does not fit the model: "
                      f"{str(err).splitlines()[0]}") from None
  if out.shape != (1, len(classes)):
    raise ExportError(f"the model outputs {out.shape[1:]} for input {tuple(input_shape)}, "
                      f"expected {len(classes)} class logits")
  meta = dict(format_version=FORMAT_VERSION, ternjax_version=ternjax.__version__,
              model=model_name, method=method or _method(specs),
              input_shape=[int(d) for d in input_shape], classes=classes,
              accuracy=None if accuracy is None else float(accuracy),
              input_divisor=float(input_divisor),
              float32_bytes=_float32_bytes(model), extra=extra or {}, layers=specs)
  return write_atomic(directory, lambda tmp: _save_checkpoint(tmp, arrays, meta),
                      overwrite=overwrite)


def _restore_arrays(directory: Path, meta: dict) -> dict:
  restore_args = {str(i): {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in spec["arrays"]}
                  for i, spec in enumerate(meta["layers"]) if spec.get("arrays")}
  try:
    with _checkpointer() as ckptr:
      restored = ckptr.restore(directory.absolute(), ocp.args.Composite(**{
          ARRAYS_ITEM: ocp.args.PyTreeRestore(restore_args=restore_args)}))
    arrays = restored[ARRAYS_ITEM]
  except Exception as err:  # Orbax / TensorStore raise many types; one line says what failed.
    raise unreadable_arrays(directory, err) from err
  check_arrays(arrays, meta, directory)
  return arrays


def load(directory, *, model: str | None = None, implementation=None) -> Inference:
  """Loads an export as a jitted inference function (:class:`Inference`).

  ``model`` checks the architecture's name; ``implementation`` selects the ternary op
  implementation (default: the dispatch's, see :mod:`ternjax.ops`). Raises
  :class:`ExportError` for a missing, truncated or corrupted export, another format version
  or another model.
  """
  directory = Path(directory)
  meta = read_metadata(directory, model)
  arrays = _restore_arrays(directory, meta)
  return Inference(meta, inference_params(meta["layers"], arrays), implementation)


# --------------------------------------------------------------------------------------------
# Size


def size_report(directory) -> dict:
  """Bytes of an export: arrays by role, files on disk, and bits per ternary weight.

  Array sizes are the stored arrays' raw bytes (codes; scales ``scale_pos``, ``scale_neg``,
  ``act_scale``; biases of ternary layers; float layers' arrays). ``disk_bytes`` counts every
  file of the export directory: Orbax and OCDBT metadata, and zstd-compressed array chunks.
  """
  directory = Path(directory)
  meta = read_metadata(directory)
  size = collections.Counter()
  for spec in meta["layers"]:
    nbytes = {k: math.prod(v["shape"]) * np.dtype(v["dtype"]).itemsize
              for k, v in spec.get("arrays", {}).items()}
    if "codes" in nbytes:
      size["ternary_weights"] += spec["rows"] * spec["features"][1]
      size["code_bytes"] += nbytes.pop("codes")
      size["bias_bytes"] += nbytes.pop("bias")
      size["scale_bytes"] += sum(nbytes.values())
    else:
      size["float_layer_bytes"] += sum(nbytes.values())
  size["array_bytes"] = sum(size[k] for k in ("code_bytes", "scale_bytes", "bias_bytes",
                                              "float_layer_bytes"))
  size["disk_bytes"] = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
  size["float32_bytes"] = meta["float32_bytes"]
  bits = lambda *keys: 8 * sum(size[k] for k in keys) / max(size["ternary_weights"], 1)
  return dict(size, bits_codes=bits("code_bytes"),
              bits_with_scales=bits("code_bytes", "scale_bytes"),
              bits_with_scales_biases=bits("code_bytes", "scale_bytes", "bias_bytes"))


# --------------------------------------------------------------------------------------------
# Packaging


def _layer_line(i: int, spec: dict) -> str:
  if spec["kind"] in ("max_pool",):
    shape = f"{spec['window']} stride {spec['strides']}"
  elif "features" in spec:
    shape = " × ".join(map(str, spec.get("window", []) + spec["features"]))
  else:
    shape = ""
  method = (f"{spec['weights']} / {spec['activations']}" if "weights" in spec else "")
  return f"| {i} | {spec['kind']} | {shape} | {method} |"


def model_card(meta: dict, size: dict) -> str:
  """A markdown model card: architecture, method, accuracy, size and how to run it."""
  accuracy = "not recorded" if meta["accuracy"] is None else f"{meta['accuracy']:.4f}"
  dataset = meta["extra"].get("dataset", "the training dataset")
  layers = "\n".join(_layer_line(i, s) for i, s in enumerate(meta["layers"]))
  classes = ", ".join(meta["classes"][:10]) + (" ..." if len(meta["classes"]) > 10 else "")
  ratio = size["float32_bytes"] / size["disk_bytes"]
  return f"""# {meta['model']}: ternjax export

- Method: {meta['method']}
- Test accuracy: {accuracy} ({dataset})
- Input: {meta['input_shape']} (NHWC without batch), uint8 pixels / {meta['input_divisor']:g}
- Classes: {len(meta['classes'])} ({classes})
- ternjax {meta['ternjax_version']}, export format {meta['format_version']}

## Architecture (BatchNorm folded into the preceding layer)

| # | layer | shape (window × in × out) | weights / inputs |
|---|---|---|---|
{layers}

## Size

| | bytes |
|---|---|
| ternary weights | {size['ternary_weights']:,} weights |
| 2-bit codes | {size['code_bytes']:,} ({size['bits_codes']:.3f} bits/weight) |
| scales | {size['scale_bytes']:,} ({size['bits_with_scales']:.3f} bits/weight with codes) |
| biases of ternary layers | {size['bias_bytes']:,} |
| float layers | {size['float_layer_bytes']:,} |
| all arrays | {size['array_bytes']:,} |
| export directory on disk | {size['disk_bytes']:,} |
| the float32 model | {size['float32_bytes']:,} ({ratio:.1f}x the export on disk) |

## Run

```bash
ternjax-predict export/ --dataset {meta['extra'].get('dataset', 'mnist')}
```

```python
from ternjax import export
net = export.load("export/", model={meta['model']!r})  # jitted
logits = net(uint8_images / {meta['input_divisor']:g})
```

```python
from ternjax import runtime_numpy  # a single file needing only NumPy and TensorStore
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
