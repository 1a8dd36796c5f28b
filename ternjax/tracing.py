"""Tracing one call of an NNX model: which modules run, in which order, and what they compute.

:func:`hooked` returns an eval-mode clone of a model whose chosen modules call the active hook
(:func:`hooks`) instead of their ``__call__``; :func:`trace` turns one call of such a clone into
a jaxpr whose inputs are the model's state leaves (named by their paths) and the input, so every
array the call reads is an explicit, named input. :func:`summary` and :mod:`ternjax.export` are
built on these; :func:`walk` and :func:`contraction_macs` read the jaxprs (also for the operation
census, ``experiments/profile_operations.py``).

Hooks swap the class of the chosen modules in the clone for a subclass whose ``__call__`` asks
the hook, so nothing global is patched and the user's model is left untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import jax
from flax import nnx
from jax.extend import core as jcore

PATH_ATTR = "_ternjax_path"   # the module's path in the model ('' for the root), set by hooked()
_HOOK: contextvars.ContextVar = contextvars.ContextVar("ternjax_hook", default=None)
_EXTRA: contextvars.ContextVar = contextvars.ContextVar("ternjax_extra", default=None)
_SUBCLASSES: dict[type, type] = {}


def path_name(path) -> str:
  """A state or module path as one string: ``('blocks', 0, 'conv')`` -> ``'blocks/0/conv'``
  (pytree key paths too, without a Variable's ``.value`` attribute key)."""
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path
                  if not isinstance(p, jax.tree_util.GetAttrKey))


def ternary_quant(module):
  """The quantizer of a ternary-weight ``nnx.Linear`` / ``nnx.Conv`` layer (``layer.quant``), or
  None (float layers, also ternjax layers with ``weights='fp'``, and every other module)."""
  quant = getattr(module, "quant", None)
  if isinstance(module, (nnx.Linear, nnx.Conv)) and hasattr(quant, "weight_codes") and \
      quant.config.ternary_weights:
    return quant
  return None


def _hooked_call(self, *args, **kwargs):
  call = super(type(self), self).__call__
  hook = _HOOK.get()
  return call(*args, **kwargs) if hook is None else hook(self, call, args, kwargs)


def _subclass(cls: type) -> type:
  if cls not in _SUBCLASSES:
    _SUBCLASSES[cls] = type(cls)(cls.__name__, (cls,), {
        "__call__": _hooked_call, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
  return _SUBCLASSES[cls]


def original_type(module: nnx.Module) -> type:
  """The module's class before :func:`hooked` swapped it."""
  cls = type(module)
  return cls.__mro__[1] if cls in _SUBCLASSES.values() else cls


def hooked(model: nnx.Module, select: Callable[[nnx.Module], bool]) -> nnx.Module:
  """An eval-mode clone of ``model`` whose modules with ``select(module)`` call the hook.

  Each module of the clone gets its path (``PATH_ATTR``), which survives ``nnx.split`` and
  ``nnx.merge``, so a hook knows which layer it runs.
  """
  clone = nnx.clone(model)
  clone.eval()
  for path, module in nnx.iter_modules(clone):
    object.__setattr__(module, PATH_ATTR, path_name(path))
    if select(module):
      object.__setattr__(module, "__class__", _subclass(type(module)))
  return clone


@contextlib.contextmanager
def hooks(hook: Callable) -> Iterator[None]:
  """Within the block, hooked modules run ``hook(module, call, args, kwargs)``."""
  token = _HOOK.set(hook)
  try:
    yield
  finally:
    _HOOK.reset(token)


def trace(model: nnx.Module, x: jax.ShapeDtypeStruct, hook: Callable | None = None,
          extra: dict | None = None) -> tuple[jcore.ClosedJaxpr, list[str]]:
  """The jaxpr of ``model(x)`` with ``hook`` active, and the names of its inputs.

  Inputs are the model's state leaves (named by path), then ``extra``'s arrays (by key; a hook
  reads them from :func:`extra_inputs`), then ``x`` (named ``'images'``). ``x`` and
  ``extra`` may be ``ShapeDtypeStruct`` s (a symbolic batch dimension is kept).
  """
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  names = [path_name(p) for p, _ in leaves]
  extra = dict(extra or {})
  specs = [jax.ShapeDtypeStruct(v.shape, v.dtype) for _, v in leaves]
  extra_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in extra.items()}

  def call(leaves, extra, x):
    token = _EXTRA.set(extra)
    try:
      with hooks(hook) if hook else contextlib.nullcontext():
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))(x)
    finally:
      _EXTRA.reset(token)

  jaxpr = jax.make_jaxpr(call)(specs, extra_specs, x)
  return jaxpr, names + sorted(extra) + ["images"]


def extra_inputs() -> dict:
  """Within :func:`trace`, the traced values of its ``extra`` arrays."""
  return _EXTRA.get() or {}


# --------------------------------------------------------------------------------------------
# Reading jaxprs


def sub_jaxprs(eqn) -> Iterator[jcore.Jaxpr]:
  """The jaxprs nested in an equation's parameters (jit, custom_jvp, scan bodies, ...)."""
  for value in eqn.params.values():
    for v in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(v, jcore.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jcore.Jaxpr):
        yield v


def walk(jaxpr: jcore.Jaxpr, visit: Callable, stop: Callable = lambda eqn: False,
         scope: str = "", times: int = 1) -> None:
  """Calls ``visit(eqn, scope, times)`` for every equation, nested ones included.

  ``scope`` is the equation's full name stack; ``times`` how often it runs (a scan body's
  ``length``). Equations with ``stop(eqn)`` are visited but not entered.
  """
  for eqn in jaxpr.eqns:
    where = f"{scope}/{eqn.source_info.name_stack}"
    subs = [] if stop(eqn) else list(sub_jaxprs(eqn))
    if not subs:
      visit(eqn, where, times)
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in subs:
      walk(sub, visit, stop, where, times * repeat)


def contraction_macs(eqn) -> int:
  """Multiply-accumulates of a ``dot_general`` or ``conv_general_dilated`` (else 0)."""
  out = math.prod(eqn.outvars[0].aval.shape)
  if eqn.primitive.name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    return out * math.prod(eqn.invars[0].aval.shape[d] for d in contract)
  if eqn.primitive.name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    return out * math.prod(rhs) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
  return 0
