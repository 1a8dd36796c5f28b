"""Exports the CIFAR-10 zoo architectures (random initial weights) and records their export
sizes and times: what a trained model of each will cost in the zoo.

  python experiments/export_cifar.py                              # the zoo's architectures
  python experiments/export_cifar.py --cases resnet20-ttq vit_tiny-twn

Each model is the registered one (bf16 compute, exported as float32); ``ternjax.export.export``
checks the written export with every runtime (JAX, onnxruntime, NumPy) against the model on a
probe batch before it is kept, so each row is also an export-and-agree check on CPU. Writes
experiments/results/export_cifar.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import ternjax as tj
from ternjax import export as tjexport
from ternjax import models

RESULTS = Path(__file__).parent / "results"
CASES = {  # name: (model, QuantConfig options, builder options)
    "resnet20-ttq": ("resnet20", dict(weights="ttq"), {}),
    "resnet20-twn": ("resnet20", dict(weights="twn"), {}),
    "resnet18-twn": ("resnet18", dict(weights="twn"), {}),
    "resnet18-twn-a8": ("resnet18", dict(weights="twn", activations="int8"), {}),  # W2A8
    "mobilenetv2-twn": ("mobilenetv2", dict(weights="twn"), {}),
    "mobilenetv2-twn-fpdw": ("mobilenetv2", dict(weights="twn"), {"fp_depthwise": True}),
    "vit_tiny-twn": ("vit_tiny", dict(weights="twn"), {}),
}
KEYS = ("ternary_weights", "codes_bytes", "scales_bytes", "bits_with_scales", "orbax_bytes",
        "onnx_bytes", "graph_bytes", "disk_bytes", "float32_bytes")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", nargs="+", choices=tuple(CASES),
                 default=[c for c in CASES if not c.startswith("resnet18")])  # the zoo's
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for case in args.cases:
      name, quant, options = CASES[case]
      model = models.CIFAR_MODELS[name](tj.QuantConfig(**quant), dtype=jnp.bfloat16,
                                        rngs=nnx.Rngs(0, quant=1), **options)
      start = time.perf_counter()
      path = tjexport.export(model, Path(tmp) / case, model_name=name, input_shape=(32, 32, 3),
                             classes=10)
      size = tjexport.size_report(path)
      rows.append({"case": case, "export_s": time.perf_counter() - start,
                   **{k: size[k] for k in KEYS}})
      print(json.dumps(rows[-1]), flush=True)
  lines = ["| case | export s | ternary weights | codes B | scales B | bits/weight | Orbax B | "
           "model.onnx B | segments B | directory B | float32 B |", "|---|" + "---|" * 10]
  lines += [f"| {r['case']} | {r['export_s']:.0f} | {r['ternary_weights']:,} | "
            f"{r['codes_bytes']:,} | {r['scales_bytes']:,} | {r['bits_with_scales']:.3f} | "
            f"{r['orbax_bytes']:,} | {r['onnx_bytes']:,} | {r['graph_bytes']:,} | "
            f"{r['disk_bytes']:,} | {r['float32_bytes']:,} |" for r in rows]
  command = "python experiments/export_cifar.py " + " ".join(argv or sys.argv[1:])
  machine = f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
  out = Path(args.out)
  (out / "export_cifar.json").write_text(json.dumps(dict(command=command.strip(),
                                                         machine=machine, rows=rows), indent=1))
  (out / "export_cifar.md").write_text(
      f"# Export sizes of the CIFAR-10 zoo architectures (random weights)\n\nCommand: "
      f"`{command.strip()}`; {machine}; export time includes every runtime's agreement check "
      "(and, for the first case, importing jax2onnx).\n\n" + "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
