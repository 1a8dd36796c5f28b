"""ternary_matmul / ternary_conv equal integer jnp.dot / lax.conv of the ternary values exactly,
for every registered implementation, on the shared awkward shapes (ternjax.ops.arg_specs)."""

import functools
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import ternjax as tj
from ternjax import ops, packing
from ternjax.ops import arg_specs

ON = jax.default_backend()


def _interpret_variants() -> dict[str, str]:
  """Implementation -> the name it is tested under: itself on its platforms; off them, a
  ``NAME_interpret`` registration running it in interpret mode (Pallas on a CPU)."""
  names = {}
  for name, impl in sorted(ops.implementations().items()):
    if not impl.platforms or ON in impl.platforms:
      names[name] = name
    elif impl.interpret:
      names[name] = f"{name}_interpret"
      ops.register(names[name], functools.partial(impl.matmul, interpret=True))
  return names


NAMES = sorted(ops.implementations())
TESTED = _interpret_variants()
SLOW = {name for name, tested in TESTED.items() if tested != name}  # interpret mode is slow
CASES = [pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}") for name in NAMES
         for shape in (arg_specs.KERNEL if name in SLOW else arg_specs.MATMUL)]


def _implementation(name: str) -> str:
  if name not in TESTED:
    impl = ops.IMPLEMENTATIONS[name]
    pytest.skip(f"{name} runs on {'/'.join(impl.platforms)} and has no interpret mode "
                f"(default backend: {ON})")
  return TESTED[name]


def _operands(m, k, n, seed):
  rng = np.random.default_rng(seed)
  return (rng.integers(-1, 2, (m, k)).astype(np.int8), rng.integers(-1, 2, (k, n)).astype(np.int8))


def _compiles(fn):
  """The 'Compiling ...' log lines of ``fn()`` (jax.log_compiles)."""
  lines = []
  handler = logging.Handler()
  handler.emit = lambda record: lines.append(record.getMessage())
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      jax.block_until_ready(fn())
  finally:
    logger.removeHandler(handler)
  return [line for line in lines if line.startswith("Compiling")]


class TestImplementations:
  """Every registered implementation, through the dispatch (``implementation=name``)."""

  @pytest.mark.parametrize("name,shape", CASES)
  def test_ternary_activations_exact(self, name, shape):
    m, k, n = shape
    impl = _implementation(name)
    x, t = _operands(m, k, n, m * 1000 + k)
    w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
    out = ops.ternary_matmul(jnp.asarray(x), w, x_ternary=True, implementation=impl)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, np.dot(x.astype(np.int32), t.astype(np.int32)))

  @pytest.mark.parametrize("name,shape", CASES)
  def test_int8_and_float_activations_exact(self, name, shape):
    m, k, n = shape
    impl = _implementation(name)
    rng = np.random.default_rng(k)
    _, t = _operands(m, k, n, k)
    x8 = rng.integers(-127, 128, (m, k)).astype(np.int8)
    w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
    ref = np.dot(x8.astype(np.int32), t.astype(np.int32))
    np.testing.assert_array_equal(ops.ternary_matmul(jnp.asarray(x8), w, implementation=impl),
                                  ref)
    xf = jnp.asarray(x8, jnp.float32)  # integer-valued floats: sums are exact below 2**24
    np.testing.assert_array_equal(ops.ternary_matmul(xf, w, implementation=impl),
                                  ref.astype(np.float32))

  @pytest.mark.parametrize("name", NAMES)
  def test_two_sums_and_scales(self, name):
    impl = _implementation(name)
    x, t = _operands(4, 45, 6, 7)
    w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
    xs = jnp.arange(1.0, 5.0)[:, None]
    ap, an = jnp.linspace(0.5, 1.0, 6), jnp.linspace(2.0, 3.0, 6)
    x32, t32 = x.astype(np.int32), t.astype(np.int32)
    acc_p, acc_n = x32 @ (t32 == 1), x32 @ (t32 == -1)
    ref = (acc_p.astype(np.float32) * ap - acc_n.astype(np.float32) * an) * xs
    for xt in (True, False):
      out = ops.ternary_matmul(jnp.asarray(x), w, x_ternary=xt, x_scale=xs, w_scale=ap,
                               w_scale_neg=an, implementation=impl)
      if name == "xla":
        np.testing.assert_array_equal(out, ref)
      else:  # exact integer sums; a kernel's float epilogue may round an FMA differently
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-5)

  @pytest.mark.parametrize("name", NAMES)
  def test_empty_batch(self, name):
    impl = _implementation(name)
    _, t = _operands(1, 45, 6, 8)
    w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
    for x, kwargs, dtype in [(jnp.zeros((0, 45), jnp.int8), dict(x_ternary=True), jnp.int32),
                             (jnp.zeros((0, 45), jnp.int8), dict(w_scale=2.0), jnp.float32),
                             (jnp.zeros((0, 45), jnp.float32), {}, jnp.float32)]:
      out = ops.ternary_matmul(x, w, implementation=impl, **kwargs)
      assert out.shape == (0, 6) and out.dtype == dtype
    kernel = packing.pack_bitplanes(ops.kernel_to_matrix(jnp.ones((3, 3, 5, 4), jnp.int8)), 0)
    out = ops.ternary_conv(jnp.zeros((0, 7, 6, 5), jnp.int8), kernel, window=(3, 3),
                           strides=(2, 2), padding="SAME", x_ternary=True, implementation=impl)
    assert out.shape == (0, 4, 3, 4) and out.dtype == jnp.int32

  @pytest.mark.parametrize("name", NAMES)
  def test_second_call_does_not_recompile(self, name):
    impl = _implementation(name)
    x, t = _operands(3, 70, 9, 9)
    w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
    x2 = jnp.asarray(_operands(3, 70, 9, 10)[0])  # new values, same shapes
    eager = functools.partial(ops.ternary_matmul, x_ternary=True, implementation=impl)
    jitted = jax.jit(eager)
    for call in (eager, jitted):
      assert _compiles(functools.partial(call, jnp.asarray(x), w))  # the first call compiles
      assert _compiles(functools.partial(call, x2, w)) == []

  @pytest.mark.parametrize("name", NAMES)
  @pytest.mark.parametrize("kind", ["linear", "conv"])
  @pytest.mark.parametrize("weights", ["twn", "ttq"])
  def test_kernel_forward_layers(self, name, kind, weights):
    """Forward = the packed op through the dispatch, backward = STE of the float forward."""
    impl = _implementation(name)
    x = jax.random.normal(jax.random.key(1), (3, 37) if kind == "linear" else (2, 7, 6, 3))
    layer, xla_layer, reference = (_layer(kind, weights, forward)
                                   for forward in (impl, "xla", None))
    xla_out, kernel_out = xla_layer(x), layer(x)
    if weights == "twn":  # no subtraction in the epilogue: the same floats exactly
      np.testing.assert_array_equal(kernel_out, xla_out)
    else:
      np.testing.assert_allclose(kernel_out, xla_out, rtol=1e-6, atol=1e-6)
    loss = lambda model: jnp.sum(model(x) ** 2)
    with jax.default_matmul_precision("float32"):  # no TF32 in the float reference on GPUs
      # The float forward it replaces: equal up to float rounding of the scales.
      np.testing.assert_allclose(kernel_out, reference(x), rtol=1e-5, atol=1e-5)
      grads, ref_grads = nnx.grad(loss)(layer), nnx.grad(loss)(reference)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def _layer(kind, weights, implementation):
  """A layer with ternary inputs; with an ``implementation``, its forward is the packed op."""
  quant = tj.QuantConfig(weights=weights, activations="ternary",
                         kernel_forward=implementation is not None,
                         implementation=implementation)
  if kind == "linear":
    return tj.TernaryLinear(37, 20, quant=quant, rngs=nnx.Rngs(0))
  return tj.TernaryConv(3, 5, (3, 3), strides=2, quant=quant, rngs=nnx.Rngs(0))


def test_kernel_forward_needs_fully_ternary_layers():
  with pytest.raises(ValueError, match="kernel_forward"):
    tj.QuantConfig(weights="twn", activations="int8", kernel_forward=True)
  with pytest.raises(ValueError, match="set kernel_forward=True"):
    tj.QuantConfig(weights="twn", activations="ternary", implementation="xla")
  with pytest.raises(ValueError, match="unknown implementation"):
    tj.QuantConfig(weights="twn", activations="ternary", kernel_forward=True,
                   implementation="nope")


def test_bad_shapes_and_names_raise():
  w = packing.pack_bitplanes(jnp.ones((10, 3), jnp.int8), axis=0)
  with pytest.raises(ValueError, match="K = 10"):
    ops.ternary_matmul(jnp.ones((2, 11), jnp.int8), w)
  with pytest.raises(ValueError, match="packed along axis 0"):
    ops.ternary_matmul(jnp.ones((2, 3), jnp.int8), packing.pack_bitplanes(jnp.ones((3, 10))))
  with pytest.raises(ValueError, match="unknown implementation"):
    ops.ternary_matmul(jnp.ones((2, 10), jnp.int8), w, implementation="nope")


def test_environment_variable_selects():
  """TERNJAX_IMPLEMENTATION, read when ternjax.ops is imported, names the default."""
  script = ("import jax.numpy as jnp; from ternjax import ops, packing\n"
            "calls = []\n"
            "ops.register('spy', lambda *a, **kw: calls.append(1) or ops.xla_matmul(*a, **kw))\n"
            "w = packing.pack_bitplanes(jnp.ones((10, 3), jnp.int8), axis=0)\n"
            "ops.ternary_matmul(jnp.ones((2, 10), jnp.int8), w)\n"
            "ops.ternary_matmul(jnp.ones((2, 10), jnp.int8), w, implementation='xla')\n"
            "print(calls)")
  env = {**os.environ, ops.ENV_VAR: "spy", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[1]"


def test_lookup_order(monkeypatch):
  monkeypatch.setattr(ops.base, "ENV_IMPLEMENTATION", "pallas, xla")
  assert ops.candidates() == ("pallas", "xla")
  assert ops.candidates("xla") == ("xla",)
  monkeypatch.setattr(ops.base, "ENV_IMPLEMENTATION", None)
  assert ops.candidates() == ops.DEFAULTS.get(jax.default_backend(), ("xla",))
  assert "gpu" in ops.POLICIES and "gpu" not in ops.IMPLEMENTATIONS  # a policy, not a kernel


def test_fall_through_on_not_implemented(monkeypatch):
  def refuse(*a, **kw):
    raise NotImplementedError("not this shape")
  monkeypatch.setitem(ops.IMPLEMENTATIONS, "refuse", ops.Implementation(refuse))
  x, t = _operands(2, 40, 3, 1)
  w = packing.pack_bitplanes(jnp.asarray(t), axis=0)
  out = ops.ternary_matmul(jnp.asarray(x), w, implementation=("refuse", "xla"))
  np.testing.assert_array_equal(out, x.astype(np.int32) @ t)
  with pytest.raises(NotImplementedError, match="not this shape"):
    ops.ternary_matmul(jnp.asarray(x), w, implementation="refuse")


@pytest.mark.parametrize("window,strides,padding,dilation,cin", arg_specs.CONV)
@pytest.mark.parametrize("x_ternary", [True, False])
def test_conv_exact(window, strides, padding, dilation, cin, x_ternary):
  rng = np.random.default_rng(cin)
  lo = -1 if x_ternary else -127
  x = rng.integers(lo, -lo + 1, (2, 9, 8, cin)).astype(np.int8)
  kernel = rng.integers(-1, 2, (*window, cin, 4)).astype(np.int8)
  # float32 holds these integer sums exactly (and cuDNN has no int32 convolution).
  ref = lax.conv_general_dilated(
      jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), strides, padding,
      rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST).astype(jnp.int32)
  w = packing.pack_bitplanes(ops.kernel_to_matrix(jnp.asarray(kernel)), axis=0)
  out = ops.ternary_conv(jnp.asarray(x), w, window=window, strides=strides, padding=padding,
                         rhs_dilation=dilation, x_ternary=x_ternary)
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("window,strides,padding,dilation,cin", arg_specs.CONV)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
def test_direct_conv_is_the_convolution(window, strides, padding, dilation, cin, dtype):
  """The GPU policy's direct convolution: the convolution of the unpacked kernel, scales
  (TTQ's two included) as in patches + matmul; int8 codes exactly, other codes refused."""
  rng = np.random.default_rng(cin)
  x = (jnp.asarray(rng.integers(-127, 128, (2, 9, 8, cin)), dtype) if dtype == jnp.int8
       else jnp.asarray(rng.normal(size=(2, 9, 8, cin)), dtype))
  kernel = rng.integers(-1, 2, (*window, cin, 4)).astype(np.int8)
  w = packing.pack_bitplanes(ops.kernel_to_matrix(jnp.asarray(kernel)), axis=0)
  geometry = dict(window=window, strides=strides, padding=padding, rhs_dilation=dilation)
  scales = dict(w_scale=jnp.asarray(rng.random(4), jnp.float32),
                w_scale_neg=jnp.asarray(rng.random(4), jnp.float32),
                x_scale=jnp.asarray(rng.random((2, 1, 1, 1)), jnp.float32))
  rtol = 1e-2 if dtype == jnp.bfloat16 else 1e-5  # bfloat16 sums, as in the float model
  for kw in ({}, scales):
    got = ops.conv.direct_conv(x, w, **geometry, **kw)
    want = ops.conv.patches_conv(x, w, **geometry, **kw, matmul=ops.xla_matmul)
    assert got.dtype == want.dtype
    if dtype == jnp.int8 and not kw:
      np.testing.assert_array_equal(got, want)
    else:
      np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 10)
  assert ops.POLICIES["gpu"].conv is ops.conv.direct_conv
  with pytest.raises(NotImplementedError, match="int16 codes"):
    ops.conv.direct_conv(x.astype(jnp.int16), w, **geometry)
