"""A normal (non-editable) install maps kernels/ to ternjax.kernels and adds no top-level module."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_layout_and_import(tmp_path):
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
  wheel, = (tmp_path / "dist").glob("ternjax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert "ternjax/kernels/__init__.py" in names
  assert not [n for n in names if n.startswith("kernels/")]
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                  str(wheel)], check=True)
  probe = ("import ternjax, ternjax.kernels, importlib.util; "
           "print(ternjax.__file__); print(importlib.util.find_spec('kernels'))")
  out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, text=True,
                       capture_output=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
  first, second = out.stdout.split("\n")[:2]
  assert first.startswith(str(site)), out.stdout
  assert second == "None", out.stdout
