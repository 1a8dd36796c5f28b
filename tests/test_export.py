"""Export: round trips (JAX and NumPy runtimes), BatchNorm folding, census, refusals, CLI."""

import importlib.util
import json
import pathlib
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ternjax as tj
from ternjax import export as ex
from ternjax import ops, predict, runtime_numpy
from ternjax.models import MODELS, Flatten, ReLU

ROOT = pathlib.Path(__file__).resolve().parents[1]
X = jax.random.uniform(jax.random.key(5), (32, 28, 28, 1))


def _profile_module():
  spec = importlib.util.spec_from_file_location("profile_operations",
                                                ROOT / "experiments/profile_operations.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def randomize_batchnorm(model, seed=1):
  """Non-trivial running statistics and affine parameters (some negative scales)."""
  key = jax.random.key(seed)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      k = jax.random.split(key, 6)
      key, n = k[5], m.num_features
      m.mean[...] = 0.3 * jax.random.normal(k[0], (n,))
      m.var[...] = jax.random.uniform(k[1], (n,), minval=0.2, maxval=2.0)
      sign = jnp.where(jax.random.bernoulli(k[2], 0.1, (n,)), -1.0, 1.0)
      m.scale[...] = sign * jax.random.uniform(k[3], (n,), minval=0.5, maxval=1.5)
      m.bias[...] = 0.1 * jax.random.normal(k[4], (n,))
  return model


def assert_logits_close(actual, expected):
  """Same predictions; logits within float rounding, except that BatchNorm folding's rounding
  can move a quantizer input across a rounding boundary (an int8 or ternary code changes by one
  step): a few examples may then differ by about one quantization step."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))
  close = np.all(np.isclose(actual, expected, rtol=1e-4, atol=1e-5), axis=-1)
  assert close.mean() >= 0.75, f"{np.sum(~close)} of {len(close)} examples differ"
  np.testing.assert_allclose(actual, expected, atol=1e-2 * max(1.0, np.abs(expected).max()))


def build(name, fp_first_last=False, **quant):
  model = MODELS[name](tj.QuantConfig(**quant), fp_first_last=fp_first_last,
                       rngs=nnx.Rngs(0, quant=1))
  randomize_batchnorm(model).eval()
  return model


CASES = {
    "mlp-twn-fp_edges": dict(name="mlp", fp_first_last=True, weights="twn"),
    "lenet5-ttq-int8": dict(name="lenet5", weights="ttq", activations="int8"),
    "ternary_cnn-twn": dict(name="ternary_cnn", weights="twn"),
    "ternary_cnn-stochastic-fp_edges": dict(name="ternary_cnn", fp_first_last=True,
                                            weights="stochastic"),
}


@pytest.mark.parametrize("case", CASES)
def test_round_trip_jax_and_numpy(case, tmp_path):
  """Predictions identical, logits within float rounding: model (eval) vs JAX vs NumPy."""
  kw = dict(CASES[case])
  name = kw.pop("name")
  model = build(name, **kw)
  expected = model(X)
  path = ex.export(model, tmp_path / "e", model_name=name, input_shape=(28, 28, 1), classes=10)
  net = ex.load(path, model=name)
  logits = net(X)
  assert_logits_close(logits, expected)
  assert_logits_close(runtime_numpy.load(path, model=name)(np.asarray(X)), logits)
  # BatchNorm is folded: no affine layer is left, and the export holds no float shadow weights.
  kinds = [l["kind"] for l in net.metadata["layers"]]
  assert "affine" not in kinds and kinds.count("relu") + kinds.count("max_pool") > 0
  for i, spec in enumerate(net.metadata["layers"]):
    if spec["kind"].startswith("ternary"):
      leaves = jax.tree.leaves(net.params[str(i)])
      assert all(a.dtype == jnp.uint32 or a.ndim <= 1 for a in leaves), spec
      n = spec["features"][1]
      assert all(a.size <= n for a in leaves if a.dtype != jnp.uint32)


def test_standalone_batchnorm_and_dropout(tmp_path):
  """A BatchNorm after a non-linear layer becomes an affine layer; dropout is dropped."""
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(Flatten(), nnx.BatchNorm(784, rngs=rngs), nnx.Dropout(0.5, rngs=rngs),
                         tj.TernaryLinear(784, 10, quant=tj.QuantConfig(weights="ttq"),
                                          rngs=rngs))
  randomize_batchnorm(model).eval()
  path = ex.export(model, tmp_path / "e", model_name="bn", input_shape=(28, 28, 1), classes=10)
  net = ex.load(path)
  assert [l["kind"] for l in net.metadata["layers"]] == ["flatten", "affine", "ternary_linear"]
  assert_logits_close(net(X), model(X))


def test_census_passes_ternary_and_flags_float_multiplies(tmp_path, monkeypatch):
  profile = _profile_module()
  act = tj.QuantConfig(weights="twn", activations="ternary")
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(
      Flatten(), nnx.Linear(784, 64, rngs=rngs), ReLU(),
      tj.TernaryLinear(64, 32, quant=act, rngs=rngs), nnx.BatchNorm(32, rngs=rngs),
      tj.TernaryLinear(32, 10, quant=tj.QuantConfig(weights="ttq", activations="ternary"),
                       rngs=rngs))
  path = ex.export(model, tmp_path / "e", model_name="m", input_shape=(28, 28, 1), classes=10)
  net = ex.load(path)
  rows = profile.census(net)
  assert [r["verdict"] for r in rows] == ["-", "float layer", "-", "ok", "ok"]
  assert rows[3]["ops"]["popcount"]["uint32"]["eqns"] > 0
  assert not profile.violations(rows)

  def float_dot(spec, p, x, implementation):  # wrong: dequantized weights, float matmul
    t = tj.unpack_bitplanes(p["w"], jnp.float32)
    return (x @ t) * p["scale_pos"] + p["bias"]

  def float_mul(spec, p, x, implementation):  # wrong: a float multiply per weight
    t = tj.unpack_bitplanes(p["w"], jnp.float32)
    return jnp.sum(x[:, :, None] * t[None], axis=1) * p["scale_pos"] + p["bias"]

  for wrong in (float_dot, float_mul):
    monkeypatch.setitem(ex.LAYERS, "ternary_linear", wrong)
    rows = profile.census(ex.load(path))
    assert [r["layer"] for r in profile.violations(rows)] == [3, 4], wrong.__name__


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory):
  model = build("mlp", weights="twn")
  path = tmp_path_factory.mktemp("exports") / "mlp"
  ex.export(model, path, model_name="mlp", input_shape=(28, 28, 1), classes=10, accuracy=0.5)
  return path, np.asarray(ex.load(path)(X))


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def _refused(path, match, **kw):
  with pytest.raises(ex.ExportError, match=match):
    ex.load(path, **kw)
  with pytest.raises(ex.ExportError, match=match):
    runtime_numpy.load(path, **kw)


# A failed Orbax restore leaves a TensorStore callback for its closed event loop: harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_and_mismatched_exports_are_refused(mlp_export, tmp_path):
  good, _ = mlp_export
  _refused(good, "holds model 'mlp', not the requested 'lenet5'", model="lenet5")
  _refused(tmp_path / "nothing", "no such export directory")

  wrong_version = _copy(good, tmp_path / "version")
  meta_file = wrong_version / "metadata" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta_file.write_text(json.dumps({**meta, "format_version": 99}))
  _refused(wrong_version, "format version 99")

  truncated_meta = _copy(good, tmp_path / "meta")
  (truncated_meta / "metadata" / "metadata").write_text(meta_file.read_text()[:100])
  _refused(truncated_meta, "corrupted")

  truncated = _copy(good, tmp_path / "truncated")
  biggest = max((f for f in (truncated / "arrays").rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])
  _refused(truncated, "corrupted export")

  flipped = _copy(good, tmp_path / "flipped")  # same length, one byte changed
  biggest = flipped / biggest.relative_to(truncated)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0x5A
  biggest.write_bytes(bytes(data))
  _refused(flipped, "corrupted export")


def test_export_never_overwrites_silently_and_is_atomic(mlp_export, tmp_path, monkeypatch):
  good, logits = mlp_export
  target = _copy(good, tmp_path / "e")
  lenet = MODELS["mlp"](tj.QuantConfig(weights="ttq"), sizes=(784, 32, 10), rngs=nnx.Rngs(0))
  with pytest.raises(ex.ExportError, match="exists; pass overwrite=True"):
    ex.export(lenet, target, model_name="lenet5", input_shape=(28, 28, 1), classes=10)

  real_save = ex._save_checkpoint

  def interrupted(path, arrays, meta):  # the write completes, then the process "dies"
    real_save(path, arrays, meta)
    raise KeyboardInterrupt

  monkeypatch.setattr(ex, "_save_checkpoint", interrupted)
  with pytest.raises(KeyboardInterrupt):
    ex.export(lenet, target, model_name="lenet5", input_shape=(28, 28, 1), classes=10,
              overwrite=True)
  with pytest.raises(KeyboardInterrupt):
    ex.export(lenet, tmp_path / "new", model_name="lenet5", input_shape=(28, 28, 1), classes=10)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # nothing new, no leftovers
  np.testing.assert_array_equal(ex.load(target, model="mlp")(X), logits)

  monkeypatch.setattr(ex, "_save_checkpoint", real_save)
  ex.export(lenet, target, model_name="lenet5", input_shape=(28, 28, 1), classes=10,
            overwrite=True)
  assert ex.load(target).metadata["model"] == "lenet5"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_export_rejects_what_it_cannot_represent(tmp_path):
  rngs = nnx.Rngs(0)
  with pytest.raises(ex.ExportError, match="not in the export vocabulary"):
    ex.export(nnx.Sequential(Flatten(), nnx.LayerNorm(784, rngs=rngs)), tmp_path / "a",
              model_name="x", input_shape=(28, 28, 1), classes=10)
  model = nnx.Sequential(Flatten(), nnx.Linear(784, 5, rngs=rngs))
  with pytest.raises(ex.ExportError, match="expected 10 class logits"):
    ex.export(model, tmp_path / "b", model_name="x", input_shape=(28, 28, 1), classes=10)
  with pytest.raises(ex.ExportError, match="does not fit the model"):
    ex.export(model, tmp_path / "c", model_name="x", input_shape=(32, 32, 3), classes=5)
  assert not list(tmp_path.iterdir())


def test_numpy_runtime_does_not_import_jax(mlp_export, tmp_path):
  path, logits = mlp_export
  np.save(tmp_path / "x.npy", np.asarray(X))
  script = f"""
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name == "jax" or name.startswith(("jax.", "jaxlib", "flax", "orbax")):
      raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np
from ternjax import runtime_numpy as rt
np.save({str(tmp_path / "out.npy")!r}, rt.load({str(path)!r})(np.load({str(tmp_path / "x.npy")!r})))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax")))
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"
  assert_logits_close(np.load(tmp_path / "out.npy"), logits)


def test_numpy_conv_patches_match_ops():
  x = np.asarray(jax.random.randint(jax.random.key(0), (2, 9, 8, 3), -1, 2), np.int8)
  for window, strides, padding, dilation in [((3, 3), (1, 1), "SAME", (1, 1)),
                                             ((2, 3), (2, 3), "VALID", (1, 1)),
                                             ((3, 2), (2, 1), ((1, 2), (0, 1)), (2, 1))]:
    expected = ops.conv_patches(jnp.asarray(x), window, strides, padding, dilation)
    got = runtime_numpy.conv_patches(x, window, strides, padding, dilation)
    np.testing.assert_array_equal(got, expected)


def test_package_zip_and_model_card(mlp_export, tmp_path):
  path, logits = mlp_export
  zip_path = ex.package(path, tmp_path / "mlp.zip")
  with pytest.raises(ex.ExportError, match="exists"):
    ex.package(path, zip_path)
  with zipfile.ZipFile(zip_path) as z:
    names = z.namelist()
    card = z.read("MODEL_CARD.md").decode()
    meta = json.loads(z.read("metadata.json"))
    z.extractall(tmp_path / "unzipped")
  assert "metadata.json" in names and "export/metadata/metadata" in names
  assert meta["model"] == "mlp" and "accuracy: 0.5000" in card and "ternjax-predict" in card
  assert "ternary_linear" in card and "bits/weight" in card
  np.testing.assert_array_equal(ex.load(tmp_path / "unzipped" / "export")(X), logits)


def test_size_report_counts_two_bits_per_weight(mlp_export):
  size = ex.size_report(mlp_export[0])
  assert size["ternary_weights"] == 784 * 256 + 256 * 128 + 128 * 10
  assert size["code_bytes"] == 196 * 256 + 64 * 128 + 32 * 10
  assert size["bits_codes"] == 2.0 and size["bits_with_scales"] < 2.1
  assert size["float32_bytes"] == 4 * (234752 + 256 + 128 + 10 + 4 * (256 + 128))
  assert size["disk_bytes"] < size["float32_bytes"] / 14


def test_trained_export_predict_cli_matches_training_eval(tmp_path, capsys):
  """Brief MNIST training, export, then ternjax-predict reproduces the training eval accuracy."""
  from ternjax import data as tjdata
  from ternjax import train
  data = tjdata.load("mnist").subset(1000)
  model = MODELS["lenet5"](tj.QuantConfig(weights="ttq"), rngs=nnx.Rngs(0))
  config = train.TrainConfig(epochs=1, batch_size=100, lr=2e-3, eval_batch_size=500)
  summary = train.train_and_evaluate(config, model, data, tmp_path / "run")
  capsys.readouterr()
  path = ex.export(model, tmp_path / "export", model_name="lenet5", input_shape=(28, 28, 1),
                   classes=10, accuracy=summary["test_accuracy"], extra={"dataset": "mnist"})
  for runtime in ("jax", "numpy"):
    assert predict.main([str(path), "--limit", "1000", "--batch-size", "300", "--json",
                         "--runtime", runtime]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 1000 and result["images_per_s"] > 0
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6), runtime
  assert summary["test_accuracy"] > 0.2  # 10 steps: learned something (chance is 0.1)


def test_predict_cli_errors_are_one_line(mlp_export, tmp_path):
  for argv, match in [([str(tmp_path / "missing")], "no such export directory"),
                      ([str(mlp_export[0]), "--model", "lenet5"], "not the requested"),
                      ([str(mlp_export[0]), "--batch-size", "0"], "must be positive")]:
    out = subprocess.run([sys.executable, "-m", "ternjax.predict", *argv], capture_output=True,
                         text=True)
    assert out.returncode == 2, out.stderr
    assert match in out.stderr and "Traceback" not in out.stderr
