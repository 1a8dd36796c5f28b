"""experiments/speedrun.py and its pieces: the whitening stem whitens, flips alternate, the test
-time augmentation averages the right views, the scanned training learns and keeps the frozen
and the finished parameters fixed, bad arguments are one line."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ternjax import models, train

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "speedrun.py"
_spec = importlib.util.spec_from_file_location("speedrun_cli", SCRIPT)
speedrun = sys.modules["speedrun_cli"] = importlib.util.module_from_spec(_spec)  # dataclasses
_spec.loader.exec_module(speedrun)


# One tiny recipe for the training tests (its jitted model initialization compiles once).
TINY = dataclasses.replace(speedrun.Recipe(), widths=(8, 8, 8), batch_size=16, epochs=6,
                           whiten_images=64, whiten_bias_epochs=2, dtype="float32")


def _correlated_images(n=64, seed=0):
  """Smooth, channel-correlated NHWC images (their 2×2 patches are far from white)."""
  noise = jax.random.normal(jax.random.key(seed), (n, 33, 33, 3))
  smooth = noise[:, 1:, 1:] + noise[:, :-1, :-1] + 0.5 * noise[:, 1:, :-1]
  return smooth @ jnp.array([[1.0, 0.8, 0.6], [0.0, 0.5, 0.3], [0.0, 0.0, 0.2]]) + 0.3


def test_whitening_stem_whitens():
  images = _correlated_images()
  @jax.jit
  def whiten(images):
    kernel = models.whitening_kernel(images, eps=1e-9)
    return kernel, jax.lax.conv_general_dilated(images, kernel, (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  kernel, out = whiten(images)
  assert kernel.shape == (2, 2, 3, 24)
  flat = out.reshape(-1, 24)
  cov = flat.T @ flat / len(flat)  # uncentred, as the kernel is computed
  np.testing.assert_allclose(cov[:12, :12], np.eye(12), atol=2e-3)
  np.testing.assert_allclose(flat[:, 12:], -flat[:, :12], atol=1e-5)  # the negated half
  raw = images[:, :31, :31].reshape(-1, 3)
  assert np.abs(np.corrcoef(raw.T)[0, 1]) > 0.5  # the input was far from white


def test_alternating_flip_and_tta():
  x = jax.random.normal(jax.random.key(1), (6, 4, 5, 3))
  idx, key = jnp.arange(10, 16), jax.random.key(2)
  flip = jax.jit(train.alternating_flip)
  even, odd = (flip(x, idx, key, e) for e in (2, 3))
  for a, b, img in zip(even, odd, x):  # each image one way in one epoch, the other in the next
    assert {bool((a == img).all()), bool((b == img).all())} == {True, False}
    np.testing.assert_array_equal(a[:, ::-1], b)
  np.testing.assert_array_equal(flip(x, idx, key, 4), even)

  apply = lambda v: v.mean(axis=(1, 3))  # (n, w): sees left-right order and shifts
  plain, mirror, both = jax.jit(lambda v: train.tta_logits(apply, v))(x)
  assert plain.shape == mirror.shape == both.shape == (6, 5)
  np.testing.assert_allclose(plain, apply(x))
  np.testing.assert_allclose(mirror, 0.5 * (apply(x) + apply(x[:, :, ::-1])), rtol=1e-6)
  assert not np.allclose(both, mirror)  # the translated views count


@pytest.mark.slow  # ~15 s of compilation on a loaded 2-core CPU
def test_scanned_training_learns_and_freezes():
  """A tiny airbench net on 64 images for 6 epochs: the loss falls, the stem holds the
  whitening of the data, the filters moved."""
  recipe = TINY
  rng = np.random.default_rng(0)
  labels = np.arange(64) % 10
  colors = rng.integers(40, 216, (10, 1, 1, 3))  # a colour per class, under noise
  images = jnp.asarray(np.clip(colors[labels] + rng.normal(0, 30, (64, 32, 32, 3)), 0, 255),
                       jnp.uint8)
  labels = jnp.asarray(labels, jnp.int32)
  model = speedrun.build_model(recipe, 0)
  model.train()
  optimizer = nnx.Optimizer(model, speedrun.make_optimizer(recipe, 4), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  fn = speedrun.make_train(graphdef, recipe, 64)
  state, (losses, corrects) = fn(state, images, labels, jax.random.key(0))
  nnx.update((model, optimizer), state)
  epochs = np.asarray(losses).reshape(6, 4).mean(1) / recipe.batch_size  # summed -> mean
  assert np.isfinite(epochs).all() and epochs[-1] < 0.8 * epochs[0], epochs
  # the stem holds the whitening of the first images (up to eigenvector signs: K·Kᵀ = 2·W)
  gram = lambda k: (lambda m: m @ m.T)(np.asarray(k).reshape(12, 24))
  expected = models.whitening_kernel(speedrun.normalize(images), eps=recipe.whiten_eps)
  np.testing.assert_allclose(gram(model.stem.kernel[...]), gram(expected), rtol=2e-3, atol=1e-3)
  assert not np.allclose(gram(before["stem"]["kernel"]), gram(expected), rtol=0.1)
  assert not np.allclose(model.groups[1].conv2.kernel[...], before["groups"][1]["conv2"]["kernel"])


@pytest.mark.slow
def test_optimizer_groups():
  """The whitening kernel never moves, the stem's bias stops after whiten_bias_epochs, the head
  and the BatchNorm biases keep moving, Muon's filters end at Frobenius norm ≈ sqrt(out)."""
  recipe = TINY
  model = speedrun.build_model(recipe, 0)
  optimizer = nnx.Optimizer(model, speedrun.make_optimizer(recipe, 4), wrt=nnx.Param)
  noise = lambda params: jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
  watched = lambda: [np.array(v) for v in (model.stem.kernel[...], model.stem.bias[...],
                                          model.head.kernel[...], model.groups[0].bn1.bias[...])]
  history = [watched()]
  step = nnx.jit(lambda model, optimizer: optimizer.update(
      model, noise(nnx.state(model, nnx.Param))))
  for _ in range(12):
    step(model, optimizer)
    history.append(watched())
  moved = lambda i, a, b: not np.array_equal(history[a][i], history[b][i])
  assert not moved(0, 0, 12)                                  # frozen whitening kernel
  assert moved(1, 0, 8) and not moved(1, 8, 12)               # stem bias: 8 steps only
  assert moved(2, 8, 12) and moved(3, 8, 12)                  # the rest keeps training
  kernel = model.groups[1].conv2.kernel[...]
  assert abs(float(jnp.linalg.norm(kernel)) / np.sqrt(kernel.shape[-1]) - 1) < 0.5


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "300", "--limit", "200"], "exceeds the 200 training examples"),
    (["--runs", "0"], "--runs: must be an integer of at least 1"),
    (["--ablation", "fp-nothing"], "--ablation: invalid choice"),
])
def test_bad_arguments_are_one_line(tmp_path, argv, message):
  proc = subprocess.run([sys.executable, str(SCRIPT), *argv, "--out", str(tmp_path)],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
