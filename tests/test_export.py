"""Export: any model, every runtime (JAX, onnxruntime, NumPy), BatchNorm folding, census,
integrity checks, input checks, refusals, CLI."""

import json
import shutil
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
from ternjax import predict, runtime_numpy
from ternjax.models import MODELS, Flatten

X = np.asarray(jax.random.uniform(jax.random.key(5), (32, 28, 28, 1)))
RUNTIMES = {"jax": ex.load,
            "numpy": runtime_numpy.load,
            "onnxruntime": lambda path, **kw: runtime_numpy.load(path, engine="onnxruntime",
                                                                 **kw)}


def randomize_batchnorm(model, seed=1):
  """Non-trivial running statistics and affine parameters (some negative scales), drawn by
  NumPy (eager jax.random calls would compile for every BatchNorm size)."""
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      n = m.num_features
      m.mean[...] = f32(0.3 * rng.standard_normal(n))
      m.var[...] = f32(rng.uniform(0.2, 2.0, n))
      sign = np.where(rng.random(n) < 0.1, -1.0, 1.0)
      m.scale[...] = f32(sign * rng.uniform(0.5, 1.5, n))
      m.bias[...] = f32(0.1 * rng.standard_normal(n))
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


def eval_logits(model, x):
  """The model's logits in eval mode, jitted (eager, it would compile operation by operation)."""
  model.eval()
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(x)))


def assert_every_runtime(path, expected, x=X):
  """JAX, NumPy (onnx.reference) and onnxruntime agree with ``expected`` (the model, eval)."""
  jax_logits = np.asarray(ex.load(path)(x))
  assert_logits_close(jax_logits, expected)
  for name in ("numpy", "onnxruntime"):
    assert_logits_close(RUNTIMES[name](path)(x), jax_logits)


def build(name, fp_first_last=False, **quant):
  model = MODELS[name](tj.QuantConfig(**quant), fp_first_last=fp_first_last,
                       rngs=nnx.Rngs(0, quant=1))
  return randomize_batchnorm(model)


CASES = {
    "mlp-twn-fp_edges": dict(name="mlp", fp_first_last=True, weights="twn"),
    "lenet5-ttq-int8": dict(name="lenet5", weights="ttq", activations="int8"),
    "ternary_cnn-twn": dict(name="ternary_cnn", weights="twn"),
    "ternary_cnn-stochastic-fp_edges": dict(name="ternary_cnn", fp_first_last=True,
                                            weights="stochastic"),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_models_every_runtime(case, tmp_path):
  """Predictions identical, logits within float rounding: model (eval), JAX, NumPy, ORT."""
  kw = dict(CASES[case])
  name = kw.pop("name")
  model = build(name, **kw)
  path = ex.export(model, tmp_path / "e", model_name=name, input_shape=(28, 28, 1), classes=10)
  assert_every_runtime(path, eval_logits(model, X))
  meta = ex.load(path, model=name).metadata
  # Every BatchNorm follows a layer and folds into it; no float shadow weight is stored.
  batchnorms = [l for l in meta["layers"] if l["kind"] == "BatchNorm"]
  assert batchnorms and all(l["folded_into"] for l in batchnorms)
  ternary = {l["name"] for l in meta["layers"] if l.get("export", "").startswith("ternary")}
  assert ternary and not any(f"{t}/kernel" in meta["arrays"] for t in ternary)
  assert not any("mean" in a or "var" in a for a in meta["arrays"])
  assert {a["dtype"] for n, a in meta["arrays"].items() if n.endswith("/codes")} == {"uint8"}


class Block(nnx.Module):
  """What a CIFAR zoo uses: strided residual block with a projection shortcut, a depthwise
  ternary conv with int8 inputs, float conv + BatchNorm, concatenation, GELU, average pooling,
  LayerNorm, attention, dropout, a BatchNorm after a ReLU (not foldable)."""

  def __init__(self, rngs):
    act = tj.QuantConfig(weights="twn", activations="ternary")
    self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn0 = nnx.BatchNorm(8, rngs=rngs)
    self.c1 = tj.TernaryConv(8, 16, (3, 3), strides=2, quant=act, rngs=rngs)
    self.b1 = nnx.BatchNorm(16, rngs=rngs)
    self.c2 = tj.TernaryConv(16, 16, (3, 3), padding=((1, 1), (2, 2)), kernel_dilation=(1, 2),
                             quant=act, rngs=rngs)
    self.b2 = nnx.BatchNorm(16, rngs=rngs)
    self.proj = tj.TernaryConv(8, 16, (1, 1), strides=2, use_bias=False, quant=act, rngs=rngs)
    self.bp = nnx.BatchNorm(16, rngs=rngs)
    self.dw = tj.TernaryConv(16, 16, (3, 3), feature_group_count=16, rngs=rngs,
                             quant=tj.QuantConfig(weights="ttq", activations="int8"))
    self.after_relu = nnx.BatchNorm(32, rngs=rngs)
    self.ln = nnx.LayerNorm(32, rngs=rngs)
    self.att = nnx.MultiHeadAttention(4, 32, rngs=rngs, decode=False)
    self.fc = tj.TernaryLinear(32, 10, quant=tj.QuantConfig(weights="twn"), rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn0(self.stem(x)))
    y = self.b2(self.c2(nnx.relu(self.b1(self.c1(x)))))
    x = nnx.relu(y + self.bp(self.proj(x)))
    x = jnp.concatenate([x, nnx.gelu(self.dw(x))], axis=-1)
    x = self.after_relu(nnx.max_pool(x, (3, 3), (2, 2), padding="SAME"))
    t = nnx.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1, 32)
    t = t + self.att(self.ln(t))
    return self.fc(self.drop(jnp.tanh(t.mean(axis=1))))


def test_any_model_every_runtime(tmp_path):
  model = randomize_batchnorm(Block(nnx.Rngs(0, quant=1)))
  path = ex.export(model, tmp_path / "e", model_name="block", input_shape=(28, 28, 1),
                   classes=10)
  assert_every_runtime(path, eval_logits(model, X[:8]), X[:8])
  meta = ex.load(path).metadata
  folded = {l["name"]: l["folded_into"] for l in meta["layers"] if l["kind"] == "BatchNorm"}
  assert folded == {"bn0": "stem", "b1": "c1", "b2": "c2", "bp": "proj", "after_relu": None}
  assert "after_relu/gain" in meta["arrays"] and "proj/bias" in meta["arrays"]
  assert [n["spec"]["name"] for n in meta["graph"]["nodes"] if n["op"] == "ternary"] == \
      ["c1", "c2", "proj", "dw", "fc"]
  names = [l["name"] for l in meta["layers"]]  # the model card's table: in call order
  assert names.index("stem") < names.index("c1") < names.index("proj") < names.index("att")


def test_standalone_batchnorm_and_dropout(tmp_path):
  """A BatchNorm after a non-linear layer becomes an affine layer; dropout is the identity."""
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(Flatten(), nnx.BatchNorm(784, rngs=rngs), nnx.Dropout(0.5, rngs=rngs),
                         tj.TernaryLinear(784, 10, quant=tj.QuantConfig(weights="ttq"),
                                          rngs=rngs))
  randomize_batchnorm(model)
  path = ex.export(model, tmp_path / "e", model_name="bn", input_shape=(28, 28, 1), classes=10)
  assert sorted(ex.load(path).metadata["arrays"]) == [
      "layers/1/gain", "layers/1/shift", "layers/3/bias", "layers/3/codes", "layers/3/scale_neg",
      "layers/3/scale_pos"]
  assert_every_runtime(path, eval_logits(model, X))


def test_census_passes_ternary_and_flags_float_multiplies(experiment, tmp_path, monkeypatch):
  profile = experiment("profile_operations")
  act = tj.QuantConfig(weights="twn", activations="ternary")
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(
      Flatten(), nnx.Linear(784, 64, rngs=rngs), nnx.relu,
      tj.TernaryLinear(64, 32, quant=act, rngs=rngs), nnx.BatchNorm(32, rngs=rngs),
      tj.TernaryLinear(32, 10, quant=tj.QuantConfig(weights="ttq", activations="ternary"),
                       rngs=rngs))
  path = ex.export(model, tmp_path / "e", model_name="m", input_shape=(28, 28, 1), classes=10)
  rows = profile.census(ex.load(path))
  assert [r["verdict"] for r in rows] == ["float segment", "ok", "float segment", "ok"]
  assert rows[1]["ops"]["popcount"]["uint32"]["eqns"] > 0
  assert not profile.violations(rows)

  def float_dot(spec, x, codes, scale_pos, bias, **kw):  # wrong: float matmul of weights
    return x.astype(jnp.float32) @ tj.unpack_bitplanes(codes, jnp.float32) * scale_pos + bias

  monkeypatch.setattr(ex, "ternary_dispatch", float_dot)
  rows = profile.census(ex.load(path))
  assert [r["layer"] for r in profile.violations(rows)] == [1, 3]


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory):
  model = build("mlp", weights="twn", activations="ternary")
  path = tmp_path_factory.mktemp("exports") / "mlp"
  ex.export(model, path, model_name="mlp", input_shape=(28, 28, 1), classes=10, accuracy=0.5)
  return path, np.asarray(ex.load(path)(X))


def _refused(path, match, **kw):
  for name, load in RUNTIMES.items():
    with pytest.raises(ex.ExportError, match=match) as info:
      load(path, **kw)
    assert "\n" not in str(info.value), name


def _edited(good, dst, edit):
  target = shutil.copytree(good, dst)
  edit(target)
  return target


def _rewrite_metadata(path, change):
  meta_file = path / "metadata" / "metadata"
  meta = json.loads(meta_file.read_text())
  change(meta)
  meta_file.write_text(json.dumps(meta))


def _largest_array_file(path):
  return max((f for f in (path / "arrays").rglob("*") if f.is_file()),
             key=lambda f: f.stat().st_size)


def _truncate(f):
  f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def _flip(f):
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x5A
  f.write_bytes(bytes(data))


def _set_threshold(meta):
  layer = next(l for l in meta["layers"] if l.get("act_threshold"))
  layer["act_threshold"] = 0.4


BAD_EXPORTS = {  # name: (edit, the one-line error)
    "truncated array file": (lambda p: _truncate(_largest_array_file(p)),
                             r"corrupted export: arrays/.* does not match its checksum"),
    "flipped byte in an array file": (lambda p: _flip(_largest_array_file(p)),
                                      r"arrays/.* does not match its checksum"),
    "edited act_threshold": (lambda p: _rewrite_metadata(p, _set_threshold),
                             r"metadata/metadata does not match its checksum"),
    "missing metadata": (lambda p: (p / "metadata" / "metadata").unlink(),
                         r"metadata/metadata is missing"),
    "truncated segment": (lambda p: _truncate(p / "graph" / "segment000.jax"),
                          r"graph/segment000.jax does not match its checksum"),
    "flipped ONNX byte": (lambda p: _flip(p / "model.onnx"), r"model.onnx does not match"),
    "no checksums": (lambda p: (p / "checksums.json").unlink(),
                     r"not a ternjax export or corrupted: no checksums.json"),
    "unlisted file": (lambda p: (p / "arrays" / "extra").write_bytes(b"x"),
                      r"arrays/extra is not covered by checksums.json"),
    "other version": (lambda p: (_rewrite_metadata(p, lambda m: m.update(format_version=1)),
                                 (p / "checksums.json").unlink()),
                      r"export format version 1, this ternjax reads versions 2, 3"),
}


@pytest.mark.parametrize("bad", BAD_EXPORTS)
def test_bad_exports_are_refused_by_every_runtime(bad, mlp_export, tmp_path):
  edit, match = BAD_EXPORTS[bad]
  _refused(_edited(mlp_export[0], tmp_path / "e", edit), match)


def test_refusals_name_and_model(mlp_export, tmp_path):
  _refused(mlp_export[0], "holds model 'mlp', not the requested 'lenet5'", model="lenet5")
  _refused(tmp_path / "nothing", "no such export directory")


def _resign(path):
  (path / "checksums.json").unlink()
  runtime_numpy.write_checksums(path)


def test_an_op_the_numpy_runtime_lacks_is_refused(mlp_export, tmp_path):
  import onnx
  from onnx import helper

  def add_unknown_op(path):
    model = onnx.load(path / "model.onnx")
    out = model.graph.output[0]
    model.graph.node.append(helper.make_node("Mystery", [out.name], ["mystery"],
                                             domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    out.name = "mystery"
    onnx.save(model, path / "model.onnx")
    _resign(path)  # a consistent export whose graph uses an operator nobody implements

  path = _edited(mlp_export[0], tmp_path / "e", add_unknown_op)
  for engine in runtime_numpy.ENGINES:
    with pytest.raises(ex.ExportError, match=f"model.onnx cannot run on "
                       f"{'onnx.reference' if engine == 'numpy' else 'onnxruntime'}"):
      runtime_numpy.load(path, engine=engine)
  ex.load(path)  # the JAX runtime does not read model.onnx


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_inputs_are_checked_by_every_runtime(runtime, mlp_export):
  net = RUNTIMES[runtime](mlp_export[0])
  for images, match in [(np.zeros((2, 56, 14, 1), np.float32), r"shape \(2, 56, 14, 1\)"),
                        (np.zeros((2, 28, 28), np.float32), "takes a batch of 28×28×1"),
                        (np.zeros((2, 28, 28, 1), np.uint8), "dtype uint8"),
                        (np.full((2, 28, 28, 1), np.nan, np.float32), "non-finite"),
                        (np.full((2, 28, 28, 1), np.inf), "non-finite")]:
    with pytest.raises(ValueError, match=match):
      net(images)
  empty = np.asarray(net(np.zeros((0, 28, 28, 1), np.float32)))
  assert empty.shape == (0, 10) and empty.dtype == np.float32
  np.testing.assert_allclose(np.asarray(net(X[:3].astype(np.float64))), mlp_export[1][:3],
                             rtol=1e-4, atol=1e-4)


def test_export_never_overwrites_and_is_atomic(mlp_export, tmp_path, monkeypatch):
  good, logits = mlp_export
  target = shutil.copytree(good, tmp_path / "e")
  other = MODELS["mlp"](tj.QuantConfig(weights="ttq"), sizes=(784, 32, 10), rngs=nnx.Rngs(0))
  args = dict(model_name="other", input_shape=(28, 28, 1), classes=10)
  with pytest.raises(ex.ExportError, match="exists; pass overwrite=True"):
    ex.export(other, target, **args)

  real_save = ex._save_checkpoint

  def interrupted(path, arrays, meta):  # the write completes, then the process "dies"
    real_save(path, arrays, meta)
    raise KeyboardInterrupt

  monkeypatch.setattr(ex, "_save_checkpoint", interrupted)
  for directory in (target, tmp_path / "new"):
    with pytest.raises(KeyboardInterrupt):
      ex.export(other, directory, overwrite=True, **args)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # nothing new, no leftovers
  np.testing.assert_array_equal(ex.load(target, model="mlp")(X), logits)

  monkeypatch.setattr(ex, "_save_checkpoint", real_save)
  ex.export(other, target, overwrite=True, **args)
  assert ex.load(target).metadata["model"] == "other"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_an_export_that_disagrees_with_the_model_is_not_written(mlp_export, tmp_path,
                                                                monkeypatch):
  target = shutil.copytree(mlp_export[0], tmp_path / "e")
  real = ex.ternary_dispatch  # a runtime bug, for example: every ternary output off by one
  monkeypatch.setattr(ex, "ternary_dispatch", lambda *a, **kw: real(*a, **kw) + 1.0)
  model = build("mlp", weights="twn")
  with pytest.raises(ex.ExportError, match="jax runtime disagrees with the model in eval mode"):
    ex.export(model, target, model_name="mlp", input_shape=(28, 28, 1), classes=10,
              overwrite=True)
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
  np.testing.assert_array_equal(ex.load(target)(X), mlp_export[1])


class Scanned(nnx.Module):
  def __init__(self, rngs):
    self.layer = tj.TernaryLinear(784, 10, rngs=rngs)

  def __call__(self, x):
    return jax.jit(lambda x: self.layer(x))(x.reshape(x.shape[0], -1))


def test_export_rejects_what_it_cannot_represent(tmp_path):
  rngs = nnx.Rngs(0)
  args = dict(model_name="x", input_shape=(28, 28, 1), classes=10)
  small = nnx.Sequential(Flatten(), nnx.Linear(784, 5, rngs=rngs))
  for model, kw, match in [
      (small, {}, r"outputs \(5,\) per input of shape \(28, 28, 1\), expected 10 class"),
      (small, dict(input_shape=(32, 32, 3)), "tracing Sequential on input .* failed"),
      (nnx.Sequential(tj.TernaryConv(1, 10, (3, 3), padding="CIRCULAR", rngs=rngs),
                      lambda x: x.mean((1, 2))), {}, "padding 'CIRCULAR' are not exportable"),
      (Scanned(rngs), {}, "ternary layer layer runs inside (jit|pjit)"),
      (nnx.Sequential(Flatten(), nnx.Linear(784, 10, rngs=rngs), lambda x: (x, x)), {},
       "returns 2 arrays"),
  ]:
    with pytest.raises(ex.ExportError, match=match):
      ex.export(model, tmp_path / "e", **{**args, **kw})
  assert not list(tmp_path.iterdir())


def test_numpy_runtime_does_not_import_jax(mlp_export, tmp_path):
  path, logits = mlp_export
  np.save(tmp_path / "x.npy", X)
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
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"
  assert_logits_close(np.load(tmp_path / "out.npy"), logits)


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
  assert "metadata.json" in names and "export/model.onnx" in names
  assert meta["model"] == "mlp" and "accuracy: 0.5000" in card and "ternjax-predict" in card
  assert "TernaryLinear" in card and "folded into layers/1" in card and "bits/weight" in card
  np.testing.assert_array_equal(ex.load(tmp_path / "unzipped" / "export")(X), logits)


def test_size_report_counts_base3_codes(mlp_export):
  size = ex.size_report(mlp_export[0])
  assert size["ternary_weights"] == 784 * 256 + 256 * 128 + 128 * 10
  assert size["codes_bytes"] == sum(-(-n // 5) for n in (784 * 256, 256 * 128, 128 * 10))
  assert 1.6 <= size["bits_codes"] < 1.6001 and size["bits_with_scales"] < 1.7
  assert size["onnx_bits_with_scales"] == size["bits_with_scales"]  # packed in the ONNX too
  assert size["float32_bytes"] == 4 * (234752 + 256 + 128 + 10 + 3 + 4 * (256 + 128))
  assert size["orbax_bytes"] < size["float32_bytes"] / 13  # Orbax's own bytes vary by run
  assert size["onnx_bytes"] < size["float32_bytes"] / 10  # raw arrays and graph, no zstd


def test_trained_export_predict_cli_matches_training_eval(tmp_path, capsys):
  """Brief MNIST training, export, then ternjax-predict reproduces the training eval accuracy
  with every runtime, on the dataset and on PNG / JPEG files."""
  from PIL import Image

  from ternjax import data as tjdata
  from ternjax import train
  data = tjdata.load("mnist").subset(1000)
  model = MODELS["lenet5"](tj.QuantConfig(weights="ttq"), rngs=nnx.Rngs(0))
  config = train.TrainConfig(epochs=1, batch_size=100, lr=2e-3, eval_batch_size=500)
  summary = train.train_and_evaluate(config, model, data, tmp_path / "run")
  capsys.readouterr()
  path = ex.export(model, tmp_path / "export", model_name="lenet5", input_shape=(28, 28, 1),
                   classes=10, accuracy=summary["test_accuracy"], extra={"dataset": "mnist"})
  for runtime in RUNTIMES:
    assert predict.main([str(path), "--limit", "1000", "--batch-size", "300", "--json",
                         "--runtime", runtime]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 1000 and result["images_per_s"] > 0
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6), runtime
  assert summary["test_accuracy"] > 0.2  # 10 steps: learned something (chance is 0.1)
  files = [tmp_path / "a.png", tmp_path / "b.jpg"]
  Image.fromarray(data.x_test[0, :, :, 0]).save(files[0])
  Image.fromarray(data.x_test[1, :, :, 0]).convert("RGB").save(files[1], quality=100)
  assert predict.main([str(path), *map(str, files), "--json"]) == 0
  got = [r["class_index"] for r in json.loads(capsys.readouterr().out)]
  expected = np.asarray(ex.load(path)(data.x_test[:2].astype(np.float32) / 255)).argmax(-1)
  assert got[0] == expected[0]  # the PNG is lossless; the JPEG is not, so only printed


def test_predict_cli_errors_are_one_line(mlp_export, tmp_path):
  from PIL import Image
  Image.new("L", (56, 14)).save(tmp_path / "wide.png")
  (tmp_path / "text.png").write_text("not an image")
  truncated = _edited(mlp_export[0], tmp_path / "t", lambda p: _truncate(_largest_array_file(p)))
  good = str(mlp_export[0])
  cases = [([str(tmp_path / "missing")], "no such export directory"),
           ([good, "--model", "lenet5"], "not the requested"),
           ([good, "--batch-size", "0"], "must be positive"),
           ([good, str(tmp_path / "wide.png")], "is 56×14 pixels, the export takes 28×28"),
           ([good, str(tmp_path / "text.png")], "cannot identify image file"),
           ([good, str(tmp_path / "nothing.png")], "No such file")]
  cases += [([str(truncated), "--runtime", r], "does not match its checksum") for r in RUNTIMES]
  for argv, match in cases:
    _predict_refused(argv, match)


@pytest.mark.needs("cifar10")
def test_predict_cli_refuses_another_datasets_images(mlp_export):
  _predict_refused([str(mlp_export[0]), "--dataset", "cifar10"],
                   "cifar10 images are (32, 32, 3), the export takes")


def _predict_refused(argv, match):
  out = subprocess.run([sys.executable, "-m", "ternjax.predict", *argv], capture_output=True,
                       text=True, check=False)
  assert out.returncode == 2, (argv, out.stderr)
  assert match in out.stderr and "Traceback" not in out.stderr, out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("name", ["residual_cnn"])  # Net and LeNet-5: export_mnist.py's results
def test_trained_models_full_test_set_fresh_process(name, experiment, tmp_path):
  """Done-when of issue 13 (briefly trained): every runtime, in a process that never imports
  the model's code, predicts exactly what the trained model does in eval mode, here on 2,000
  MNIST test images (all 10,000: experiments/export_mnist.py and its committed results); the
  Orbax and ONNX exports keep base-3 codes, and with the scales stay within 2.1 bits per
  ternary weight."""
  import dataclasses

  from ternjax import data as tjdata
  from ternjax import train
  module = experiment("export_mnist")
  data = tjdata.load("mnist")
  data = dataclasses.replace(data, x_train=data.x_train[:2048], y_train=data.y_train[:2048],
                             x_test=data.x_test[:2000], y_test=data.y_test[:2000])
  result = module.check(name, data, tmp_path, train.TrainConfig(epochs=1, batch_size=64,
                                                                lr=3e-3))
  for runtime in ("jax", "onnxruntime", "numpy"):
    assert result[runtime]["differing_predictions"] == 0, (runtime, result[runtime])
  # 32 steps: above chance (0.1), not a degenerate model whose runtimes agree trivially
  assert result["eval_accuracy"] > 0.15 and result["test_examples"] == 2000
  assert result["size"]["bits_codes"] < 1.61  # 5 trits a byte, at most 4 trits of padding a layer
  assert result["size"]["bits_with_scales"] <= 2.1
  assert result["size"]["onnx_bits_with_scales"] == result["size"]["bits_with_scales"]


CIFAR_ZOO_CASES = {  # small versions of the CIFAR zoo architectures (the registered ones:
    # experiments/results/zoo.md): model name, builder arguments
    "vit": ("vit_tiny", dict(dim=48, depth=1, mlp_dim=96)),
    "mobilenetv2": ("mobilenetv2", dict(stages=((1, 16, 1, 1), (6, 24, 2, 2)))),
    "mobilenetv2-fp_depthwise": ("mobilenetv2", dict(stages=((6, 24, 1, 2),), fp_depthwise=True)),
    "resnet-option_A": ("resnet", dict(widths=(8, 16), depth=1, shortcut="A")),  # lax.pad
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CIFAR_ZOO_CASES)
def test_cifar_zoo_architectures_every_runtime(case, tmp_path):
  """Attention (einsums, softmax), depthwise ternary convs, zero-padded shortcuts, bfloat16
  compute (exported as float32): every runtime agrees with the model computing in float32."""
  from ternjax import models
  name, kw = CIFAR_ZOO_CASES[case]
  build = (lambda q, widths, depth, **k: models.ResNet(widths, depth, q, **k)) \
      if name == "resnet" else models.CIFAR_MODELS[name]
  model = randomize_batchnorm(build(tj.QuantConfig(weights="twn"), dtype=jnp.bfloat16,
                                    rngs=nnx.Rngs(0, quant=1), **kw))
  x = np.asarray(jax.random.uniform(jax.random.key(2), (4, 32, 32, 3)))
  path = ex.export(model, tmp_path / "e", model_name=name, input_shape=(32, 32, 3), classes=10)
  assert_every_runtime(path, eval_logits(ex._compute_dtype(model, "float32"), x), x)
  nodes = [n["spec"] for n in ex.load(path).metadata["graph"]["nodes"] if n["op"] == "ternary"]
  if name == "vit_tiny":  # the embedding and the head are float; attention and MLP ternary
    assert [n["name"] for n in nodes] == [f"blocks/0/{l}" for l in ("qkv", "out", "fc1", "fc2")]
  elif name == "mobilenetv2":
    depthwise = [n for n in nodes if n["name"].endswith("depthwise")]
    assert bool(depthwise) != kw.get("fp_depthwise", False)
    assert all(n["groups"] == n["features"] > 1 for n in depthwise)


def test_bfloat16_model_exports_its_own_codes_and_scales(tmp_path):
  """A layer computing in bfloat16 quantizes its kernel promoted to bfloat16 (TWN's threshold
  and scale from bfloat16 sums): the float32 export stores those codes and scales, not a
  float32 requantization's (which differ)."""
  from ternjax import packing
  model = nnx.Sequential(Flatten(), tj.TernaryLinear(
      512, 64, dtype=jnp.bfloat16, quant=tj.QuantConfig(weights="twn"), rngs=nnx.Rngs(0)))
  layer = model.layers[1]
  path = ex.export(model, tmp_path / "e", model_name="bf16", input_shape=(512,), classes=64,
                   onnx=False)
  meta = ex.load(path).metadata
  arrays = ex._restore_arrays(path, meta)
  t, scale, _ = layer.quant.weight_codes(layer.kernel[...].astype(jnp.bfloat16))
  np.testing.assert_array_equal(packing.unpack_trits(arrays["layers/1/codes"], (512, 64)), t)
  np.testing.assert_array_equal(arrays["layers/1/scale_pos"], np.asarray(scale, np.float32))
  _, float32_scale, _ = layer.quant.weight_codes(layer.kernel[...])
  assert not np.array_equal(np.asarray(float32_scale), np.asarray(scale, np.float32))


def test_bfloat16_export_computes_its_layers_in_bfloat16(tmp_path, monkeypatch):
  """``compute_dtype=None`` keeps a bfloat16 model's dtype: its ternary layers get their
  inputs promoted to bfloat16 (as Flax's own call does, so a GPU runs the float model's bf16
  convolutions) and return bfloat16, not float32."""
  from ternjax import ops
  model = nnx.Sequential(
      tj.TernaryConv(3, 8, (3, 3), dtype=jnp.bfloat16, quant=tj.QuantConfig(weights="twn"),
                     rngs=nnx.Rngs(0)), Flatten(),
      tj.TernaryLinear(8 * 8 * 8, 4, dtype=jnp.bfloat16, quant=tj.QuantConfig(weights="twn"),
                       rngs=nnx.Rngs(1)))
  x = np.asarray(jax.random.uniform(jax.random.key(0), (2, 8, 8, 3)))
  seen = []
  for name in ("ternary_conv", "ternary_matmul"):
    op = getattr(ops, name)
    monkeypatch.setattr(ops, name,
                        lambda x, *a, _op=op, **k: seen.append(x.dtype) or _op(x, *a, **k))
  path = ex.export(model, tmp_path / "e", model_name="bf16", input_shape=(8, 8, 3), classes=4,
                   onnx=False, compute_dtype=None, tolerance=0.1)
  seen.clear()
  out = ex.load(path)(x)
  assert seen == [jnp.bfloat16, jnp.bfloat16]
  np.testing.assert_allclose(out, np.asarray(model(x), np.float32), rtol=0.05, atol=0.05)
