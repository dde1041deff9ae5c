"""Run one dual-binary linear (tuned config from the on-disk cache) for a profiler.

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats -k regex:db_matmul \\
        python benchmarks/profile_case.py 28672 8192 1
"""

from __future__ import annotations

import sys

import torch

import dbllm_compile.backends  # noqa: F401
from benchmarks.bench_kernels import random_gpu_weights
from dbllm_compile.backends.triton.dispatch import linear_prepared

n, k, m = map(int, sys.argv[1:4])
gw = random_gpu_weights(n, k, torch.float16)
x = torch.randn(m, k, device="cuda", dtype=torch.float16)
for _ in range(3):
    linear_prepared(x, gw, None)
torch.cuda.synchronize()
