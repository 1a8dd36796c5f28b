"""CIFAR-10 models and experiments/cifar10.py: build and run, learn, smoke run, bad arguments."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ternjax as tj
from ternjax import data, models, train

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "cifar10.py"
_spec = importlib.util.spec_from_file_location("cifar10_cli", SCRIPT)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


@pytest.fixture(scope="module")
def cifar():
  if data.find("cifar10") is None:
    pytest.skip("CIFAR-10 files not found (set TERNJAX_DATA to a folder holding cifar10/)")
  return data.load("cifar10")


@pytest.mark.parametrize("name", list(models.CIFAR_MODELS))
def test_models_build_and_run(name):
  """bf16 compute checked by shape (bf16 convs are slow on CPU), on an abstract model (no
  initialization computed); float32 runs for real."""
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  ternary = nnx.eval_shape(lambda: models.CIFAR_MODELS[name](
      tj.QuantConfig(weights="twn"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  y = nnx.eval_shape(lambda m, x: m(x), ternary, x)
  assert y.shape == (2, 10) and y.dtype == jnp.bfloat16
  params = jax.tree.leaves(nnx.state(ternary, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  layers = [m for _, m in nnx.iter_modules(ternary) if isinstance(m, (tj.TernaryConv,
                                                                      tj.TernaryLinear))]
  weights = [m.quant.config.weights for m in layers]
  # first conv float (ViT: and the head), the rest ternary
  assert weights.count("fp") == (2 if name == "vit_tiny" else 1) and len(layers) >= 8
  both = models.CIFAR_MODELS[name](tj.QuantConfig(weights="ttq", activations="ternary"),
                                   fp_first=False, fp_last=True, rngs=nnx.Rngs(0))
  order = tj.convert.call_order(both, x[:1])
  named = {".".join(map(str, path)): m for path, m in nnx.iter_modules(both)}
  assert [named[n].quant.config.weights for n in (order[0], order[-1])] == ["ttq", "fp"]
  y = nnx.jit(lambda m, x: m(x))(both, x)  # jitted: op-by-op MobileNetV2 takes ~5x longer
  assert y.shape == (2, 10) and bool(jnp.isfinite(y).all())


def test_resnet_sizes_and_shortcuts():
  r20 = models.resnet20(tj.QuantConfig(weights="fp"), rngs=nnx.Rngs(0))
  r18 = models.resnet18(tj.QuantConfig(weights="fp"), rngs=nnx.Rngs(0))
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(r20) == 269_722 and count(r18) == 11_173_962  # the papers' 0.27 M and 11.2 M
  assert len(r20.blocks) == 9 and all(b.projection is None for b in r20.blocks)  # option A
  assert [b.projection is not None for b in r18.blocks] == [False, False, True, False] * 1 + \
      [True, False, True, False]
  x = jnp.arange(2 * 8 * 8 * 16, dtype=jnp.float32).reshape(2, 8, 8, 16)
  short = r20.blocks[3].shortcut(x)  # 16 -> 32 channels, stride 2: zero-padded channels
  assert short.shape == (2, 4, 4, 32)
  np.testing.assert_array_equal(short[..., 8:24], x[:, ::2, ::2])
  assert float(jnp.abs(short[..., :8]).sum() + jnp.abs(short[..., 24:]).sum()) == 0


def test_training_reduces_loss(cifar, tmp_path):
  config = train.TrainConfig(epochs=3, batch_size=8, optimizer="sgd", nesterov=True, lr=0.01,
                             schedule="constant", label_smoothing=0.1, shift=4, flip=True)
  model = models.resnet20(tj.QuantConfig(weights="twn"), rngs=nnx.Rngs(0))
  train.train_and_evaluate(config, model, cifar.subset(32), tmp_path / "run")
  history = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_smoke_run_writes_everything_then_init_from(cifar, tmp_path, capsys):
  out = tmp_path / "float"
  result = cli.main(["--weights", "fp", "--limit", "32", "--epochs", "1", "--batch-size", "16",
                     "--dtype", "float32", "--out", str(out)])
  assert "final test accuracy" in capsys.readouterr().out
  for name in ("config.json", "metrics.jsonl", "summary.json", "report.json", "confusion.png",
               "confidence.png"):
    assert (out / name).exists(), name
  report = json.loads((out / "report.json").read_text())
  assert report["top1"] == pytest.approx(result["test_accuracy"])
  assert report["subsets"]["exact"]["examples"] == 32
  assert result["test_accuracy_exact"] == pytest.approx(result["test_accuracy"])
  record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
  assert record["images_per_s"] > 0 and record["compile_time"] > 0

  # --init-from: the ternary twin of the float run's checkpoint (first conv float by default).
  args = cli.parse_args(["--weights", "twn", "--init-from", str(out), "--dtype", "float32",
                         "--out", str(tmp_path / "ft")])
  twin = cli.build_model(args)
  restored = cli.build_model(cli.parse_args(["--weights", "fp", "--dtype", "float32"]))
  train.restore_model(out, restored)
  np.testing.assert_array_equal(twin.blocks[2].conv1.kernel[...],
                                restored.blocks[2].conv1.kernel[...])
  assert twin.blocks[2].conv1.quant.config.weights == "twn"
  assert twin.stem.quant.config.weights == "fp" and twin.head.quant.config.weights == "twn"
  ternary_run = tmp_path / "twn"
  cli.main(["--limit", "32", "--epochs", "1", "--batch-size", "16", "--dtype", "float32",
            "--out", str(ternary_run)])
  with pytest.raises(SystemExit) as exit_:  # only from a float run
    cli.main(["--limit", "32", "--init-from", str(ternary_run), "--out", str(tmp_path / "x")])
  assert exit_.value.code == 2 and "float" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--model", "resnet50"], "--model"),
    (["--epochs", "0"], "epochs"),
    (["--label-smoothing", "1.5"], "label_smoothing"),
    (["--limit", "0"], "--limit"),
    (["--dtype", "float16"], "--dtype"),
    (["--init-from", "/nonexistent"], "--init-from"),
    (["--model", "resnet20", "--fp-depthwise"], "--fp-depthwise applies to --model mobilenetv2"),
])
def test_bad_arguments_one_line(argv, words, refused, tmp_path):
  err = refused(cli.main, argv + ["--out", str(tmp_path / "run")])
  assert words in err, err


def test_model_defaults_and_fp_depthwise(tmp_path):
  """ViT's head is float unless --no-fp-last; --fp-depthwise keeps MobileNetV2's depthwise
  convs float (in the run's name too)."""
  parse = lambda *a: cli.parse_args([*a, "--out", str(tmp_path / "r")])
  assert parse("--model", "vit_tiny").fp_last is True
  assert parse("--model", "vit_tiny", "--no-fp-last").fp_last is False
  assert parse("--model", "resnet20").fp_last is False
  args = cli.parse_args(["--model", "mobilenetv2", "--fp-depthwise"])
  assert args.out == "runs/cifar10-mobilenetv2-twn-fpdw-s0"
  convs = [m for _, m in nnx.iter_modules(cli.build_model(args))
           if isinstance(m, tj.TernaryConv) and m.in_features > 3]  # all but the stem
  weights = {(m.feature_group_count > 1, m.quant.config.weights) for m in convs}
  assert weights == {(True, "fp"), (False, "twn")}


def test_bad_argument_subprocess_exit_2():
  proc = subprocess.run([sys.executable, str(SCRIPT), "--weights", "binary"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--weights" in proc.stderr
