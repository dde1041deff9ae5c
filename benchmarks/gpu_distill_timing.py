"""Time the distillation pipeline on one GPU with a SmolLM2-135M-shaped random-init model.

Sizes the `gpu` budget of the CLI (the real weights are not on the GPU machine: its upload
limit is below the 98 MB GGUF file). Prints seconds per block-wise step, per end-to-end step,
and for generating calibration data; writes JSON to --out.

    python benchmarks/gpu_distill_timing.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dbllm_compile as dc
from dbllm_compile.distill import CalibrationSpec, DistillConfig, distill, generate_calibration


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    teacher = LlamaForCausalLM(cfg).cuda().eval()
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t = time.perf_counter()
    data = generate_calibration(teacher, CalibrationSpec(num_sequences=64, seq_len=args.seq_len, batch_size=64),
                                cache=False, progress=False)
    result["calib_64x%d_s" % args.seq_len] = time.perf_counter() - t
    ex = data.input_ids[:2, :16].cuda()
    t = time.perf_counter()
    q = dc.quantize(teacher, (ex,), example_kwargs={"use_cache": False}, progress=False)
    result["quantize_s"] = time.perf_counter() - t
    for bs, block_steps, steps in ((8, 10, 0), (8, 0, 10)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r = distill(q, teacher, data.input_ids, DistillConfig(steps=steps, block_steps=block_steps, batch_size=bs,
                    block_batch_size=bs), out_dir=args.out / f"run_{bs}_{block_steps}_{steps}", progress=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        key = "blocks" if block_steps else "e2e"
        result[f"{key}_total_s"] = dt
        result[f"{key}_stage_s"] = r.seconds
        result[f"{key}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if block_steps:
            result["block_step_s"] = r.seconds["blocks"] / (30 * block_steps)
        else:
            result["e2e_step_s"] = r.seconds["e2e"] / steps
            result["e2e_losses"] = r.losses
        print(json.dumps(result, indent=1), flush=True)
    (args.out / "distill_timing.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
