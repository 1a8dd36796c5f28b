"""Dataset files: lookup, verification (corrupt files refused), download, offline message, TFDS.

MNIST ships with the repository; the tests that read Fashion-MNIST, CIFAR-10 or TFDS are marked
``needs`` (tests/conftest.py: skipped without the data, failed in CI); the checks of parsers and
refusals edit copies of MNIST or write small CIFAR-10 files.
"""

import gzip
import hashlib
import shutil

import numpy as np
import pytest

from ternjax import data

DEBIAN = {  # md5s of the files of Debian's dataset-fashion-mnist (gzip headers differ)
    "train-images-idx3-ubyte.gz": "cf8536b0aa1a6ac5fa3f23001093305c",
    "train-labels-idx1-ubyte.gz": "10bea18fdb374794d4bb42e356e600c9",
    "t10k-images-idx3-ubyte.gz": "f78720b4224f21cce2f2ccf2d7a94c9a",
    "t10k-labels-idx1-ubyte.gz": "0d30e22e447f3c33dab9ed536400ac01",
}
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def mnist_folder():
  return data.find("mnist")[0]


@pytest.fixture
def mnist_copy(tmp_path, mnist_folder):
  """A writable copy of the four MNIST files in ``tmp_path/mnist``."""
  shutil.copytree(mnist_folder, tmp_path / "mnist")
  (tmp_path / "mnist").chmod(0o755)
  for p in (tmp_path / "mnist").iterdir():
    p.chmod(0o644)
  return tmp_path


def test_mnist_parses_and_verifies():
  ds = data.load("mnist")
  assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_train.dtype == np.uint8
  assert ds.x_test.shape == (10000, 28, 28, 1) and ds.y_test.dtype == np.int32
  assert np.bincount(ds.y_train).tolist() == MNIST_TRAIN_COUNTS
  assert ds.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
  assert abs(ds.x_train.mean() / 255 - 0.1307) < 1e-4
  assert ds.notes == ()


def test_shipped_mnist_is_the_official_files(tmp_path, monkeypatch):
  """The copy in experiments/data is found last, byte for byte the official files."""
  monkeypatch.delenv(data.ENV_VAR, raising=False)
  monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
  folder, paths = data.find("mnist")
  assert folder == data.SHIPPED_DIR / "mnist" and data.roots()[-1] == data.SHIPPED_DIR
  for f in data.SPECS["mnist"].files:
    assert hashlib.md5(paths[f.name].read_bytes()).hexdigest() == f.md5
  assert data.load("mnist").source == str(folder)


@pytest.mark.needs("fashion_mnist")
def test_fashion_mnist_debian_files_accepted():
  """Debian's files differ from upstream in the gzip header only: accepted by content."""
  _, paths = data.find("fashion_mnist")
  official = {f.name: f.md5 for f in data.SPECS["fashion_mnist"].files}
  ds = data.load("fashion_mnist")
  assert ds.notes == ()
  assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
  assert np.bincount(ds.y_train).tolist() == [6000] * 10
  assert np.bincount(ds.y_test).tolist() == [1000] * 10
  # Which files were read: Debian's (other md5s) in CI, upstream's (official md5s) elsewhere.
  for name, path in paths.items():
    assert hashlib.md5(path.read_bytes()).hexdigest() in (official[name], DEBIAN[name])


def test_corrupt_file_refused(mnist_copy):
  path = mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz"
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  path.write_bytes(bytes(raw))
  with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz"):
    data.load("mnist", data_dir=mnist_copy)


def test_truncated_files_refused(mnist_copy):
  """A download cut short: a truncated .gz, or a truncated uncompressed IDX file."""
  folder = mnist_copy / "mnist"
  images = folder / "t10k-images-idx3-ubyte.gz"
  whole = images.read_bytes()
  images.write_bytes(whole[:100_000])
  with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz: corrupt gzip"):
    data.load("mnist", data_dir=mnist_copy)
  images.write_bytes(whole)
  labels = folder / "train-labels-idx1-ubyte.gz"
  (folder / "train-labels-idx1-ubyte").write_bytes(gzip.decompress(labels.read_bytes())[:-1])
  labels.unlink()
  with pytest.raises(data.DataError, match="train-labels-idx1-ubyte: md5 .* not the official"):
    data.load("mnist", data_dir=mnist_copy)


def test_other_content_refused(mnist_copy):
  """A valid gzip of the wrong content (another file's labels) fails the md5 check."""
  folder = mnist_copy / "mnist"
  labels = gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
  fake = labels[:8] + bytes((b + 1) % 10 for b in labels[8:])
  (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(fake))
  with pytest.raises(data.DataError, match="not the official"):
    data.load("mnist", data_dir=mnist_copy)


def test_regzipped_and_uncompressed_accepted(mnist_copy):
  folder = mnist_copy / "mnist"
  labels = gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
  (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels, mtime=1))
  train_labels = folder / "train-labels-idx1-ubyte.gz"
  (folder / "train-labels-idx1-ubyte").write_bytes(gzip.decompress(train_labels.read_bytes()))
  train_labels.unlink()
  ds = data.load("mnist", data_dir=mnist_copy)
  assert np.bincount(ds.y_train).tolist() == MNIST_TRAIN_COUNTS


def test_lookup_order(mnist_copy, tmp_path, monkeypatch):
  """--data-dir, $TERNJAX_DATA, the cache (the shipped copy: above); files may sit in a root."""
  flat = tmp_path / "flat"
  shutil.copytree(mnist_copy / "mnist", flat)
  monkeypatch.setenv(data.ENV_VAR, str(mnist_copy))
  assert data.find("mnist")[0] == mnist_copy / "mnist"
  assert data.find("mnist", flat)[0] == flat
  monkeypatch.delenv(data.ENV_VAR)
  monkeypatch.setattr(data, "CACHE_DIR", mnist_copy)
  assert data.find("mnist", tmp_path / "empty")[0] == mnist_copy / "mnist"


def test_download_with_verification(mnist_folder, tmp_path, monkeypatch, no_local_data):
  spec = data.SPECS["mnist"]
  monkeypatch.setitem(data.SPECS, "mnist", data.Spec(
      spec.subdir, spec.files, ("http://127.0.0.1:9/nothing/", mnist_folder.as_uri() + "/")))
  ds = data.load("mnist", data_dir=tmp_path / "root")
  assert ds.source == str(tmp_path / "root" / "mnist")
  assert sorted(p.name for p in (tmp_path / "root" / "mnist").iterdir()) == sorted(
      f.name for f in spec.files)


def test_offline_message_names_files_and_folder(tmp_path, monkeypatch, no_local_data):
  spec = data.SPECS["fashion_mnist"]
  monkeypatch.setitem(data.SPECS, "fashion_mnist", data.Spec(
      spec.subdir, spec.files, ("http://127.0.0.1:9/",)))
  with pytest.raises(data.DataError) as err:
    data.load("fashion_mnist", data_dir=tmp_path / "root")
  message = str(err.value)
  assert str(tmp_path / "root" / "fashion_mnist") in message and "\n" not in message
  for f in spec.files:
    assert f.name in message


def _fake_cifar(folder, records, label=3, gz=()):
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for f in data.SPECS["cifar10"].files:
    body = rng.integers(0, 256, (records, data.CIFAR_RECORD), dtype=np.uint8)
    body[:, 0] = label
    raw = body.tobytes()
    if f.name in gz:
      (folder / (f.name + ".gz")).write_bytes(gzip.compress(raw))
    else:
      (folder / f.name).write_bytes(raw)


def test_cifar_structure_checks(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "CIFAR_RECORDS", 20)
  _fake_cifar(tmp_path / "ok" / "cifar10", 20, gz=("test_batch.bin",))
  ds = data.load("cifar10", data_dir=tmp_path / "ok")
  assert ds.x_train.shape == (100, 32, 32, 3) and ds.x_test.shape == (20, 32, 32, 3)
  assert len(ds.notes) == 6 and all("not the official" in n for n in ds.notes)
  _fake_cifar(tmp_path / "short" / "cifar10", 19)
  with pytest.raises(data.DataError, match="expected 20 records"):
    data.load("cifar10", data_dir=tmp_path / "short")
  _fake_cifar(tmp_path / "label" / "cifar10", 20, label=10)
  with pytest.raises(data.DataError, match="out of range"):
    data.load("cifar10", data_dir=tmp_path / "label")


@pytest.mark.needs("cifar10")
def test_cifar10_reconstructed_files():
  """CI's copy (train batches official, test batch not, said in the notes) or the official."""
  ds = data.load("cifar10")
  assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
  assert np.bincount(ds.y_train).tolist() == [5000] * 10
  # The official files have no notes; CI's reconstruction has one, for its test batch.
  assert [n.split(":")[0] for n in ds.notes] in ([], ["test_batch.bin"])


@pytest.mark.needs("tfds")
def test_tfds_mnist_from_local_files(tmp_path):
  """``--source tfds`` builds TFDS's mnist from the local files (manual_dir), offline."""
  ds = data.load("mnist", source="tfds", data_dir=tmp_path)
  files = data.load("mnist")
  assert ds.x_train.shape == files.x_train.shape and ds.num_classes == 10
  assert "manual_dir" in ds.source
  # TFDS shuffles: compare the splits as multisets (class counts and pixel sums per class).
  for (xa, ya), (xb, yb) in (((ds.x_train, ds.y_train), (files.x_train, files.y_train)),
                             ((ds.x_test, ds.y_test), (files.x_test, files.y_test))):
    assert np.bincount(ya).tolist() == np.bincount(yb).tolist()
    sums = lambda x, y: np.bincount(y, weights=x.reshape(len(x), -1).sum(1, dtype=np.int64))
    np.testing.assert_array_equal(sums(xa, ya), sums(xb, yb))


def test_unknown_source_and_dataset():
  with pytest.raises(data.DataError, match="source"):
    data.load("mnist", source="web")
  with pytest.raises(data.DataError, match="unknown dataset"):
    data.load("svhn")
