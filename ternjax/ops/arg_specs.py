"""The shapes that the tests and the benchmarks share (as tokamax's ``arg_specs``).

Matmul shapes are ``(M, K, N)``: awkward ones (M = 1, K not a multiple of 32, N not a multiple
of a block) check exactness; benchmark ones time the ops.
"""

# Exactness of every implementation and CPU formulation: K from 1 to 300, odd N.
MATMUL = [(1, 1, 1), (1, 31, 7), (2, 33, 5), (3, 32, 5), (5, 33, 9), (1, 64, 130), (2, 65, 1),
          (9, 65, 3), (7, 100, 3), (3, 100, 9), (16, 97, 33), (5, 97, 17), (4, 300, 33)]
# Small enough for kernels in interpret mode (slow), with grids of several programs.
KERNEL = [(1, 100, 33), (5, 70, 17), (17, 64, 40)]
# Compiled kernels on a GPU: larger awkward shapes too.
GPU_CHECK = [(1, 100, 33), (5, 70, 300), (17, 1000, 129), (300, 4000, 517)]
# GPU benchmark (experiments/bench_kernels.py): square layers, an LLM-shaped MLP (4096 -> 11008
# -> 4096) at batch 1 and 16, the CIFAR-10 ResNet-18 3x3 convolutions at batch 1024 as patches
# matmuls (M = 1024·H·W, K = 9·C_in, N = C_out), a small MLP layer.
GPU_BENCH = [(1, 4096, 4096), (16, 4096, 4096), (256, 4096, 4096), (4096, 4096, 4096),
             (1, 4096, 11008), (1, 11008, 4096), (16, 4096, 11008), (16, 11008, 4096),
             (1024 * 32 * 32, 576, 64), (1024 * 16 * 16, 1152, 128), (1024 * 8 * 8, 2304, 256),
             (1024 * 4 * 4, 4608, 512), (128, 784, 256)]
# CPU benchmark (experiments/bench_cpu.py): M × (K, N), and the M of the formulation sweep.
CPU_BENCH_M = (1, 8, 64, 256)
CPU_BENCH_KN = ((784, 256), (4096, 4096))
CPU_SWEEP_M = (1, 2, 4, 8, 16, 32, 64)

# Convolutions: (window, strides, padding, rhs_dilation, input channels).
CONV = [((3, 3), (1, 1), "SAME", (1, 1), 3), ((5, 5), (2, 2), "VALID", (1, 1), 2),
        ((2, 3), (1, 2), "SAME", (1, 1), 5), ((3, 3), (1, 1), "SAME", (2, 2), 3),
        ((3, 2), (2, 1), ((1, 2), (0, 1)), (2, 1), 3), ((1, 1), (2, 2), "VALID", (1, 1), 3),
        ((5, 5), (1, 1), "VALID", (1, 1), 3)]
