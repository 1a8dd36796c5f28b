"""ADMM ternary training: the projection, the dual update, the penalty, its state in training
and checkpoints (the export of an ADMM-trained LeNet-5: tests/test_compare.py)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ternjax as tj
from ternjax import data, train
from ternjax import quantizers as q
from ternjax.layers import quant_penalty, quant_update, quantized_layers


def _error(w, t, alpha, axis=None):
  return np.sum((np.asarray(w) - np.asarray(alpha) * np.asarray(t)) ** 2, axis=axis)


def test_ternary_fit_scale_is_optimal_for_its_support_and_codes_nearest():
  w = jax.random.normal(jax.random.key(0), (6, 3)) * jnp.array([0.1, 1.0, 3.0])
  t, alpha = q.ternary_fit(w, per_channel=True)
  assert t.dtype == jnp.int8 and alpha.shape == (1, 3)
  w, t, alpha = np.asarray(w), np.asarray(t), np.asarray(alpha)
  for c in range(3):
    # closed form for the support: α = mean |w| over it; and no α on a fine grid does better
    support = t[:, c] != 0
    np.testing.assert_allclose(alpha[0, c], np.abs(w[support, c]).mean(), rtol=1e-6)
    grid = np.linspace(0, 2 * alpha[0, c], 4001)
    errors = ((w[:, c, None] - grid * t[:, c, None]) ** 2).sum(0)
    assert _error(w[:, c], t[:, c], alpha[0, c]) <= errors.min() + 1e-6
    # for that α, every code is the nearest of {-α, 0, α}
    choices = np.abs(w[:, c, None] - alpha[0, c] * np.array([-1, 0, 1]))
    np.testing.assert_allclose(np.abs(w[:, c] - alpha[0, c] * t[:, c]), choices.min(1),
                               atol=1e-6)


def test_ternary_fit_reaches_the_best_ternary_fit():
  """Against the exact optimum (the best support of every size k: the k largest |w|, by
  sorting): never worse than TWN, within 1e-4 of the optimum on Gaussian kernels."""
  w = np.asarray(jax.random.normal(jax.random.key(1), (300, 8)))
  t, alpha = q.ternary_fit(jnp.asarray(w), per_channel=True)
  fit = _error(w, t, alpha, axis=0)
  v = -np.sort(-np.abs(w), axis=0)
  k = np.arange(1, len(w) + 1)[:, None]
  best = (w ** 2).sum(0) - np.max(np.cumsum(v, 0) ** 2 / k, axis=0)
  t_twn, a_twn = q.twn_codes(jnp.asarray(w), per_channel=True)
  assert np.all(fit <= _error(w, t_twn, a_twn, axis=0) + 1e-5)
  np.testing.assert_allclose(fit, best, rtol=1e-4)  # float32 sums: never far below either


def _layer(**quant):
  config = tj.QuantConfig(weights="admm", admm_rho=0.5, admm_growth=2.0, admm_every=3, **quant)
  return tj.TernaryLinear(40, 6, quant=config, use_bias=False, rngs=nnx.Rngs(0))


def _state(layer):
  wq = layer.quant.weight_quantizer
  return wq.g[...], wq.u[...], wq.rho[...]


def test_initial_state_and_forward_modes():
  layer = _layer()
  w = layer.kernel[...]
  g, u, rho = _state(layer)
  t, alpha = q.ternary_fit(w, per_channel=True)
  np.testing.assert_array_equal(g, alpha * t)
  assert not np.any(u) and float(rho) == 0.5
  x = jax.random.normal(jax.random.key(2), (4, 40))
  np.testing.assert_allclose(layer(x), x @ w, rtol=1e-6)           # training: the float W
  layer.eval()
  np.testing.assert_allclose(layer(x), x @ (alpha * t), rtol=1e-6)  # eval: the projection
  codes, scale, neg = layer.quant.weight_codes(w)
  np.testing.assert_array_equal(codes, t)
  np.testing.assert_array_equal(scale, alpha[0])
  assert neg is None


def test_dual_update_every_k_steps():
  layer = _layer()
  wq = layer.quant.weight_quantizer
  wq.u[...] = 0.05 * jax.random.normal(jax.random.key(3), wq.u.shape)
  layer.kernel[...] = layer.kernel[...] * 1.5          # W moved away from G
  w = layer.kernel[...]
  before = _state(layer)
  update = nnx.jit(lambda m, s: quant_update(m, s))
  for step in (1, 2, 4):
    update(layer, jnp.int32(step))
    for a, b in zip(_state(layer), before):
      np.testing.assert_array_equal(a, b)
  update(layer, jnp.int32(3))
  g, u, rho = _state(layer)
  t, alpha = q.ternary_fit(w + before[1], per_channel=True)
  np.testing.assert_allclose(g, alpha * t, rtol=1e-6)                 # G = Π(W + U)
  np.testing.assert_allclose(u, before[1] + w - g, rtol=1e-6, atol=1e-7)  # U += W − G
  assert float(rho) == 1.0                                            # ρ·growth
  assert not np.array_equal(g, before[0])


def test_stochastic_anneal_reaches_the_deployed_rounding():
  quant = tj.QuantConfig(weights="stochastic", stochastic_anneal=4)
  layer = tj.TernaryLinear(16, 8, quant=quant, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 16))
  update = nnx.jit(lambda m, s: quant_update(m, s))
  update(layer, jnp.int32(1))
  assert float(layer.quant.weight_quantizer.noise[...]) == 0.75
  assert not np.allclose(layer(x), layer(x))  # draws
  update(layer, jnp.int32(6))
  assert float(layer.quant.weight_quantizer.noise[...]) == 0.0
  layer.eval()
  deployed = layer(x)
  layer.train()
  np.testing.assert_allclose(layer(x), deployed, rtol=1e-6)  # training forward = eval's
  with pytest.raises(ValueError, match="stochastic_anneal"):
    tj.QuantConfig(weights="stochastic", stochastic_anneal=-1)


def test_penalty_value_and_gradient():
  model = nnx.Sequential(_layer(), tj.models.ReLU(), _layer())
  for i in (0, 2):
    wq = model.layers[i].quant.weight_quantizer
    wq.u[...] = 0.1 * jax.random.normal(jax.random.key(i), wq.u.shape)
  grads = nnx.grad(quant_penalty)(model)
  expected = 0.0
  for i in (0, 2):
    layer = model.layers[i]
    g, u, rho = _state(layer)
    r = layer.kernel[...] - g + u
    expected += 0.5 * rho * jnp.sum(r * r)
    np.testing.assert_allclose(grads["layers"][i]["kernel"][...], rho * r, rtol=1e-5)
  np.testing.assert_allclose(quant_penalty(model), expected, rtol=1e-6)
  assert quant_penalty(tj.models.mlp(tj.QuantConfig(weights="ttq"), rngs=nnx.Rngs(0))) is None


def test_state_is_not_trained_by_the_optimizer():
  layer = _layer()
  opt = nnx.Optimizer(layer, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
  shapes = lambda tree: sorted(a.shape for a in jax.tree.leaves(tree))
  assert shapes(opt.opt_state) == shapes(nnx.state(layer, nnx.Param))  # momentum of W only
  x = jax.random.normal(jax.random.key(4), (8, 40))
  before, kernel = _state(layer), layer.kernel[...]
  loss = lambda m: jnp.mean(m(x) ** 2) + quant_penalty(m)
  opt.update(layer, nnx.grad(loss)(layer))
  assert not np.allclose(layer.kernel[...], kernel)
  for a, b in zip(_state(layer), before):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def small():
  return data.load("mnist").subset(256)


def _mlp(**quant):
  config = tj.QuantConfig(weights="admm", **quant)
  return tj.models.mlp(config, rngs=nnx.Rngs(default=0, quant=1))


def _distance_to_ternary(model):
  """Σ ‖W − Π(W)‖² over the ADMM layers: how far the float weights are from ternary."""
  return sum(float(jnp.sum((layer.kernel[...] - quant.weight_quantizer._project(
      layer.kernel[...])) ** 2)) for layer, quant in quantized_layers(model))


@pytest.mark.slow
def test_admm_steps_reduce_loss_distance_and_penalty(small):
  """50 ADMM steps (dual updates every 5): the projected model's loss falls, W comes closer
  to ternary, and each run of W-steps between dual updates lowers the penalty (which, summed
  with the dual variable's growth, may rise over the whole run)."""
  model = _mlp(admm_rho=1.0, admm_growth=1.0, admm_every=5)
  opt = nnx.Optimizer(model, optax.adam(optax.linear_schedule(3e-3, 0.0, 50)), wrt=nnx.Param)
  x, y = train.preprocess(jnp.asarray(small.x_train[:128])), jnp.asarray(small.y_train[:128])

  def projected_loss(m):
    m.eval()
    loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    m.train()
    return float(loss)

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: train.loss_fn(m, x, y)[0])(model)
    opt.update(model, grads)
    quant_update(model, opt.step[...])

  first = projected_loss(model), _distance_to_ternary(model)
  penalties = []
  for _ in range(50):
    step(model, opt)
    penalties.append(float(quant_penalty(model)))
  last = projected_loss(model), _distance_to_ternary(model)
  assert last[0] < 0.6 * first[0] and last[1] < 0.3 * first[1], (first, last)
  after_update, before_next = penalties[4::5][:-1], penalties[8::5]
  assert all(b < a for a, b in zip(after_update, before_next)), penalties
  assert np.any(model.layers[1].quant.weight_quantizer.u[...])  # dual updates happened


def _leaves(model):
  return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model))]


@pytest.mark.slow
def test_admm_state_survives_checkpoint_and_resume(small, tmp_path):
  """A run that lost its last epoch resumes to the same parameters and ADMM state, bit for
  bit, as the uninterrupted run."""
  config = train.TrainConfig(epochs=2, batch_size=64, shift=1)
  quant = dict(admm_rho=1e-3, admm_growth=1.5, admm_every=3)
  full = _mlp(**quant)
  train.train_and_evaluate(config, full, small, tmp_path / "full")
  wq = full.layers[1].quant.weight_quantizer
  assert float(wq.rho[...]) == pytest.approx(1e-3 * 1.5 ** 2)  # 8 steps: updates at 3 and 6
  shutil.copytree(tmp_path / "full", tmp_path / "cut")
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "2")
  resumed = _mlp(**quant)
  summary = train.train_and_evaluate(config, resumed, small, tmp_path / "cut", resume=True)
  assert summary["resumed_from_epoch"] == 1
  a, b = _leaves(full), _leaves(resumed)
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
