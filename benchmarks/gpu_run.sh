#!/usr/bin/env bash
# One device run: install, full benchmark, kernel tests on CUDA, a profile of the M=1 kernel.
# Results under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 DBLLM_TRITON_VERBOSE=1
export DBLLM_TRITON_CACHE_DIR=${DBLLM_TRITON_CACHE_DIR:-$OUT/tuning}
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout ${BENCH_TIMEOUT:-250} python3 benchmarks/bench_kernels.py --out $OUT --second-process ${BENCH_ARGS:-} 2>&1 | tee $OUT/bench.log | grep -v "^\[dbllm triton\] config"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout ${TEST_TIMEOUT:-270} python3 -m pytest tests/test_triton_kernels.py -x -q -p no:cacheprovider 2>&1 | tee $OUT/tests.log | tail -6
fi
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ "${SKIP_NCU:-0}" != "1" ] && [ -n "$NCU" ]; then
  PYTHONPATH=. timeout 60 $NCU --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats -k regex:db_matmul -c 1 \
    python3 benchmarks/profile_case.py 28672 8192 1 > $OUT/ncu.txt 2>&1
  grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Issue Slots|Block Limit" $OUT/ncu.txt | head -30
fi
