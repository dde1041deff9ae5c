#!/usr/bin/env bash
# The whole W(1+1)A4 measurement on one GPU: the W2A16 recipe, then stage 3 (4-bit activation
# clip factors) on its weights for each activation group size given, as in docs/results.md 4.
#
#   bash benchmarks/gpu_w2a4.sh MODEL.gguf WIKITEXT_TEST_RAW OUT ROTATION_BLOCK "G1 G2 ..." [more recipe args]
#
# OUT.json: the W2A16 recipe (benchmarks/gpu_recipe.sh, run directory OUT-run/);
# OUT_a4_gG.json: the W(1+1)A4 pipeline with activation groups of G features (0: per token),
# stage 2 taken from OUT-run/ (--weights-from), stage 3 eager. ROTATION_BLOCK 0: no rotation;
# 64: Hadamard rotation of every quantized linear's input (DBLLMConfig.rotation_block), in both.
set -euo pipefail
model=$1; text=$2; out=$3; rot=$4; groups=$5; shift 5
bash "$(dirname "$0")/gpu_recipe.sh" "$model" "$text" "$out" --rotation-block "$rot" "$@" > "$out.json"
for g in $groups; do
    python3 -m dbllm_compile quantize --model "$model" --device cuda --budget gpu --init-refine-iters 2 \
        --eval-text "$text" --windows 40 --no-default-text --out "${out}_a4_g$g" --json \
        --rotation-block "$rot" --activation-bits 4 --act-group-size "$g" --weights-from "$out-run" \
        --no-compile "$@" > "${out}_a4_g$g.json"
done
