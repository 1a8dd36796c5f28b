"""GPU kernels for ternjax's dispatch (installed as ``ternjax.kernels``)."""
