"""A normal (non-editable) install maps kernels/ to ternjax.kernels, adds no top-level module and
ships no data: MNIST's files stay in the repository (experiments/data), out of the wheel. It
ships the model zoo (ternjax/zoo/models), every file of it, under 5 MB, loadable."""

import importlib.metadata
import pathlib
import subprocess
import sys
import tomllib
import zipfile

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _assert_build_backend_installed():
  """The wheel is built without isolation (offline), so by the installed backend: the test extra
  installs one that meets build-system.requires (a fresh venv's setuptools 65 does not)."""
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  for req in map(Requirement, pyproject["build-system"]["requires"]):
    try:
      installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
      installed = None
    assert installed and req.specifier.contains(installed), (
        f"{req.name} {installed} does not meet {req}: pip install -e '.[test]'")


def test_wheel_layout_and_import(tmp_path):
  _assert_build_backend_installed()
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
  wheel, = (tmp_path / "dist").glob("ternjax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert "ternjax/kernels/__init__.py" in names
  assert not [n for n in names if n.startswith(("kernels/", "experiments/"))]
  assert not [n for n in names if n.endswith((".gz", "-ubyte"))], names
  zoo_dir = ROOT / "ternjax" / "zoo" / "models"
  shipped = {str(f.relative_to(ROOT)) for f in zoo_dir.rglob("*") if f.is_file()}
  infos = [i for i in zipfile.ZipFile(wheel).infolist() if i.filename.startswith(
      "ternjax/zoo/models/")]
  assert {i.filename for i in infos} == shipped and shipped
  assert sum(i.file_size for i in infos) < 5_000_000
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                  str(wheel)], check=True)
  probe = ("import ternjax, ternjax.kernels, ternjax.data, importlib.util; "
           "print(ternjax.__file__); print(importlib.util.find_spec('kernels')); "
           "print(ternjax.data.SHIPPED_DIR in ternjax.data.roots()); from ternjax import zoo; "
           "print([zoo.load(n).metadata['model'] for n in zoo.list()])")
  out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, text=True,
                       capture_output=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
  first, second, third, fourth = out.stdout.split("\n")[:4]
  assert first.startswith(str(site)), out.stdout
  assert second == "None", out.stdout
  assert third == "False", out.stdout  # a wheel install has no shipped MNIST: downloads instead
  assert "'mlp'" in fourth, out.stdout  # the zoo's files pass their checksums
