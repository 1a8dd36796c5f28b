"""ternjax.ternarize: a user's float model (plain nnx.Linear / nnx.Conv) to its ternary twin."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ternjax as tj
from ternjax import models

X = jax.random.uniform(jax.random.key(0), (8, 8, 8, 3))


class Net(nnx.Module):
  """A user's float model; attribute names sort unlike the call order (first: 'stem')."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.body = nnx.Conv(8, 16, (3, 3), strides=2, padding="VALID", rngs=rngs)
    self.hidden = nnx.Linear(16, 32, rngs=rngs)
    self.classifier = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.stem(x)))
    x = nnx.relu(self.body(x)).mean(axis=(1, 2))
    return self.classifier(nnx.relu(self.hidden(x)))


def _twn(w, delta=0.7):
  """TWN per output channel, written out: Δ = δ·mean|w|, α = mean |w| over |w| > Δ."""
  axes = tuple(range(w.ndim - 1))
  t = np.sign(w) * (np.abs(w) > delta * np.abs(w).mean(axes, keepdims=True))
  alpha = (np.abs(w) * np.abs(t)).sum(axes, keepdims=True) / np.abs(t).sum(axes, keepdims=True)
  return alpha * t


def test_twin_copies_weights_and_computes_ternary():
  net = Net(nnx.Rngs(0))
  twin = tj.ternarize(net, sample_input=X[:1])
  assert type(twin.stem) is nnx.Conv and type(twin.classifier) is nnx.Linear  # first, last
  assert isinstance(twin.body, tj.TernaryConv) and isinstance(twin.hidden, tj.TernaryLinear)
  assert type(twin.norm) is nnx.BatchNorm and type(net.body) is nnx.Conv  # original unchanged
  for name in ("body", "hidden"):
    np.testing.assert_array_equal(getattr(twin, name).kernel[...], getattr(net, name).kernel[...])
    np.testing.assert_array_equal(getattr(twin, name).bias[...], getattr(net, name).bias[...])
  assert twin.body.strides == 2 and twin.body.padding == "VALID"

  # The twin computes the float network with TWN-ternarized kernels (eval mode: running stats).
  twin.eval()
  reference = nnx.clone(net)
  reference.eval()
  for name in ("body", "hidden"):
    layer = getattr(reference, name)
    layer.kernel[...] = jnp.asarray(_twn(np.asarray(layer.kernel[...])))
  np.testing.assert_allclose(twin(X), reference(X), rtol=1e-5, atol=1e-5)
  net.eval()
  assert not np.allclose(twin(X), net(X), atol=1e-3)


def test_rules_choose_per_layer_and_ttq_scales_from_kernel():
  net = Net(nnx.Rngs(1))
  rules = [tj.Rule(r"hidden", None), tj.Rule(r"b.*", tj.QuantConfig(weights="ttq")),
           tj.Rule(r".*", tj.QuantConfig(weights="twn"))]
  twin = tj.ternarize(net, rules, sample_input=X[:1], keep_first=False)
  assert type(twin.hidden) is nnx.Linear and type(twin.classifier) is nnx.Linear
  assert isinstance(twin.stem, tj.TernaryConv) and twin.stem.quant.config.weights == "twn"
  assert twin.body.quant.config.weights == "ttq"
  w = np.asarray(net.body.kernel[...]).reshape(-1, 16)
  delta = 0.05 * np.abs(w).max(0)
  expected = [np.array([w[w[:, c] > delta[c], c].mean() for c in range(16)]),
              np.array([-w[w[:, c] < -delta[c], c].mean() for c in range(16)])]
  scales = [np.asarray(v) for v in jax.tree.leaves(nnx.state(twin.body.quant, nnx.Param))]
  assert len(scales) == 2
  assert all(any(np.allclose(got, want, rtol=1e-5) for got in scales) for want in expected)
  with pytest.raises(ValueError, match="sample_input"):
    tj.ternarize(net)
  both = tj.ternarize(net, keep_first=False, keep_last=False)
  assert isinstance(both.stem, tj.TernaryConv) and isinstance(both.classifier, tj.TernaryLinear)


def test_ternjax_float_resnet_converts_and_twin_trains():
  net = models.resnet20(tj.QuantConfig(weights="fp"), rngs=nnx.Rngs(0))
  twin = tj.ternarize(net, [tj.Rule(r".*", tj.QuantConfig(weights="ttq"))],
                      sample_input=jnp.zeros((1, 32, 32, 3)))
  assert twin.stem.quant.config.weights == "fp" and twin.head.quant.config.weights == "fp"
  assert all(b.conv1.quant.config.weights == "ttq" for b in twin.blocks)
  np.testing.assert_array_equal(twin.blocks[4].conv2.kernel[...], net.blocks[4].conv2.kernel[...])

  x = jax.random.uniform(jax.random.key(1), (16, 32, 32, 3))
  y = jnp.arange(16) % 10
  optimizer = nnx.Optimizer(twin, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(twin, optimizer)) for _ in range(8)]
  assert losses[-1] < 0.8 * losses[0]
