"""Operation census of exported inference functions: which primitives each layer runs, by dtype.

Makes the "ternary layers need no multiplications" claim checkable: it traces the jaxpr of an
export's inference function (:meth:`ternjax.export.Inference.jaxpr`), attributes every equation
to a layer through the layer's ``jax.named_scope``, and counts equations and element operations
per primitive class (and, or, popcount, add/sub, mul, div, dot_general, conv) and dtype. A
ternary layer with integer inputs (ternary or int8 activations) passes when it runs no float
dot or convolution and at most 3 float multiplies per output element (the per-channel weight
scales ``αp``/``αn`` and the activation scale in the epilogue); anything more is a violation.
Ternary layers with float inputs (W2A32) and float layers are reported, not judged.

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
from jax.extend import core as jcore

from ternjax import export as ex

CLASSES = {"and": "and", "or": "or", "xor": "xor", "not": "not", "population_count": "popcount",
           "add": "add/sub", "sub": "add/sub", "add_any": "add/sub", "reduce_sum": "add/sub",
           "mul": "mul", "div": "div", "dot_general": "dot_general",
           "conv_general_dilated": "conv", "pallas_call": "kernel",
           "triton_kernel_call": "kernel"}
MULS_PER_OUTPUT = 3  # epilogue: acc·αp − acc_neg·αn, times the activation scale
SCALAR_SLACK = 16    # scalar float multiplies (e.g. threshold·scale of the input quantizer)
_SCOPE = re.compile(r"layer(\d+)_")


def _operations(eqn) -> int:
  """Element operations of an equation: outputs, or multiply-adds for contractions."""
  out = math.prod(eqn.outvars[0].aval.shape)
  name = eqn.primitive.name
  if name == "reduce_sum":
    return math.prod(eqn.invars[0].aval.shape)
  if name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    return out * math.prod(eqn.invars[0].aval.shape[d] for d in contract)
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    return out * math.prod(rhs) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
  return out


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(v, jcore.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jcore.Jaxpr):
        yield v


def _walk(jaxpr, scope: str, visit, times: int = 1) -> None:
  """Visits ``(eqn, scope, times)`` for every equation; a scan body's run ``length`` times."""
  for eqn in jaxpr.eqns:
    where = f"{scope}/{eqn.source_info.name_stack}"
    subs = list(_sub_jaxprs(eqn))
    if eqn.primitive.name in CLASSES or not subs:
      visit(eqn, where, times)
    if eqn.primitive.name not in CLASSES:
      repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
      for sub in subs:
        _walk(sub, where, visit, times * repeat)


def _output_sizes(inference: ex.Inference, batch: int) -> list[int]:
  x = jax.ShapeDtypeStruct((batch, *inference.metadata["input_shape"]), jnp.float32)
  sizes = []
  for i, spec in enumerate(inference.metadata["layers"]):
    fn = ex.LAYERS[spec["kind"]]
    x = jax.eval_shape(lambda p, x: fn(spec, p, x, inference.implementation),
                       inference.params.get(str(i), {}), x)
    sizes.append(math.prod(x.shape))
  return sizes


def verdict(spec: dict, row: dict) -> str:
  """'ok', 'violation: ...', or why the layer is not judged."""
  if not spec["kind"].startswith("ternary"):
    return "float layer" if spec["kind"] in ("linear", "conv", "affine") else "-"
  if spec["activations"] == "none":
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
  layers = inference.metadata["layers"]
  rows = [dict(layer=i, kind=s["kind"], weights=s.get("weights", "-"),
               activations=s.get("activations", "-"), outputs=n,
               ops=collections.defaultdict(lambda: collections.defaultdict(
                   lambda: dict(eqns=0, ops=0))))
          for i, (s, n) in enumerate(zip(layers, _output_sizes(inference, batch)))]
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

  _walk(inference.jaxpr(batch).jaxpr, "", visit)
  for spec, row in zip(layers, rows):
    row["ops"] = {c: dict(d) for c, d in row["ops"].items()}
    row["verdict"] = verdict(spec, row)
  if unattributed:
    rows.append(dict(layer=None, kind="outside layers", ops=dict(unattributed), verdict="-"))
  return rows


def violations(rows: list[dict]) -> list[dict]:
  return [r for r in rows if r["verdict"].startswith("violation")]


def table(name: str, rows: list[dict]) -> str:
  """A fixed-width table: one row per layer and primitive class, ops by dtype."""
  lines = [f"## {name}", "",
           "| layer | kind | weights/act | class | dtype: eqns × ops | verdict |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if r["layer"] is None:
      lines.append(f"| - | {r['kind']} | | | {r['ops']} | |")
      continue
    first = True
    for cls, by_dtype in sorted(r["ops"].items()) or [("-", {})]:
      cells = ", ".join(f"{d}: {v['eqns']}×{v['ops']:,}" for d, v in sorted(by_dtype.items()))
      head = (f"{r['layer']} | {r['kind']} | {r['weights']}/{r['activations']}" if first
              else " | | ")
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
  size_lines = ["## Size", "", "| model | ternary weights | codes B | scales B | biases B | "
                "float layers B | arrays B | disk B | float32 B | bits/w codes | "
                "bits/w +scales | bits/w +scales+biases | x smaller (disk) |",
                "|---|" + "---|" * 12]
  for name, r in report.items():
    s = r["size"]
    size_lines.append(
        f"| {name} | {s['ternary_weights']:,} | {s['code_bytes']:,} | {s['scale_bytes']:,} | "
        f"{s['bias_bytes']:,} | {s['float_layer_bytes']:,} | {s['array_bytes']:,} | "
        f"{s['disk_bytes']:,} | {s['float32_bytes']:,} | {s['bits_codes']:.3f} | "
        f"{s['bits_with_scales']:.3f} | {s['bits_with_scales_biases']:.3f} | "
        f"{s['float32_bytes'] / s['disk_bytes']:.1f} |")
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
