"""Forward values and gradients of every quantizer, checked against hand-computed numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ternjax import quantizers as q

W = jnp.array([[0.9, -0.1], [-1.2, 0.4], [0.05, -0.6], [1.5, 0.2]])  # (in=4, out=2)


def test_twn_per_tensor_values():
  # mean|w| = 0.61875, Δ = 0.433125: |w| > Δ for 0.9, 1.2, 0.6, 1.5 -> α = 4.2 / 4
  t, alpha = q.twn_codes(W, 0.7, per_channel=False)
  np.testing.assert_array_equal(t, [[1, 0], [-1, 0], [0, -1], [1, 0]])
  np.testing.assert_allclose(alpha, 1.05, rtol=1e-6)
  np.testing.assert_array_equal(q.twn(W), np.asarray(t) * np.float32(1.05))


def test_twn_per_channel_values():
  # column 0: mean 0.9125, Δ 0.63875 -> {0.9, -1.2, 1.5}, α = 1.2; column 1: mean 0.325,
  # Δ 0.2275 -> {0.4, -0.6}, α = 0.5
  t, alpha = q.twn_codes(W, 0.7, per_channel=True)
  np.testing.assert_array_equal(t, [[1, 0], [-1, 1], [0, -1], [1, 0]])
  np.testing.assert_allclose(alpha, [[1.2, 0.5]], rtol=1e-6)


@pytest.mark.parametrize("ste,expected", [
    ("identity", np.ones((4, 2))),
    ("clipped", [[1, 1], [0, 1], [1, 1], [0, 1]]),
])
def test_twn_gradient_is_ste(ste, expected):
  g = jax.grad(lambda w: jnp.sum(q.twn(w, 0.7, True, ste) * 3.0))(W)
  np.testing.assert_allclose(g, 3.0 * np.asarray(expected, np.float32))


def test_ttq_values_and_gradients():
  ap, an = jnp.float32(2.0), jnp.float32(0.5)
  # Δ = 0.05·1.5 = 0.075: codes [[1,-1],[-1,1],[0,-1],[1,1]]
  out = q.ttq(W, ap, an, 0.05, False)
  np.testing.assert_allclose(out, [[2, -0.5], [-0.5, 2], [0, -0.5], [2, 2]])
  g_out = jnp.arange(1.0, 9.0).reshape(4, 2)
  gw, gp, gn = jax.vjp(lambda w, a, b: q.ttq(w, a, b, 0.05, False), W, ap, an)[1](g_out)
  np.testing.assert_allclose(gw, [[2 * 1, 0.5 * 2], [0.5 * 3, 2 * 4], [5, 0.5 * 6],
                                  [2 * 7, 2 * 8]])
  np.testing.assert_allclose(gp, 1 + 4 + 7 + 8)       # Σ g over the + set
  np.testing.assert_allclose(gn, -(2 + 3 + 6))        # −Σ g over the − set


def test_ttq_per_channel_scale_gradients():
  ap, an = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])
  g_out = jnp.arange(1.0, 9.0).reshape(4, 2)
  codes = q.ttq_codes(W, 0.05, True)
  # column 0: Δ = 0.075 -> [1,-1,0,1]; column 1: Δ = 0.03 -> [-1,1,-1,1]
  np.testing.assert_array_equal(codes, [[1, -1], [-1, 1], [0, -1], [1, 1]])
  _, gp, gn = jax.vjp(lambda w, a, b: q.ttq(w, a, b, 0.05, True), W, ap, an)[1](g_out)
  np.testing.assert_allclose(gp, [1 + 7, 4 + 8])
  np.testing.assert_allclose(gn, [-3, -(2 + 6)])


def test_stochastic_is_unbiased_below_its_scale_and_ternary():
  w = jnp.array([0.5, -0.25, 1.0, 0.0])  # TWN: Δ = 0.7·0.4375, support {0.5, 1.0}, α = 0.75
  keys = jax.random.split(jax.random.key(0), 4000)
  samples = jax.vmap(lambda k: q.stochastic(w, k))(keys)
  assert set(np.unique(np.asarray(samples) / 0.75).tolist()) <= {-1.0, 0.0, 1.0}
  np.testing.assert_allclose(samples.mean(0), [0.5, -0.25, 0.75, 0.0], atol=0.03)  # 1.0 clipped
  t, s = q.stochastic_codes(w, None)  # deterministic rounding for eval/export: |w| ≥ s/2
  np.testing.assert_array_equal(t, [1, 0, 1, 0])
  np.testing.assert_allclose(s, 0.75)
  g = jax.grad(lambda w: jnp.sum(q.stochastic(w, jax.random.key(1), ste="clipped") * 2.0))(
      jnp.array([0.5, -2.0]))
  np.testing.assert_allclose(g, [2.0, 0.0])


def test_stochastic_noise_moves_the_draws_to_the_rounding():
  w = jnp.array([0.5, -0.25, 1.0, 0.0])  # s = 0.75: |w|/s = 2/3, 1/3, 4/3, 0
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = lambda noise: jax.vmap(lambda k: q.stochastic_codes(w, k, noise=noise)[0])(keys)
  rounding = np.asarray(q.stochastic_codes(w, None)[0])
  np.testing.assert_array_equal(draws(0.0), np.broadcast_to(rounding, (4000, 4)))
  np.testing.assert_array_equal(draws(1.0), jax.vmap(lambda k: q.stochastic_codes(w, k)[0])(
      keys))  # the default is the plain draws
  # ν = 0.5: threshold uniform on [1/4, 3/4]: P(keep) = (p − 1/4) / (1/2), clipped to [0, 1]
  kept = np.abs(np.asarray(draws(0.5))).mean(0)
  np.testing.assert_allclose(kept, [5 / 6, 1 / 6, 1.0, 0.0], atol=0.03)


def test_ternary_activation_values_and_lsq_gradients():
  x = jnp.array([-1.5, -0.6, -0.2, 0.3, 0.8, 2.5])
  s = jnp.float32(1.0)
  np.testing.assert_allclose(q.ternary_activation(x, s, 0.5), [-1, -1, 0, 0, 1, 1])
  g = jnp.arange(1.0, 7.0)
  gx, gs = jax.vjp(lambda x, s: q.ternary_activation(x, s, 0.5), x, s)[1](g)
  np.testing.assert_allclose(gx, [0, 2, 3, 4, 5, 0])
  # inside: t − v = [-0.4, 0.2, -0.3, 0.2]; outside: sign(v) = [-1, 1]; scaled by 1/sqrt(6)
  expected = (1 * -1 + 2 * -0.4 + 3 * 0.2 + 4 * -0.3 + 5 * 0.2 + 6 * 1) / np.sqrt(6)
  np.testing.assert_allclose(gs, expected, rtol=1e-5)
  # a batch of 4 copies: the sum over the batch grows 4×; N counts one example's elements
  gs4 = jax.vjp(lambda x, s: q.ternary_activation(x, s, 0.5), jnp.tile(x, (4, 1)), s)[1](
      jnp.tile(g, (4, 1)))[1]
  np.testing.assert_allclose(gs4, 4 * expected, rtol=1e-5)


def test_int8_per_example():
  x = jnp.array([[0.0, 1.27, -2.54], [0.5, -0.25, 0.125]])
  codes, scale = q.int8_codes(x)
  np.testing.assert_array_equal(codes, [[0, 64, -127], [127, -64, 32]])
  np.testing.assert_allclose(scale, [[0.02], [0.5 / 127]], rtol=1e-6)
  np.testing.assert_allclose(q.int8(x), codes * scale, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(q.int8(x) * 2))(x), 2 * np.ones((2, 3)))


def test_bad_ste_mode_raises():
  with pytest.raises(ValueError, match="ste must be one of"):
    q.twn(W, ste="nope")
