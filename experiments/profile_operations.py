"""Operation census of exported inference functions: which primitives each layer runs, by dtype.

Makes the "ternary layers need no multiplications" claim checkable: it traces the jaxpr of an
export's inference function (:meth:`ternjax.export.Inference.jaxpr`), attributes every equation
to a node of the export's graph through the node's ``jax.named_scope``, and counts equations
and element operations per primitive class (and, or, popcount, add/sub, mul, div, dot_general,
conv) and dtype. A ternary layer with integer inputs (ternary or int8 activations) passes when
it runs no float dot or convolution and at most 3 float multiplies per output element (the
per-channel weight scales ``αp``/``αn`` and the activation scale in the epilogue); anything
more is a violation. Ternary layers with float inputs (W2A32) are reported, not judged; float
segments (the model's float code, serialized StableHLO: one ``call_exported`` each) are listed.

Usage::

  python experiments/profile_operations.py                   # the reference models, untrained
  python experiments/profile_operations.py --export DIR ...  # given exports

Writes a table to stdout and ``experiments/results/profile_operations.{json,md}`` (also a size
table: bytes on disk vs float32). Exit status 1 if a layer violates the claim.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from ternjax import export as ex
from ternjax import tracing

CLASSES = {"and": "and", "or": "or", "xor": "xor", "not": "not", "population_count": "popcount",
           "add": "add/sub", "sub": "add/sub", "add_any": "add/sub", "reduce_sum": "add/sub",
           "mul": "mul", "div": "div", "dot_general": "dot_general",
           "conv_general_dilated": "conv", "pallas_call": "kernel",
           "triton_kernel_call": "kernel", "call_exported": "segment"}
MULS_PER_OUTPUT = 3  # epilogue: acc·αp − acc_neg·αn, times the activation scale
SCALAR_SLACK = 16    # scalar float multiplies (e.g. threshold·scale of the input quantizer)
_SCOPE = re.compile(r"node(\d+)_")


def _operations(eqn) -> int:
  """Element operations of an equation: outputs, or multiply-adds for contractions."""
  if eqn.primitive.name == "reduce_sum":
    return math.prod(eqn.invars[0].aval.shape)
  return tracing.contraction_macs(eqn) or math.prod(eqn.outvars[0].aval.shape) \
      if eqn.outvars else 0


def _output_sizes(inference: ex.Inference, batch: int) -> list[int]:
  sizes = {}
  x = jax.ShapeDtypeStruct((batch, *inference.metadata["input_shape"]), jnp.float32)
  record = lambda i, outs: sizes.setdefault(i, sum(math.prod(o.shape) for o in outs))
  jax.eval_shape(lambda p, x: inference.function(p, x, record=record), inference.params, x)
  return [sizes[i] for i in range(len(sizes))]


def verdict(layer: dict | None, row: dict) -> str:
  """'ok', 'violation: ...', or why the node is not judged."""
  if layer is None:
    return "float segment"
  if layer["activations"] == "none":
    return "not judged: float inputs (W2A32 contracts floats with ±1/0)"
  float_ops = lambda cls: sum(n["ops"] for d, n in row["ops"].get(cls, {}).items()
                              if d.startswith(("float", "bfloat")))
  problems = [f"{float_ops(c):,} float {c} ops" for c in ("dot_general", "conv") if float_ops(c)]
  allowed = MULS_PER_OUTPUT * row["outputs"] + SCALAR_SLACK
  if float_ops("mul") > allowed:
    problems.append(f"{float_ops('mul'):,} float multiplies > {allowed:,} (scaling only)")
  return "violation: " + "; ".join(problems) if problems else "ok"


def census(inference: ex.Inference, batch: int = 8) -> list[dict]:
  """Per layer: kind, method, outputs, and ``ops[class][dtype] = {eqns, ops}``; plus verdicts."""
  by_name = {l["name"]: l for l in inference.metadata["layers"]}
  layers = [by_name[n["spec"]["name"]] if n["op"] == "ternary" else None
            for n in inference.metadata["graph"]["nodes"]]
  rows = [dict(layer=i, kind=ex.node_scope(i, node).split("_", 1)[1],
               name=node["spec"]["name"] if node["op"] == "ternary" else "",
               weights=l["weights"] if l else "-", activations=l["activations"] if l else "-",
               outputs=n, ops=collections.defaultdict(lambda: collections.defaultdict(
                   lambda: dict(eqns=0, ops=0))))
          for i, (node, l, n) in enumerate(zip(inference.metadata["graph"]["nodes"], layers,
                                               _output_sizes(inference, batch)))]
  unattributed = collections.Counter()

  def visit(eqn, where, times):
    cls = CLASSES.get(eqn.primitive.name)
    if cls is None:
      return
    match = _SCOPE.search(where)
    if match is None:
      unattributed[eqn.primitive.name] += 1
      return
    dtype = str(eqn.invars[0].aval.dtype)
    entry = rows[int(match.group(1))]["ops"][cls][dtype]
    entry["eqns"] += times
    entry["ops"] += times * _operations(eqn)

  tracing.walk(inference.jaxpr(batch).jaxpr, visit, stop=lambda e: e.primitive.name in CLASSES)
  for layer, row in zip(layers, rows):
    row["ops"] = {c: dict(d) for c, d in row["ops"].items()}
    row["verdict"] = verdict(layer, row)
  if unattributed:
    rows.append(dict(layer=None, kind="outside layers", ops=dict(unattributed), verdict="-"))
  return rows


def violations(rows: list[dict]) -> list[dict]:
  return [r for r in rows if r["verdict"].startswith("violation")]


def table(name: str, rows: list[dict]) -> str:
  """A fixed-width table: one row per layer and primitive class, ops by dtype."""
  lines = [f"## {name}", "",
           "| node | kind | weights/act | class | dtype: eqns × ops | verdict |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if r["layer"] is None:
      lines.append(f"| - | {r['kind']} | | | {r['ops']} | |")
      continue
    first = True
    for cls, by_dtype in sorted(r["ops"].items()) or [("-", {})]:
      cells = ", ".join(f"{d}: {v['eqns']}×{v['ops']:,}" for d, v in sorted(by_dtype.items()))
      head = (f"{r['layer']} | {r['kind']} {r['name']} | {r['weights']}/{r['activations']}"
              if first else " | | ")
      lines.append(f"| {head} | {cls} | {cells} | {r['verdict'] if first else ''} |")
      first = False
  return "\n".join(lines)


def _reference_exports(workdir: Path) -> list[Path]:
  """The reference models, untrained (the census depends on the structure only)."""
  from flax import nnx

  import ternjax as tj
  from ternjax.models import MODELS
  variants = [("mlp", tj.QuantConfig(weights="twn")),
              ("lenet5", tj.QuantConfig(weights="ttq", activations="int8")),
              ("ternary_cnn", tj.QuantConfig(weights="twn"))]
  paths = []
  for name, cfg in variants:
    model = MODELS[name](cfg, rngs=nnx.Rngs(0))
    paths.append(ex.export(model, workdir / name, model_name=name, input_shape=(28, 28, 1),
                           classes=10))
  return paths


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--export", nargs="*", default=None, help="export directories")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    paths = [Path(p) for p in args.export] if args.export else _reference_exports(Path(tmp))
    report, texts = {}, []
    for path in paths:
      try:
        inference = ex.load(path)
      except ex.ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
      rows = census(inference, args.batch)
      name = f"{inference.metadata['model']} ({inference.metadata['method']})"
      report[name] = dict(census=rows, size=ex.size_report(path), backend=jax.default_backend(),
                          batch=args.batch)
      texts.append(table(name, rows))
  size_lines = ["## Size", "", ("| model | ternary weights | codes B | scales B | biases B | "
                                "float arrays B | arrays B | Orbax disk B | ONNX file B | "
                                "float32 B | bits/w codes | bits/w +scales | "
                                "bits/w +scales+biases | ONNX bits/w +scales |"),
                "|---|" + "---|" * 13]
  for name, r in report.items():
    s = r["size"]
    size_lines.append(
        f"| {name} | {s['ternary_weights']:,} | {s['codes_bytes']:,} | {s['scales_bytes']:,} | "
        f"{s['bias_bytes']:,} | {s['float_bytes']:,} | {s['array_bytes']:,} | "
        f"{s['orbax_bytes']:,} | {s.get('onnx_bytes', 0):,} | {s['float32_bytes']:,} | "
        f"{s['bits_codes']:.3f} | {s['bits_with_scales']:.3f} | "
        f"{s['bits_with_scales_biases']:.3f} | "
        f"{s.get('onnx_bits_with_scales', float('nan')):.3f} |")
  text = "\n\n".join(texts + ["\n".join(size_lines)])
  print(text)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "profile_operations.json").write_text(json.dumps(report, indent=1))
  command = "python experiments/profile_operations.py " + " ".join(argv or sys.argv[1:])
  (out / "profile_operations.md").write_text(
      f"# Operation census and export size\n\nCommand: `{command.strip()}`; backend "
      f"{jax.default_backend()}, jax {jax.__version__}, batch {args.batch}.\n\n{text}\n")
  bad = [(n, r["layer"]) for n, rep in report.items() for r in violations(rep["census"])]
  if bad:
    print(f"violations: {bad}", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
