"""Ablation of the distillation recipe on the real SmolLM2-135M, all variants in one budget.

Every variant starts from the same post-training initialisation (MSE grid + 2 least-squares
refinements) and the same data-free calibration text, and is trained with the same number of
steps; only the named component changes:

    full         DAD-ED loss, scales + latent weights, block-wise stage (per-token loss)
    kl           plain KL instead of DAD-ED
    scales-only  latent weights frozen (only the scales a1, a2 learn)
    no-blocks    no block-wise stage (end-to-end only)
    global-block block-wise stage with the global relative error (the earlier default)

Results go to ``--state`` (one JSON per variant, so a second call after a timeout skips the
finished ones) and to ``--out`` (``ablation.json`` + ``ablation.png``). ``--profile`` also
writes a torch.profiler table of a few end-to-end steps.

    python3 benchmarks/gpu_distill_ablation.py --model M.gguf --text wiki.test.raw \
        --state /root/abl --out $OUT [--variants full,kl] [--profile]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dbllm_compile as dc
from dbllm_compile.distill import CalibrationSpec, DistillConfig, LossSpec, distill, generate_calibration
from dbllm_compile.evaluate import load_eval_text, perplexity
from dbllm_compile.models import load_model

VARIANTS = {
    "full": {},
    "kl": {"loss": LossSpec("kl")},
    "scales-only": {"train_latent": False},
    "no-blocks": {"block_steps": 0},
    "global-block": {"block_loss": "global"},
}


def _profile(student, teacher, data, out: Path) -> None:
    """torch.profiler over 4 end-to-end steps (after 2 warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    from dbllm_compile.distill.losses import distill_loss

    params = [*student.scale_parameters(), *student.latent_parameters()]
    opt = torch.optim.AdamW(params, lr=0.0)

    def step(i):
        ids = data[i * 8 : (i + 1) * 8].cuda()
        with torch.no_grad():
            t = teacher(ids, use_cache=False).logits
        s = student(ids).logits
        loss = distill_loss(s, t, LossSpec("dad"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for p in teacher.parameters():
        p.requires_grad_(False)
    for i in range(2):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(2, 6):
            step(i)
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 4
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    (out / "profile.txt").write_text(f"seconds per step (profiled): {dt:.3f}\n\n{table}\n\n{table_cpu}\n")
    print(f"profiled e2e step: {dt:.3f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--block-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True

    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    ids = tok(load_eval_text(args.text), return_tensors="pt").input_ids
    example = torch.randint(0, 1000, (2, 16), device=args.device)
    student = dc.quantize(model, (example,), dc.DBLLMConfig(init_refine_iters=2),
                          example_kwargs={"use_cache": False}, progress=False)
    init = {n: p.detach().clone() for n, p in student.graph_module.named_parameters()}
    data = generate_calibration(model, CalibrationSpec(num_sequences=args.sequences, seq_len=args.seq_len, batch_size=128),
                                tokenizer=tok).input_ids
    setup_s = time.perf_counter() - t0
    print(f"setup {setup_s:.1f} s; calibration {tuple(data.shape)}", flush=True)
    if args.profile and not (args.out / "profile.txt").exists():
        _profile(student, model, data, args.out)
        with torch.no_grad():
            for n, p in student.graph_module.named_parameters():
                p.copy_(init[n])

    for name in args.variants.split(","):
        done = args.state / f"{name}.json"
        if done.exists():
            continue
        with torch.no_grad():
            for n, p in student.graph_module.named_parameters():
                p.copy_(init[n])
        kw = {"steps": args.steps, "block_steps": args.block_steps, "batch_size": 8, "block_batch_size": 8,
              "checkpoint_every": 10_000, **VARIANTS[name]}
        cfg = DistillConfig(**kw)
        t = time.perf_counter()
        run = distill(student, model, data, cfg, out_dir=args.state / f"run-{name}", progress=False, plots=False)
        train_s = time.perf_counter() - t
        ppl = perplexity(dc.convert(student, progress=False), ids, seq_len=512, max_windows=args.windows,
                         progress=False).perplexity
        rec = {"variant": name, "ppl": ppl, "train_s": train_s, "seconds": run.seconds,
               "final_loss": run.losses[-1] if run.losses else None,
               "loss_last20": sum(run.losses[-20:]) / max(1, len(run.losses[-20:])),
               "block_rel_err": [(r["before"], r["after"]) for r in run.block_records],
               "config": {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in cfg.to_dict().items()},
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
        done.write_text(json.dumps(rec, indent=1, default=str))
        print(f"{name}: ppl {ppl:.2f}  ({train_s:.0f} s)", flush=True)

    results = [json.loads(p.read_text()) for p in sorted(args.state.glob("*.json"))]
    (args.out / "ablation.json").write_text(json.dumps(results, indent=1))
    if results:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        names = [r["variant"] for r in results]
        ax.barh(names, [r["ppl"] for r in results])
        ax.set_xscale("log")
        ax.set_xlabel("WikiText-2 perplexity (40 x 512 tokens)")
        ax.set_title(f"distillation ablation, {args.steps} e2e + {args.block_steps}/block steps")
        fig.tight_layout()
        fig.savefig(args.out / "ablation.png", dpi=120)
    for r in results:
        print(f"{r['variant']:>14}: ppl {r['ppl']:.2f}")


if __name__ == "__main__":
    main()
