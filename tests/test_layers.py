"""Ternary NNX layers: forward uses the quantized kernel, mixed models train."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ternjax as tj
from ternjax import ops, packing
from ternjax import quantizers as q


def test_linear_forward_uses_ternary_kernel():
  layer = tj.TernaryLinear(6, 3, quant=tj.QuantConfig(weights="twn"), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 6))
  t, alpha = q.twn_codes(layer.kernel[...], 0.7, True)
  expected = x @ (alpha * t) + layer.bias[...]
  np.testing.assert_allclose(layer(x), expected, rtol=1e-6)


def test_fp_config_is_the_float_layer():
  layer = tj.TernaryLinear(6, 3, quant=tj.QuantConfig(weights="fp"), rngs=nnx.Rngs(0))
  ref = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 6))
  np.testing.assert_allclose(layer(x), ref(x), rtol=1e-6)


@pytest.mark.parametrize("weights", ["twn", "ttq", "stochastic"])
@pytest.mark.parametrize("activations", ["ternary", "int8"])
def test_integer_inference_form_matches_forward(weights, activations):
  """weight_codes / input_codes through ternary_matmul give the layer's eval output."""
  cfg = tj.QuantConfig(weights=weights, activations=activations)
  layer = tj.TernaryLinear(40, 5, quant=cfg, use_bias=False, rngs=nnx.Rngs(0, quant=1))
  layer.eval()
  x = jax.random.normal(jax.random.key(2), (3, 40))
  t, sp, sn = layer.quant.weight_codes(layer.kernel[...])
  codes, xs = layer.quant.input_codes(x)
  out = ops.ternary_matmul(codes, packing.pack_bitplanes(t, 0), x_ternary=activations == "ternary",
                           x_scale=xs, w_scale=sp, w_scale_neg=sn)
  np.testing.assert_allclose(out, layer(x), rtol=1e-5, atol=1e-5)


def test_conv_forward_and_patches_path():
  cfg = tj.QuantConfig(weights="twn", activations="ternary", act_scale_init=0.5)
  conv = tj.TernaryConv(3, 4, (3, 3), quant=cfg, use_bias=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 7, 7, 3))
  t, sp, _ = conv.quant.weight_codes(conv.kernel[...])
  codes, xs = conv.quant.input_codes(x)
  out = ops.ternary_conv(codes, packing.pack_bitplanes(ops.kernel_to_matrix(t), 0),
                         window=(3, 3), padding="SAME", x_ternary=True, x_scale=xs, w_scale=sp)
  np.testing.assert_allclose(out, conv(x), rtol=1e-5, atol=1e-5)


def test_bad_config_raises():
  with pytest.raises(ValueError, match="weights must be one of"):
    tj.QuantConfig(weights="binary")
  with pytest.raises(ValueError, match="delta must be positive"):
    tj.QuantConfig(delta=0)


class Mixed(nnx.Module):
  """Full-precision first and last layers around ternary conv / linear layers with BatchNorm."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv2 = tj.TernaryConv(8, 8, (3, 3), quant=tj.QuantConfig(weights="ttq"), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.fc1 = tj.TernaryLinear(8 * 8 * 8, 32, rngs=rngs,
                                quant=tj.QuantConfig(weights="twn", activations="ternary"))
    self.fc2 = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.bn(self.conv2(x)))
    x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
    return self.fc2(x)


def test_mixed_model_trains_with_plain_optimizer():
  model = Mixed(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (32, 8, 8, 1))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 4)

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  alpha_before = model.conv2.quant.alpha_pos[...]
  losses = [float(step(model, opt)) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0], losses
  assert not np.allclose(model.conv2.quant.alpha_pos[...], alpha_before)  # TTQ scales learn
  assert float(model.fc1.quant.act_scale[...]) != 1.0                     # activation scale too


@pytest.fixture
def restore_registry():
  """Registrations made by a test are undone after it."""
  saved = dict(q.WEIGHT_QUANTIZERS), dict(q.ACTIVATION_QUANTIZERS)
  yield
  for table, before in zip((q.WEIGHT_QUANTIZERS, q.ACTIVATION_QUANTIZERS), saved):
    table.clear()
    table.update(before)


def test_a_new_method_is_one_class_and_one_registry_line(restore_registry):
  class Calls(q.QuantState):
    """Training forwards so far: state that is not trained."""

  @q.register("sign")
  class Sign(q.WeightQuantizer):
    """Binary ±1 weights (no zeros) with a learned per-channel scale."""

    def __init__(self, config, kernel, *, rngs):
      super().__init__(config, kernel, rngs=rngs)
      self.scale = nnx.Param(jnp.mean(jnp.abs(kernel), axis=0))
      self.calls = Calls(jnp.zeros((), jnp.int32))

    def __call__(self, kernel, *, deterministic=False):
      self.calls[...] += 1
      return q.straight_through(kernel, jnp.where(kernel >= 0, 1.0, -1.0)) * self.scale[...]

    def codes(self, kernel):
      return jnp.where(kernel >= 0, 1, -1).astype(jnp.int8), self.scale[...], None

  assert "sign" in tj.layers.WEIGHT_METHODS
  layer = tj.TernaryLinear(12, 4, quant=tj.QuantConfig(weights="sign", activations="ternary"),
                           use_bias=False, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(4), (16, 12))
  y = jax.random.normal(jax.random.key(5), (16, 4))

  @nnx.jit
  def step(layer, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(layer)
    opt.update(layer, grads)
    return loss

  scale_before = layer.quant.scale[...]
  losses = [float(step(layer, opt)) for _ in range(5)]
  assert losses[-1] < losses[0], losses
  assert not np.allclose(layer.quant.scale[...], scale_before)   # nnx.Param: trained
  assert int(layer.quant.weight_quantizer.calls[...]) == 5       # QuantState: kept, not trained
  t, sp, sn = layer.quant.weight_codes(layer.kernel[...])
  assert set(np.unique(t).tolist()) <= {-1, 1} and sp.shape == (4,) and sn is None
  assert tj.train.weight_sparsity(nnx.Sequential(layer)) == 0.0
  layer.eval()
  codes, xs = layer.quant.input_codes(x)
  out = ops.ternary_matmul(codes, packing.pack_bitplanes(t, 0), x_ternary=True, x_scale=xs,
                           w_scale=sp)
  np.testing.assert_allclose(out, layer(x), rtol=1e-5, atol=1e-5)
