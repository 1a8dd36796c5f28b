"""summary(model, x): rows in call order, parameters and packed bytes add up, MACs."""

import jax
import jax.numpy as jnp
from flax import nnx
from test_layers import Mixed

import ternjax as tj


class Residual(nnx.Module):
  """Attributes in another order than the calls; a shortcut; attention (MACs of its own)."""

  def __init__(self, rngs):
    self.head = nnx.Linear(16, 4, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(2, 16, rngs=rngs, decode=False)
    self.shortcut = tj.TernaryConv(1, 16, (1, 1), strides=2, rngs=rngs)
    self.conv = tj.TernaryConv(1, 16, (3, 3), strides=2, rngs=rngs,
                               quant=tj.QuantConfig(weights="ttq", activations="ternary"))

  def __call__(self, x):
    x = self.conv(x) + self.shortcut(x)
    t = x.reshape(x.shape[0], -1, 16)
    return self.head((t + self.attention(t)).mean(1))


def test_summary_table_in_call_order():
  model = Mixed(nnx.Rngs(0))
  s = tj.summary(model, jnp.zeros((1, 8, 8, 1)))
  names = [l.name for l in s.layers]
  assert names == ["conv1", "conv2", "bn", "fc1", "fc2"]
  fc1 = s.layers[names.index("fc1")]
  assert fc1.bits_per_weight == 2 and fc1.params == 512 * 32 + 32 + 1
  # base-3 codes (five trits a byte) + float32 bias, scale and per-channel α
  assert fc1.packed_bytes == 512 * 32 // 5 + 1 + 4 * (32 + 1 + 32)
  assert 0 < fc1.sparsity < 1
  assert fc1.output_shape == (1, 32) and fc1.macs == 512 * 32
  assert s.layers[names.index("conv2")].macs == 8 * 8 * 8 * 9 * 8
  assert s.params == sum(l.params for l in s.layers)
  assert s.macs == 8 * 8 * 8 * 9 + 8 * 8 * 8 * 9 * 8 + 512 * 32 + 32 * 4
  text = str(s)
  assert "TernaryLinear" in text and "αp" in text and "x smaller" in text and "MACs" in text


def test_summary_of_a_residual_model_and_without_input():
  model = Residual(nnx.Rngs(0))
  s = tj.summary(model, jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
  names = [l.name for l in s.layers]
  assert names == ["conv", "shortcut", "attention", "attention/query", "attention/key",
                   "attention/value", "attention/out", "head"]
  # the attention module's own einsums: q·k and weights·v, 16 tokens, 2 heads of 8
  assert s.layers[names.index("attention")].macs == 2 * 16 * 16 * 16
  assert s.ternary_macs == 4 * 4 * 16 * (9 + 1)
  plain = tj.summary(model)  # no input: attribute order, no shapes or MACs
  assert plain.layers[0].name == "attention/key"
  assert all(l.macs is None and l.output_shape is None for l in plain.layers)
