"""Fingerprints of the compiled programs of ``ternary_matmul`` / ``ternary_conv`` (no timing).

Prints one line per configuration: a hash of XLA's optimized HLO with names, metadata and debug
tables removed, so that two checkouts can be compared for "the same program" after a
refactor (as for issue 12: ``experiments/results/design_refactor.md``)::

  python experiments/hlo_fingerprints.py > after.txt   # and in the old checkout: before.txt
  diff before.txt after.txt
"""

import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from ternjax import ops, packing

MATMUL_KN = ((784, 256), (4096, 4096), (1024, 512), (45, 6))
MATMUL_M = (1, 2, 8, 33, 64, 256, 300)
# (batch, spatial, channels, outputs, window): LeNet-5's second conv and a small one
CONV = [(b, *g) for b in (1, 16, 64) for g in ((12, 32, 64, 5), (9, 3, 4, 3))]


def fingerprint(fn, *args) -> str:
  text = jax.jit(fn).lower(*args).compile().as_text()
  text = re.sub(r", metadata=\{[^}]*\}", "", text)
  text = re.sub(r"^HloModule.*$", "", text, flags=re.M)
  text = re.sub(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n(?:[ \d].*\n)*", "",
                text, flags=re.M)
  text = re.sub(r", stack_frame_id=\d+", "", text)
  text = re.sub(r"%[\w.\-]+", "%v", text)
  return hashlib.sha1(text.encode()).hexdigest()[:10]


def main():
  rng = np.random.default_rng(0)
  for k, n in MATMUL_KN:
    w = packing.pack_bitplanes(jnp.asarray(rng.integers(-1, 2, (k, n)), jnp.int8), axis=0)
    scales = dict(w_scale=jnp.ones(n), w_scale_neg=jnp.ones(n))
    for m in MATMUL_M:
      for name, dtype, kwargs in [("ternary", jnp.int8, dict(x_ternary=True)),
                                  ("int8", jnp.int8, {}), ("int16", jnp.int16, {}),
                                  ("float32", jnp.float32, {}),
                                  ("ttq", jnp.int8, dict(x_ternary=True, **scales))]:
        fn = lambda x, w, kwargs=kwargs: ops.ternary_matmul(x, w, **kwargs)
        print((m, k, n, name), fingerprint(fn, jnp.zeros((m, k), dtype), w))
  for batch, size, c, o, win in CONV:
    kernel = jnp.asarray(rng.integers(-1, 2, (win, win, c, o)), jnp.int8)
    w = packing.pack_bitplanes(ops.kernel_to_matrix(kernel), axis=0)
    for name, kwargs in [("ternary", dict(x_ternary=True)), ("int8", {})]:
      fn = lambda x, w, kwargs=kwargs, win=win: ops.ternary_conv(x, w, window=(win, win),
                                                                  padding="VALID", **kwargs)
      print(("conv", batch, size, c, o, name),
            fingerprint(fn, jnp.zeros((batch, size, size, c), jnp.int8), w))


if __name__ == "__main__":
  main()
