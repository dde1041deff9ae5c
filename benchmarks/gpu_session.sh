#!/usr/bin/env bash
# One lent GPU, one background job (benchmarks/gpu_bg.sh start): the kernel checks and timings
# first, alone on the GPU, then the W2A16 recipe, then the W(1+1)A4 stage-3 variants on its
# weights at the same time. Results land in DIR as they are produced, so that a machine taken
# back early still leaves every finished part behind for the next `gpu_bg.sh wait` to copy.
#
#   bash benchmarks/gpu_session.sh MODEL.gguf WIKITEXT_TEST_RAW DIR ROTATION_BLOCK "G1 G2 ..." [recipe args]
#
# DIR/kernels.log + DIR/kernels/: GPU tests of the dequant kernel and the M >= 256 timings with the dequant kernel alone;
# DIR/w2a16.json (+ DIR/w2a16-run/): the recipe (benchmarks/gpu_recipe.sh) with the recipe args;
# DIR/a4_gG.json: stage 3 with activation groups of G (0: per token); G given as "0:1" runs
# only 1 step of stage 3, which still reports the naive max-abs figure first.
set -uo pipefail
model=$1; text=$2; dir=$3; rot=$4; groups=$5; shift 5
mkdir -p "$dir"
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
{
  python3 -m pytest -q tests/test_triton_kernels.py -k dequant 2>&1 | tail -3
  DBLLM_TRITON_CACHE_DIR="$dir/tuning" timeout 360 python3 benchmarks/bench_kernels.py --out "$dir/kernels" \
      --m 4096,256 --shapes 4096x4096,8192x8192,11008x4096 --dequant-only
} > "$dir/kernels.log" 2>&1
bash benchmarks/gpu_recipe.sh "$model" "$text" "$dir/w2a16" --rotation-block "$rot" "$@" > "$dir/w2a16.json" || exit 1
for spec in $groups; do
    g=${spec%%:*}; steps=${spec#*:}; [ "$steps" = "$spec" ] && steps=""
    python3 -m dbllm_compile quantize --model "$model" --device cuda --budget gpu --init-refine-iters 2 \
        --eval-text "$text" --windows 40 --no-default-text --out "$dir/a4_g$g" --json --rotation-block "$rot" \
        --activation-bits 4 --act-group-size "$g" --weights-from "$dir/w2a16-run" --no-compile \
        ${steps:+--act-steps $steps} "$@" > "$dir/a4_g$g.json" 2> "$dir/a4_g$g.log" &
done
wait
