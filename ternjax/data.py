"""Image-classification datasets as NumPy arrays: standard files (verified) or TFDS.

``load(name)`` returns a :class:`Dataset` of ``uint8`` NHWC images and ``int32`` labels.

Where the files are looked for (``source='files'``), in order: ``data_dir`` (the ``--data-dir``
flag), the ``TERNJAX_DATA`` environment variable, ``~/.cache/ternjax``, then the copy of MNIST
shipped in a source checkout (``experiments/data/mnist``; a wheel install has none), so that
MNIST works offline. In each of these roots the files may sit in the dataset's subfolder or in
the root itself:

* ``mnist/``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (or the files uncompressed);
* ``fashion_mnist/``: the same four names (Debian's ``dataset-fashion-mnist`` package installs
  them in ``/usr/share/datasets/fashion-mnist``: link or copy that folder, or pass it);
* ``cifar10/``: ``data_batch_{1..5}.bin`` and ``test_batch.bin``, each possibly ``.bin.gz``,
  also found in ``cifar10/cifar-10-batches-bin/`` (the official archive's layout).

Verification: an MNIST / Fashion-MNIST file must have the official md5, or else decompress to
exactly the official content (the md5 of the IDX bytes inside the official ``.gz``); so a file
gzipped again with another header (Debian's Fashion-MNIST: no file name, another mtime) is
accepted, anything else is refused. CIFAR-10 files are checked for their size (10,000 records
of 3073 bytes) and labels; a file whose md5 is not the official one is accepted with a note in
``Dataset.notes``. Missing files are downloaded into the first root (with a progress bar);
offline, the error says which files to put where.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

ENV_VAR = "TERNJAX_DATA"
CACHE_DIR = Path("~/.cache/ternjax")
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "experiments" / "data"  # MNIST, last root
SOURCES = ("files", "tfds")


class DataError(RuntimeError):
  """Data missing, corrupt, or not what it claims to be; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train/test split: images ``uint8 (N, H, W, C)``, labels ``int32 (N,)``."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  source: str = ""                 # where it was read from
  notes: tuple[str, ...] = ()      # e.g. files that are not the official ones

  def subset(self, limit: int) -> Dataset:
    """The first ``limit`` train and test examples (smoke runs and tests)."""
    return dataclasses.replace(self, x_train=self.x_train[:limit], y_train=self.y_train[:limit],
                               x_test=self.x_test[:limit], y_test=self.y_test[:limit])


@dataclasses.dataclass(frozen=True)
class FileSpec:
  name: str
  md5: str               # official md5 of the file as distributed
  content_md5: str       # md5 of the decompressed content ('' when the file is not compressed)


@dataclasses.dataclass(frozen=True)
class Spec:
  subdir: str
  files: tuple[FileSpec, ...]
  urls: tuple[str, ...]          # base URLs tried in order (IDX), or one archive URL
  archive_md5: str = ""          # set when the download is one archive holding the files


def _idx(*md5s: str) -> tuple[FileSpec, ...]:
  names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
  return tuple(FileSpec(n, m, c) for n, (m, c) in zip(names, zip(md5s[::2], md5s[1::2])))


SPECS = {
    "mnist": Spec("mnist", _idx(
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb",
        "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624",
        "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea",
        "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
        ("https://storage.googleapis.com/cvdf-datasets/mnist/",
         "https://ossci-datasets.s3.amazonaws.com/mnist/")),
    "fashion_mnist": Spec("fashion_mnist", _idx(
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9",
        "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a",
        "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)),
    "cifar10": Spec("cifar10", tuple(FileSpec(n, m, "") for n, m in (
        ("data_batch_1.bin", "5dd7e06a14cb22eb9f671a540d1b7c25"),
        ("data_batch_2.bin", "5ea93a67294ea407fff1d09f752e9692"),
        ("data_batch_3.bin", "942cd6a4bcdd0dd3c604fbe906cb4421"),
        ("data_batch_4.bin", "ae636b3ba5c66a11e91e8cb52e771fcb"),
        ("data_batch_5.bin", "53f37980c15c3d472c316c40844f3f0d"),
        ("test_batch.bin", "803d5f7f4d78ea53de84dbe85f74fb6d"))),
        ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
        archive_md5="c32a1d4ab5d03f1284b67883e8d87530"),
}
CIFAR_RECORD = 1 + 32 * 32 * 3
CIFAR_RECORDS = 10_000


def roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
  """Data roots in lookup order: ``data_dir``, ``$TERNJAX_DATA``, ``~/.cache/ternjax``, and
  the shipped copy where the source checkout has one (never the first: downloads go there)."""
  found = [data_dir, os.environ.get(ENV_VAR) or None, CACHE_DIR]
  shipped = [SHIPPED_DIR] if SHIPPED_DIR.is_dir() else []
  return [Path(r).expanduser() for r in found if r is not None] + shipped


def _md5(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()


def _candidates(folder: Path, spec: FileSpec) -> list[Path]:
  stem = spec.name.removesuffix(".gz")
  return [folder / n for n in dict.fromkeys((spec.name, stem + ".gz", stem))]


def find(name: str, data_dir=None) -> tuple[Path, dict[str, Path]] | None:
  """The first folder holding all of ``name``'s files, and the path of each file."""
  spec = SPECS[name]
  for root in roots(data_dir):
    for folder in (root / spec.subdir, root / spec.subdir / "cifar-10-batches-bin", root):
      paths = {}
      for f in spec.files:
        path = next((p for p in _candidates(folder, f) if p.is_file()), None)
        if path is not None:
          paths[f.name] = path
      if len(paths) == len(spec.files):
        return folder, paths
  return None


def _read(path: Path, f: FileSpec, dataset: str, notes: list[str]) -> bytes:
  """The file's (decompressed) content, verified against ``f``."""
  raw = path.read_bytes()
  digest = _md5(raw)
  try:
    content = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
  except (OSError, EOFError, zlib.error) as err:
    raise DataError(f"{path}: corrupt gzip file ({err}); delete it and run again") from None
  if digest == f.md5:
    return content
  expected_content = f.content_md5 or f.md5
  if _md5(content) == expected_content:
    return content
  if f.content_md5:  # IDX: only the official content is accepted
    raise DataError(
        f"{path}: md5 {digest} is not the official {f.md5} for {dataset}'s {f.name}, nor does "
        f"it decompress to the official content; delete it (it is corrupt or another dataset) "
        f"and run again to download it, or replace it with the official file")
  notes.append(f"{path.name}: md5 {_md5(content)} is not the official {f.md5}: "
               f"not the official CIFAR-10 file (results are not comparable with published ones)")
  return content


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
  """Decodes an IDX array of unsigned bytes (magic ``0x0000 08 ndim``)."""
  if len(data) < 4 or data[:3] != b"\x00\x00\x08":
    raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
  ndim = data[3]
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise DataError(f"{path}: IDX header says {dims} but holds {body.size} bytes")
  return body.reshape(dims)


def _load_idx(name: str, paths: dict[str, Path]) -> tuple[tuple[np.ndarray, ...], list[str]]:
  notes: list[str] = []
  arrays = [_parse_idx(_read(paths[f.name], f, name, notes), paths[f.name])
            for f in SPECS[name].files]
  x_train, y_train, x_test, y_test = arrays
  for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
      raise DataError(f"{name} {split}: images {x.shape} and labels {y.shape} do not match")
  return (x_train[..., None], y_train, x_test[..., None], y_test), notes


def _load_cifar(name: str, paths: dict[str, Path]) -> tuple[tuple[np.ndarray, ...], list[str]]:
  notes: list[str] = []
  xs, ys = [], []
  for f in SPECS[name].files:
    data = _read(paths[f.name], f, name, notes)
    if len(data) != CIFAR_RECORDS * CIFAR_RECORD:
      raise DataError(f"{paths[f.name]}: {len(data)} bytes, expected {CIFAR_RECORDS} records "
                      f"of {CIFAR_RECORD} bytes = {CIFAR_RECORDS * CIFAR_RECORD}")
    records = np.frombuffer(data, np.uint8).reshape(CIFAR_RECORDS, CIFAR_RECORD)
    if records[:, 0].max() > 9:
      raise DataError(f"{paths[f.name]}: label {records[:, 0].max()} out of range 0..9")
    ys.append(records[:, 0])
    xs.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  return (np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]), notes


def _download_file(url: str, dest: Path) -> None:
  """Downloads ``url`` to ``dest`` (atomically, via a temporary file) with a progress bar."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  with urllib.request.urlopen(url, timeout=30) as response:
    total = int(response.headers.get("Content-Length") or 0) or None
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp, \
        tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
      try:
        while chunk := response.read(1 << 16):
          tmp.write(chunk)
          bar.update(len(chunk))
      except BaseException:
        os.unlink(tmp.name)
        raise
  os.replace(tmp.name, dest)


def where_to_put(name: str, data_dir=None) -> str:
  """How to provide ``name``'s files by hand, in one line (offline errors, skipped tests)."""
  spec = SPECS[name]
  where = roots(data_dir)[0] / spec.subdir
  names = ", ".join(f.name for f in spec.files)
  source = spec.urls[0] if spec.archive_md5 else " or ".join(spec.urls)
  return (f"Put {names} into {where}/ (from {source}), or pass --data-dir / set {ENV_VAR} to a "
          f"folder that holds them (looked in {', '.join(str(r) for r in roots(data_dir))})")


def _missing_message(name: str, data_dir, err: Exception) -> str:
  return f"{name} not found and could not be downloaded ({err}). {where_to_put(name, data_dir)}"


def download(name: str, data_dir=None) -> Path:
  """Downloads ``name``'s files into the first data root's subfolder; returns that folder."""
  spec = SPECS[name]
  folder = roots(data_dir)[0] / spec.subdir
  try:
    if spec.archive_md5:
      archive = folder / Path(spec.urls[0]).name
      _download_file(spec.urls[0], archive)
      if _md5(archive.read_bytes()) != spec.archive_md5:
        archive.unlink()
        raise DataError(f"{spec.urls[0]}: the download does not have the official md5 "
                        f"{spec.archive_md5}; removed it, try again")
      wanted = {f.name for f in spec.files}
      with tarfile.open(archive) as tar:
        for member in tar.getmembers():
          if Path(member.name).name in wanted and member.isfile():
            with tar.extractfile(member) as src, open(folder / Path(member.name).name, "wb") as dst:
              shutil.copyfileobj(src, dst)
      archive.unlink()
      return folder
    for f in spec.files:
      for i, base in enumerate(spec.urls):
        try:
          _download_file(base + f.name, folder / f.name)
          break
        except (urllib.error.URLError, OSError):
          if i == len(spec.urls) - 1:
            raise
  except (urllib.error.URLError, OSError) as err:
    raise DataError(_missing_message(name, data_dir, err)) from None
  return folder


def load_files(name: str, data_dir=None) -> Dataset:
  """Reads ``name`` from its standard files (downloading them when missing), verified."""
  if name not in SPECS:
    raise DataError(f"unknown dataset {name!r} for source 'files'; known: {', '.join(SPECS)}")
  located = find(name, data_dir)
  if located is None:
    download(name, data_dir)
    located = find(name, data_dir)
  folder, paths = located
  reader = _load_cifar if name == "cifar10" else _load_idx
  (x_train, y_train, x_test, y_test), notes = reader(name, paths)
  return Dataset(name, x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32),
                 num_classes=10, source=str(folder), notes=tuple(notes))


def load_tfds(name: str, data_dir=None) -> Dataset:
  """Loads a TFDS image-classification dataset by name (train and test splits).

  TFDS keeps its prepared data in ``<first root>/tfds``. When ternjax's lookup finds the
  dataset's standard files, that folder is TFDS's ``manual_dir``: TFDS then builds from them
  instead of downloading (it checks them against its own checksums, so it accepts only the
  files exactly as distributed). Needs the ``tfds`` extra (tensorflow-datasets, tensorflow-cpu).
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError("--source tfds needs tensorflow-datasets and tensorflow: "
                    "pip install 'ternjax[tfds]'") from None
  located = find(name, data_dir) if name in SPECS else None
  manual_dir = str(located[0]) if located else None
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  tfds_dir = roots(data_dir)[0] / "tfds"
  try:
    builder = tfds.builder(name, data_dir=str(tfds_dir))
    builder.download_and_prepare(download_config=config)
    (x_train, y_train), (x_test, y_test) = tfds.as_numpy(builder.as_dataset(
        split=["train", "test"], batch_size=-1, as_supervised=True))
  except Exception as err:  # TFDS raises many types; report the cause in one line.
    raise DataError(f"tfds could not load {name!r} ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''})") from err
  return Dataset(name, np.asarray(x_train, np.uint8), np.asarray(y_train, np.int32),
                 np.asarray(x_test, np.uint8), np.asarray(y_test, np.int32),
                 num_classes=int(builder.info.features["label"].num_classes),
                 source=f"tfds:{tfds_dir}" + (f" (manual_dir {manual_dir})" if manual_dir else ""))


def load(name: str, *, source: str = "files", data_dir=None) -> Dataset:
  """The dataset ``name`` from its standard files (``source='files'``) or from TFDS."""
  if source == "files":
    return load_files(name, data_dir)
  if source == "tfds":
    return load_tfds(name, data_dir)
  raise DataError(f"source must be one of {SOURCES}, got {source!r}")
