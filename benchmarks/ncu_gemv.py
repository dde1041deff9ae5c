"""Run one layer's M = 1 linear three times with a given config, for Nsight Compute.

    ncu -k regex:db_gemv_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section MemoryWorkloadAnalysis --section LaunchStats --section InstructionStats \
        --section SourceCounters python3 benchmarks/ncu_gemv.py 12288x4096 gemv8x512w1s3

(``DBLLM_GEMV_LOADS=0|1|2`` picks the gemv's loads; docs/kernels.md, "Loads in inline asm".)
Random weights in the GPU layout, fp16 x; needs a CUDA GPU.
"""
import sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dbllm_compile.backends  # noqa
from benchmarks.bench_kernels import random_gpu_weights
from dbllm_compile.backends.triton.launch import KernelConfig, run_config
n, k = map(int, sys.argv[1].split("x")); cfg = KernelConfig.parse(sys.argv[2])
gw = random_gpu_weights(n, k, torch.float16)
x = torch.randn(1, k, device="cuda", dtype=torch.float16)
for _ in range(3):
    run_config(x, gw, None, cfg)
torch.cuda.synchronize()
