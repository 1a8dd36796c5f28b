"""Adds trained exports to the model zoo shipped in the package (ternjax/zoo/models).

  python experiments/build_zoo.py mlp-mnist-twn runs/mlp-export
  python experiments/build_zoo.py resnet20-cifar10-ttq OUT/exports/resnet20-ttq --data-dir D
  python experiments/build_zoo.py --from-batch OUT/zoo_exports.tar.gz --data-dir D  # the GPU's

For each (name, export): the export is loaded (verified) and run on CPU by the JAX runtime on
the whole test split of the dataset it names (``--data-dir``, else ``$TERNJAX_DATA``, ...); the
accuracy measured there, on that exact copy (its SHA-256 and number of examples recorded), is
the entry's accuracy, also on fixed subsets (CIFAR-10: the exact records 0..999 of the shared
copy). The export is copied to ``models/NAME/export``, the copy is loaded and must give the
same logits as the source on the first test batch, then ``card.json``, ``MODEL_CARD.md`` and
the index are written. The command that trained the model is read from the export (recorded by
``mnist.py`` / ``cifar10.py --export``). An existing entry is replaced only with --overwrite;
a zoo over ``ternjax.zoo.SIZE_LIMIT_BYTES`` is refused (the entry is not added).
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import jax
import numpy as np

from ternjax import cli, zoo
from ternjax import data as tjdata
from ternjax import export as tjexport

BATCH = 500
DESCRIPTIONS = {  # by ternjax.models name
    "mlp": "784-256-128-10 MLP, BatchNorm and ReLU after the hidden layers",
    "lenet5": "LeNet-5: conv 5×5 32 → 64 (VALID), max-pool, FC 1024-512-10, BatchNorm",
    "resnet20": "ResNet-20 (He et al.; TTQ's CIFAR network): 16/32/64 channels, option-A "
                "shortcuts, first conv float",
    "mobilenetv2": "MobileNetV2, CIFAR strides: inverted residuals with depthwise 3×3 convs, "
                   "1×1 conv to 1280, first conv float",
    "vit_tiny": "ViT-tiny: 4×4 patches, dim 192, depth 6, 3 heads, MLP 768; patch embedding, "
                "LayerNorms and head float",
}


def _markdown(card: dict, export_card: str) -> str:
  acc = card["accuracy"]
  lines = [f"# {card['name']}", "", f"- Architecture: {card['model']} ({card['description']})",
           f"- Method: {card['method']}", f"- Dataset: {card['dataset']} test split"]
  for subset, r in acc.items():
    copy = r["copy"]
    lines.append(f"- Accuracy ({subset}): {r['accuracy']:.4f} ({r['correct']}/{r['examples']}; "
                 f"copy sha256 {copy['sha256'][:16]}…) by the {card['measured_by']}")
  size = card["size"]
  lines += [f"- Accuracy at training: {card['training_accuracy']}",
            f"- Ternary weights: {size['ternary_weights']:,}, {size['bits_with_scales']:.3f} "
            f"bits/weight with scales; {size['disk_bytes']:,} bytes on disk",
            f"- Trained by: `{card['command']}` on {card['trained_on']}",
            f"- Load: `ternjax.zoo.load({card['name']!r})`, `ternjax-predict --zoo {card['name']}`",
            "", "## The export", "", export_card.split("\n", 1)[1]]
  return "\n".join(lines)


def build(name: str, source: Path, data_dir, description: str, overwrite: bool,
          root: Path = zoo.MODELS_DIR) -> dict:
  """Adds ``source`` (an export directory) to the zoo as ``name``; returns its card."""
  entry = root / name
  if entry.exists() and not overwrite:
    raise zoo.ZooError(f"zoo model {name} exists; pass --overwrite to replace it")
  net = tjexport.load(source)
  meta = net.metadata
  dataset = tjdata.load(meta["extra"].get("dataset", "mnist"), data_dir=data_dir)
  measured = zoo.evaluate(net, dataset, BATCH)
  summary = meta["extra"].get("summary", {})
  card = {"name": name, "model": meta["model"],
          "description": description or DESCRIPTIONS.get(meta["model"], meta["model"]),
          "method": meta["method"], "dataset": dataset.name,
          "input_shape": meta["input_shape"], "classes": meta["classes"],
          "accuracy": measured,
          "measured_by": f"JAX runtime on {jax.default_backend()} (jax {jax.__version__})",
          "training_accuracy": meta["accuracy"],
          "size": tjexport.size_report(source),
          "command": meta["extra"].get("command", "not recorded"),
          "trained_on": f"{summary.get('devices', '?')} × {summary.get('device', '?')}",
          "train_time_s": summary.get("train_time_s"),
          "settings": {k: v for k, v in meta["extra"].items() if k not in ("summary", "command")},
          "onnx": bool(meta["onnx"]),
          "ternjax_version": meta["ternjax_version"], "jax_version": meta["jax_version"],
          "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
  others = sum(f.stat().st_size for e in root.iterdir() if e.is_dir() and e.name != name
               for f in e.rglob("*") if f.is_file()) if root.is_dir() else 0
  if others + card["size"]["disk_bytes"] > zoo.SIZE_LIMIT_BYTES:
    raise zoo.ZooError(f"{name}: {card['size']['disk_bytes']:,} bytes would take the zoo over "
                       f"{zoo.SIZE_LIMIT_BYTES:,} ({others:,} already); ship it as a download")

  def write(tmp: Path) -> None:
    shutil.copytree(source, tmp / "export")
    copy = tjexport.load(tmp / "export")
    x = dataset.x_test[:BATCH].astype(np.float32) / np.float32(meta["input_divisor"])
    if not np.array_equal(np.asarray(copy(x)), np.asarray(net(x))):
      raise zoo.ZooError(f"{name}: the copied export's logits differ from {source}'s")
    card["source_check"] = f"logits identical to the source export's on {len(x)} test images"
    (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (tmp / "MODEL_CARD.md").write_text(_markdown(card, tjexport.model_card(meta, card["size"])))

  root.mkdir(parents=True, exist_ok=True)
  tjexport.write_atomic(entry, write, overwrite=overwrite)
  zoo.write_index(root)
  return card


def main(argv=None) -> int:
  p = cli.Parser(description=__doc__.splitlines()[0])
  p.add_argument("name", nargs="?", help="the entry's name, e.g. resnet20-cifar10-ttq")
  p.add_argument("export", nargs="?", type=Path, help="the export directory")
  p.add_argument("--from-batch", type=Path, metavar="TAR",
                 help="every export of a cifar10_batch.py plan (zoo_exports.tar.gz: NAME/ "
                 "folders, each an export, and zoo_entries.json: the names)")
  p.add_argument("--description", default="",
                 help="one line on the architecture (default: the model's, DESCRIPTIONS)")
  p.add_argument("--data-dir", type=cli.existing_dir)
  p.add_argument("--overwrite", action="store_true", help="replace existing entries")
  p.add_argument("--root", type=Path, default=zoo.MODELS_DIR, help="the zoo's models folder")
  args = p.parse_args(argv)
  if (args.from_batch is None) == (args.name is None or args.export is None):
    p.error("give NAME EXPORT_DIR, or --from-batch TAR")
  with cli.errors(p), tempfile.TemporaryDirectory() as tmp:
    if args.from_batch:
      with tarfile.open(args.from_batch) as tar:
        tar.extractall(tmp, filter="data")
      names = json.loads((Path(tmp) / "zoo_entries.json").read_text())
      todo = [(name, Path(tmp) / name, args.description) for name in names]
    else:
      todo = [(args.name, args.export, args.description)]
    for name, source, description in todo:
      card = build(name, source, args.data_dir, description, args.overwrite, args.root)
      r = card["accuracy"]["test"]
      print(f"{name}: {r['accuracy']:.4f} ({r['correct']}/{r['examples']}) on {card['dataset']}, "
            f"{card['size']['disk_bytes']:,} bytes, {card['size']['bits_with_scales']:.3f} "
            "bits/weight", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
