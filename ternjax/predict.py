"""``ternjax-predict``: runs an export on image files, or on a dataset split (accuracy, speed).

    ternjax-predict EXPORT_DIR [IMAGE ...] [--runtime jax|numpy|onnxruntime]
    ternjax-predict EXPORT_DIR [--dataset mnist] [--split test]
    ternjax-predict --zoo NAME [IMAGE ...]         # a model shipped in the package (ternjax.zoo)

Image files (PNG, JPEG, ...: anything Pillow reads; ``pip install 'ternjax[images]'``) are
converted to the export's channels (grayscale or RGB) and must have its height and width; each
gets its predicted class. Without image files, a dataset split is read with
:mod:`ternjax.data` (``--data-dir``, else ``$TERNJAX_DATA``, else ``~/.cache/ternjax``) and the
accuracy and throughput are printed. Pixels are divided by the export's ``input_divisor``.
Throughput counts the batches after the first (which includes JIT compilation) and is
wall-clock time of this process on its device. Runtimes: ``jax`` (:func:`ternjax.export.load`),
``numpy`` (the ONNX graph on ONNX's NumPy reference evaluator, no JAX) and ``onnxruntime``.
Errors (a bad export, image or data) are one line on stderr, exit status 2.
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


def classify(net, images: np.ndarray, divisor: float,
             batch_size: int) -> tuple[np.ndarray, list[tuple[float, int]]]:
  """Predicted classes of uint8 ``images`` by ``net`` (images -> logits), and the (seconds,
  images) of each batch."""
  predictions, times = [], []
  for chunk, n in _batches(images, batch_size):
    start = time.perf_counter()
    logits = np.asarray(net(chunk.astype(np.float32) / np.float32(divisor)))
    times.append((time.perf_counter() - start, n))
    predictions.append(logits[:n].argmax(-1))
  return np.concatenate(predictions), times


def run(net, images: np.ndarray, labels: np.ndarray, divisor: float, batch_size: int) -> dict:
  """Accuracy and throughput of ``net`` (images -> logits) on uint8 ``images``."""
  predictions, times = classify(net, images, divisor, batch_size)
  timed = times[1:] or times
  seconds = sum(t for t, _ in timed)
  return dict(accuracy=float(np.mean(predictions == labels)),
              correct=int(np.sum(predictions == labels)), examples=len(labels),
              images_per_s=sum(n for _, n in timed) / seconds, first_batch_s=times[0][0],
              batches_timed=len(timed))


def read_images(paths, input_shape) -> np.ndarray:
  """Image files as a uint8 batch of ``input_shape`` (H, W, C with C 1 or 3); ``ValueError``
  for a file of another size, ``OSError`` for one Pillow cannot read."""
  try:
    from PIL import Image
  except ImportError:
    raise ValueError("image files need Pillow: pip install 'ternjax[images]'") from None
  h, w, c = input_shape if len(input_shape) == 3 else (None, None, None)
  if c not in (1, 3):
    raise ValueError(f"this export takes {list(input_shape)} inputs, not images (H, W, 1 or 3)")
  images = []
  for path in paths:
    with Image.open(path) as image:
      if image.size != (w, h):
        raise ValueError(f"{path} is {image.size[0]}×{image.size[1]} pixels, the export takes "
                         f"{w}×{h}; resize it first")
      images.append(np.asarray(image.convert("L" if c == 1 else "RGB"), np.uint8))
  return np.stack(images).reshape(len(images), h, w, c)


def _load(args):
  from ternjax import runtime_numpy
  if args.zoo:
    from ternjax import zoo
    args.export = zoo.path(args.zoo)
  if args.runtime != "jax":
    net = runtime_numpy.load(args.export, model=args.model,
                             engine="numpy" if args.runtime == "numpy" else "onnxruntime")
    return net, "cpu"
  import jax

  from ternjax import export
  net = export.load(args.export, model=args.model, implementation=args.implementation)
  return net, f"{jax.default_backend()} ({jax.devices()[0].device_kind})"


def _classify(net, paths, meta) -> list[dict]:
  images = read_images(paths, meta["input_shape"])
  logits = np.asarray(net(images.astype(np.float32) / np.float32(meta["input_divisor"])),
                      np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return [dict(file=str(path), class_index=int(p.argmax()), label=meta["classes"][p.argmax()],
               probability=float(p.max())) for path, p in zip(paths, probs)]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="ternjax-predict", description=__doc__.splitlines()[0])
  p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")
  p.add_argument("export", nargs="?", help="export directory (ternjax.export)")
  p.add_argument("--zoo", metavar="NAME", help="a model shipped in the package (ternjax.zoo), "
                 "instead of an export directory")
  p.add_argument("images", nargs="*", help="image files to classify (else a dataset split)")
  p.add_argument("--dataset", help="mnist, fashion_mnist, cifar10 (default: the export's)")
  p.add_argument("--split", choices=("test", "train"), default="test")
  p.add_argument("--source", choices=("files", "tfds"), default="files")
  p.add_argument("--data-dir", help="data root (else $TERNJAX_DATA, else ~/.cache/ternjax)")
  p.add_argument("--runtime", choices=("jax", "numpy", "onnxruntime"), default="jax")
  p.add_argument("--implementation", help="ternary op implementation(s) for the jax runtime")
  p.add_argument("--model", help="refuse the export unless it holds this model")
  p.add_argument("--batch-size", type=int, default=1000)
  p.add_argument("--limit", type=int, help="only the first N examples")
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  args = p.parse_args(argv)
  if args.zoo is not None and args.export is not None:  # with --zoo, every argument is an image
    args.images, args.export = [args.export, *args.images], None
  if args.export is None and args.zoo is None:
    p.error("give an export directory, or --zoo NAME")
  if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
    p.error("--batch-size and --limit must be positive")

  from ternjax import data as tjdata
  from ternjax import runtime_numpy
  try:
    net, device = _load(args)
    meta = net.metadata
    if args.images:
      results = _classify(net, args.images, meta)
      for r in results if not args.json else ():
        print(f"{r['file']}: {r['label']} (probability {r['probability']:.3f})")
      if args.json:
        print(json.dumps(results, indent=1))
      return 0
    name = args.dataset or meta["extra"].get("dataset", "mnist")
    data = tjdata.load(name, source=args.source, data_dir=args.data_dir)
    images, labels = (data.x_test, data.y_test) if args.split == "test" else \
        (data.x_train, data.y_train)
    if tuple(images.shape[1:]) != tuple(meta["input_shape"]):
      p.error(f"{name} images are {images.shape[1:]}, the export takes {meta['input_shape']}")
    images, labels = images[:args.limit], labels[:args.limit]
    result = run(net, images, labels, meta["input_divisor"], args.batch_size)
  except (runtime_numpy.ExportError, tjdata.DataError, ValueError, OSError,
          NotImplementedError) as err:  # one line: a bad export, image, data or option
    p.error(str(err).splitlines()[0] if str(err) else type(err).__name__)
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
