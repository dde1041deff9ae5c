"""Run one layer's linear (M = 1 unless ``--m``) three times with a given config, for Nsight Compute.

    ncu -k regex:db_gemv_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section MemoryWorkloadAnalysis --section LaunchStats --section InstructionStats \
        --section SourceCounters python3 benchmarks/ncu_gemv.py 12288x4096 gemv8x512w1s3

(``DBLLM_GEMV_LOADS=0|1|2`` picks the gemv's loads; docs/kernels.md, "Loads in inline asm".)
Random weights in the GPU layout, fp16 x; needs a CUDA GPU.
"""
import argparse, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dbllm_compile.backends  # noqa: F401,E402
from benchmarks.bench_kernels import random_gpu_weights  # noqa: E402
from dbllm_compile.backends.triton.launch import KernelConfig, run_config  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("shape", help="N x K, e.g. 12288x4096")
ap.add_argument("config", help="a gemv, fused or mma config name, e.g. gemv8x512w1s3")
ap.add_argument("--m", type=int, default=1, help="rows of x (default 1)")
args = ap.parse_args()
n, k = map(int, args.shape.split("x"))
cfg = KernelConfig.parse(args.config)
gw = random_gpu_weights(n, k, torch.float16)
x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
for _ in range(3):
    run_config(x, gw, None, cfg)
torch.cuda.synchronize()
