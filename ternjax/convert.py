"""Float model -> ternary twin, by rules on module paths (as Qwix's rules).

``ternarize(model, rules, sample_input=x)`` returns a copy of ``model`` in which every
``nnx.Linear`` / ``nnx.Conv`` (plain Flax layers or ternjax's) whose path matches a rule is a
:class:`~ternjax.TernaryLinear` / :class:`~ternjax.TernaryConv` with that rule's
:class:`~ternjax.QuantConfig`. The float kernel and bias are copied and become the shadow
weights; quantizer state (TTQ's scales) is initialised from the copied kernel, as when a layer
is built. Norms and everything else are left as they are; so are, by default, the first and
the last weight layer of the forward pass (found by tracing ``sample_input`` through a copy).

>>> twin = ternarize(model, [Rule(r".*conv.*", QuantConfig(weights="ttq")),
...                          Rule(r".*", QuantConfig(weights="twn"))],
...                  sample_input=jnp.zeros((1, 32, 32, 3)))
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Sequence

import jax
from flax import nnx

from ternjax.layers import QuantConfig, TernaryConv, TernaryLinear

# Constructor arguments not copied from the float layer: the ternary layer brings its own
# contraction, the weights come through the initialisers.
_NOT_COPIED = {"self", "rngs", "kernel_init", "bias_init", "dot_general", "conv_general_dilated",
               "kernel_metadata", "bias_metadata"}


@dataclasses.dataclass(frozen=True)
class Rule:
  """Layers whose path (``'blocks.3.conv1'``) fully matches ``pattern`` get ``quant``
  (``None``: stay float). The first matching rule wins."""

  pattern: str
  quant: QuantConfig | None = QuantConfig()


def _weight_layers(model: nnx.Module) -> list[tuple[str, tuple, nnx.Module]]:
  return [(".".join(map(str, path)), path, m) for path, m in nnx.iter_modules(model)
          if isinstance(m, (nnx.Linear, nnx.Conv))]


def call_order(model: nnx.Module, sample_input) -> list[str]:
  """Paths of ``model``'s Linear/Conv layers in the order its forward pass first calls them."""
  probe = nnx.clone(model)
  probe.eval()
  names = {id(m): name for name, _, m in _weight_layers(probe)}
  order: list[str] = []
  saved = {}
  for cls in {type(m) for _, _, m in _weight_layers(probe)}:
    saved[cls] = cls.__dict__.get("__call__")

    def recording(self, *args, _call=cls.__call__, **kwargs):
      if id(self) in names and names[id(self)] not in order:
        order.append(names[id(self)])
      return _call(self, *args, **kwargs)

    cls.__call__ = recording
  try:
    jax.eval_shape(lambda x: probe(x), sample_input)
  finally:
    for cls, call in saved.items():
      if call is None:
        del cls.__call__
      else:
        cls.__call__ = call
  return order


def ternary_twin(layer: nnx.Linear | nnx.Conv, quant: QuantConfig,
                 rngs: nnx.Rngs) -> TernaryLinear | TernaryConv:
  """The ternary layer with ``layer``'s settings, kernel and bias."""
  cls, base = (TernaryConv, nnx.Conv) if isinstance(layer, nnx.Conv) else (TernaryLinear,
                                                                           nnx.Linear)
  kwargs = {k: getattr(layer, k) for k in inspect.signature(base.__init__).parameters
            if k not in _NOT_COPIED and hasattr(layer, k)}
  kernel = layer.kernel[...]
  kwargs["kernel_init"] = lambda *_: kernel
  if layer.bias is not None:
    bias = layer.bias[...]
    kwargs["bias_init"] = lambda *_: bias
  return cls(**kwargs, quant=quant, rngs=rngs)


def _replace(root, path: tuple, new) -> None:
  parent = root
  for key in path[:-1]:
    parent = getattr(parent, key) if isinstance(key, str) else parent[key]
  if isinstance(path[-1], str):
    setattr(parent, path[-1], new)
  else:
    parent[path[-1]] = new


def ternarize(model: nnx.Module, rules: Sequence[Rule] = (Rule(r".*"),), *, sample_input=None,
              keep_first: bool = True, keep_last: bool = True,
              rngs: nnx.Rngs | None = None) -> nnx.Module:
  """The ternary twin of ``model`` (a new model; ``model`` is not changed).

  Args:
    rules: :class:`Rule` list; a layer no rule matches stays as it is.
    sample_input: one input batch (shape and dtype matter, e.g. ``jnp.zeros((1, 32, 32, 3))``),
      needed to find the first and last layer when ``keep_first`` or ``keep_last``.
    keep_first, keep_last: leave the first / last weight layer of the forward pass as it is.
    rngs: RNG streams of the new layers' quantizers (stochastic weights use ``'quant'``).
  """
  keep = set()
  if keep_first or keep_last:
    if sample_input is None:
      raise ValueError("ternarize: pass sample_input (one input batch) to find the first and "
                       "last layers, or keep_first=False and keep_last=False")
    order = call_order(model, sample_input)
    keep = set(order[:1] * keep_first + order[-1:] * keep_last)
  twin = nnx.clone(model)
  rngs = rngs or nnx.Rngs(default=0, quant=1)
  for name, path, layer in _weight_layers(twin):
    quant = next((r.quant for r in rules if re.fullmatch(r.pattern, name)), None)
    if name not in keep and quant is not None:
      _replace(twin, path, ternary_twin(layer, quant, rngs))
  return twin
