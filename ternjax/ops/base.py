"""What every implementation of the ternary ops shares: the table they register in, the
operand check and the epilogue (the GPU kernels import this, and nothing here imports them).

An implementation computes exact integer sums and applies the scales with :func:`epilogue`;
a policy chooses an implementation for each call (``'gpu'``: the fastest measured one on a
GPU). Names are looked up in this order: the call's ``implementation``, the
``TERNJAX_IMPLEMENTATION`` environment variable (read once, when this module is imported), the
backend's :data:`DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from ternjax.packing import Bitplanes

ENV_VAR = "TERNJAX_IMPLEMENTATION"
ENV_IMPLEMENTATION = os.environ.get(ENV_VAR) or None


@dataclasses.dataclass(frozen=True)
class Implementation:
  """A registered implementation.

  ``matmul(x, w, *, x_ternary, x_scale, w_scale, w_scale_neg)`` gets operands already checked
  (:func:`check_operands`); ``conv(x, w, *, window, strides, padding, rhs_dilation, x_ternary,
  x_scale, w_scale, w_scale_neg)`` is its direct convolution, if any (else convolutions run as
  patches + ``matmul``). Either raises ``NotImplementedError`` for what it does not handle, and
  the dispatch tries the next name. ``platforms`` are the backends it runs on (empty: all);
  with ``interpret``, ``matmul(..., interpret=True)`` runs it elsewhere (Pallas on a CPU).
  """

  matmul: Callable[..., jax.Array]
  conv: Callable[..., jax.Array] | None = None
  platforms: tuple[str, ...] = ()
  interpret: bool = False


@dataclasses.dataclass(frozen=True)
class Policy:
  """A choice among implementations: ``choose(x, w, *, x_ternary) -> (name, x, x_ternary)``
  names the implementation for the call and the form of ``x`` it gets (e.g. ternary codes
  as int8 for a dot), on ``platforms`` (empty: all). ``conv``, if any, is a direct
  convolution (as :class:`Implementation`'s) tried first for convolutions; where it raises
  ``NotImplementedError`` they run as patches + the chosen matmul."""

  choose: Callable[..., tuple[str, jax.Array, bool]]
  platforms: tuple[str, ...] = ()
  conv: Callable[..., jax.Array] | None = None


IMPLEMENTATIONS: dict[str, Implementation] = {}
POLICIES: dict[str, Policy] = {}
# backend -> names tried in order when the call and the environment name none
DEFAULTS: dict[str, tuple[str, ...]] = {"gpu": ("gpu", "xla")}
# modules that register implementations and policies when imported (the GPU kernels): imported
# the first time names are looked up, so that this package never imports them at import time
PROVIDERS: tuple[str, ...] = ("ternjax.kernels",)


def register(name: str, matmul: Callable[..., jax.Array], *,
             conv: Callable[..., jax.Array] | None = None, platforms: Sequence[str] = (),
             interpret: bool = False) -> None:
  """Registers an implementation under ``name`` (see :class:`Implementation`)."""
  IMPLEMENTATIONS[name] = Implementation(matmul, conv, tuple(platforms), interpret)


def register_policy(name: str, choose: Callable[..., tuple[str, jax.Array, bool]], *,
                    platforms: Sequence[str] = (),
                    conv: Callable[..., jax.Array] | None = None) -> None:
  """Registers a policy under ``name`` (see :class:`Policy`)."""
  POLICIES[name] = Policy(choose, tuple(platforms), conv)


@functools.cache
def _import_providers() -> None:
  for module in PROVIDERS:
    importlib.import_module(module)


def implementations() -> dict[str, Implementation]:
  """The implementation table, with the providers' entries (imported on first use)."""
  _import_providers()
  return IMPLEMENTATIONS


def candidates(implementation: str | Sequence[str] | None = None) -> tuple[str, ...]:
  """The names to try, in order: ``implementation`` (a name, a comma-separated list or a
  sequence), else the environment variable, else the backend's default."""
  if implementation is None:
    implementation = ENV_IMPLEMENTATION or DEFAULTS.get(jax.default_backend(), ("xla",))
  if isinstance(implementation, str):
    implementation = tuple(n.strip() for n in implementation.split(",") if n.strip())
  _import_providers()
  unknown = [n for n in implementation if n not in IMPLEMENTATIONS and n not in POLICIES]
  if unknown or not implementation:
    raise ValueError(f"unknown implementation(s) {unknown or implementation}; "
                     f"available: {sorted(IMPLEMENTATIONS)}, policies: {sorted(POLICIES)}")
  return tuple(implementation)


def check_platform(name: str, platforms: tuple[str, ...]) -> None:
  """Raises ``NotImplementedError`` when the default backend is not one of ``platforms``."""
  if platforms and jax.default_backend() not in platforms:
    raise NotImplementedError(f"{name} runs on {'/'.join(platforms)} (default backend: "
                              f"{jax.default_backend()})")


def check_operands(x: jax.Array, w: Bitplanes) -> None:
  """Raises ``ValueError`` with the shapes when ``x`` and ``w`` cannot be contracted."""
  check_weights(w)
  if x.ndim != 2 or x.shape[1] != w.length:
    raise ValueError(f"x must be (M, K) with K = {w.length}, got {x.shape=}")


def check_weights(w: Bitplanes) -> None:
  """Raises ``ValueError`` unless ``w`` is a ``(K, N)`` kernel packed along ``K``."""
  if not isinstance(w, Bitplanes) or w.axis != 0 or w.pos.ndim != 2:
    raise ValueError("w must be Bitplanes of a (K, N) kernel packed along axis 0 "
                     f"(pack_bitplanes(t, axis=0)), got {w!r:.120}")


def check_scales(w_scale, w_scale_neg) -> None:
  if w_scale_neg is not None and w_scale is None:
    raise ValueError("w_scale_neg needs w_scale (the scale of the +1 weights)")


def output_dtype(x: jax.Array, x_scale, w_scale):
  """int32 for integer ``x`` without scales, float32 otherwise (what :func:`epilogue` gives)."""
  integer = jnp.issubdtype(x.dtype, jnp.integer)
  return jnp.int32 if integer and x_scale is None and w_scale is None else jnp.float32


def epilogue(acc: jax.Array, acc_neg: jax.Array | None = None, *, x_scale=None, w_scale=None,
             w_scale_neg=None) -> jax.Array:
  """Scales accumulators: ``((acc·w_scale) [− acc_neg·w_scale_neg])·x_scale``.

  ``acc`` is ``Σ x·t``, or ``Σ x·[t = +1]`` when ``acc_neg = Σ x·[t = −1]`` is given
  (asymmetric scales, TTQ). ``w_scale`` broadcasts to ``(N,)``, ``x_scale`` to ``(M, 1)``.
  Without scales the accumulator is returned unchanged (int32 for integer inputs).
  """
  if w_scale is None and x_scale is None:
    return acc if acc_neg is None else acc - acc_neg
  out = acc.astype(jnp.float32)
  if w_scale is not None:
    out = out * w_scale
  if acc_neg is not None:
    neg = acc_neg.astype(jnp.float32)
    out = out - (neg * w_scale_neg if w_scale_neg is not None else neg)
  if x_scale is not None:
    out = out * x_scale
  return out
