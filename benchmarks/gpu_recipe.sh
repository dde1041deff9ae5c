#!/usr/bin/env bash
# The one-GPU distillation recipe on the real SmolLM2-135M, as measured for docs/results.md.
#
#   bash benchmarks/gpu_recipe.sh MODEL.gguf WIKITEXT_TEST_RAW OUT_DIR [more dbllm-compile args]
#
# Installs the package (the machine already has torch), then runs the main job with the `gpu`
# budget: MSE-grid init + 2 least-squares refinements, 8,192 x 512 tokens of data-free calibration
# text (generated 1,024 sequences at a time on an 80 GB GPU, 356 s on an H100; cached on disk under
# $DBLLM_CACHE, so a second run reads it), block-wise reconstruction on the first 1,024 sequences
# (300 steps per block), end-to-end DAD distillation on all of them (5,000 steps, compiled through
# the dbllm backend and run under CUDA graphs: the CLI default on CUDA), with every quantized
# linear's input Hadamard-rotated (the CLI default --rotation-block 64), packed evaluation on the
# first 40 windows of 512 tokens of WikiText-2 test. Measured on an H100 (docs/results.md 3.0h,
# 2026-11-25): 57.3 (full precision 28.74; the bar of issue 3 is 57.5) in 1,350 s with the text
# in the cache plus 383 s to generate it (58.7 with half the text, 3.0g). The run directory
# OUT_DIR-run/ holds the checkpoint: running the same command again after a kill or a timeout
# resumes where it stopped. On a machine lent for less than the ~30 min of the whole recipe, run it
# first with --calibration-only (the text goes to the cache and the job stops), carry the cache
# directory to the next machine and point $DBLLM_CACHE at it, then run it without the flag
# (docs/results.md 3.0h ran that way).
set -euo pipefail
model=$1; text=$2; out=$3; shift 3
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m dbllm_compile quantize --model "$model" --device cuda --budget gpu --init-refine-iters 2 \
    --eval-text "$text" --windows 40 --no-default-text --out "$out" --json "$@"
