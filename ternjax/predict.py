"""``ternjax-predict``: runs an export on a dataset split, prints accuracy and throughput.

    ternjax-predict EXPORT_DIR [--dataset mnist] [--split test] [--runtime jax|numpy]

Images are read with :mod:`ternjax.data` (``--data-dir``, else ``$TERNJAX_DATA``, else
``~/.cache/ternjax``) and divided by the export's ``input_divisor``. Throughput counts the
batches after the first (which includes JIT compilation) and is wall-clock time of this process
on its device. Errors (a bad export, missing data) are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _batches(x: np.ndarray, size: int):
  """Fixed-size batches (the last one zero-padded, so one compiled shape) and their lengths."""
  for start in range(0, len(x), size):
    chunk = x[start:start + size]
    n = len(chunk)
    if n < size:
      chunk = np.concatenate([chunk, np.zeros((size - n, *x.shape[1:]), x.dtype)])
    yield chunk, n


def run(net, images: np.ndarray, labels: np.ndarray, divisor: float, batch_size: int) -> dict:
  """Accuracy and throughput of ``net`` (images -> logits) on uint8 ``images``."""
  predictions, times = [], []
  for chunk, n in _batches(images, batch_size):
    start = time.perf_counter()
    logits = np.asarray(net(chunk.astype(np.float32) / np.float32(divisor)))
    times.append((time.perf_counter() - start, n))
    predictions.append(logits[:n].argmax(-1))
  predictions = np.concatenate(predictions)
  timed = times[1:] or times
  seconds = sum(t for t, _ in timed)
  return dict(accuracy=float(np.mean(predictions == labels)),
              correct=int(np.sum(predictions == labels)), examples=len(labels),
              images_per_s=sum(n for _, n in timed) / seconds, first_batch_s=times[0][0],
              batches_timed=len(timed))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="ternjax-predict", description=__doc__.splitlines()[0])
  p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")
  p.add_argument("export", help="export directory (ternjax.export)")
  p.add_argument("--dataset", help="mnist, fashion_mnist, cifar10 (default: the export's)")
  p.add_argument("--split", choices=("test", "train"), default="test")
  p.add_argument("--source", choices=("files", "tfds"), default="files")
  p.add_argument("--data-dir", help="data root (else $TERNJAX_DATA, else ~/.cache/ternjax)")
  p.add_argument("--runtime", choices=("jax", "numpy"), default="jax")
  p.add_argument("--implementation", help="ternary op implementation(s) for the jax runtime")
  p.add_argument("--model", help="refuse the export unless it holds this model")
  p.add_argument("--batch-size", type=int, default=1000)
  p.add_argument("--limit", type=int, help="only the first N examples")
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  args = p.parse_args(argv)
  if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
    p.error("--batch-size and --limit must be positive")

  from ternjax import data as tjdata
  from ternjax import runtime_numpy
  try:
    if args.runtime == "numpy":
      net = runtime_numpy.load(args.export, model=args.model)
      meta, device = net.metadata, "cpu"
    else:
      import jax

      from ternjax import export
      net = export.load(args.export, model=args.model, implementation=args.implementation)
      meta, device = net.metadata, f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    name = args.dataset or meta["extra"].get("dataset", "mnist")
    data = tjdata.load(name, source=args.source, data_dir=args.data_dir)
  except (runtime_numpy.ExportError, tjdata.DataError, ValueError) as err:
    p.error(str(err))
  images, labels = (data.x_test, data.y_test) if args.split == "test" else \
      (data.x_train, data.y_train)
  if tuple(images.shape[1:]) != tuple(meta["input_shape"]):
    p.error(f"{name} images are {images.shape[1:]}, the export takes {meta['input_shape']}")
  images, labels = images[:args.limit], labels[:args.limit]
  try:
    result = run(net, images, labels, meta["input_divisor"], args.batch_size)
  except (ValueError, NotImplementedError) as err:  # e.g. an unknown --implementation
    p.error(str(err).splitlines()[0])
  result.update(model=meta["model"], method=meta["method"], dataset=name, split=args.split,
                runtime=args.runtime, device=device, batch_size=args.batch_size)
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print(f"{meta['model']} ({meta['method']}) on {name} {args.split}: accuracy "
          f"{result['accuracy']:.4f} ({result['correct']}/{result['examples']}); "
          f"{result['images_per_s']:,.0f} images/s ({args.runtime} on {device}, batch "
          f"{args.batch_size}; the first batch, {result['first_batch_s']:.2f} s with any "
          f"compilation, not counted)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
