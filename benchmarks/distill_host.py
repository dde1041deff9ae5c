"""Where the wall time of the end-to-end distillation step goes: host vs device, per phase.

The recipe's compiled end-to-end step took 0.18 s on an H100 while its kernels summed to 49 ms
(docs/results.md 3.0d). This script runs the same step as
:func:`dbllm_compile.distill.train.train_end_to_end` (teacher forward without gradient, student
forward, DAD-ED loss, backward, gradient clipping, fused AdamW, the two host reads of loss and
gradient norm) on a random-weight SmolLM2-shaped model, for several ways of running the teacher
and the student, and reports per variant:

- ``wall_ms``: steady-state milliseconds per step (the recipe's loop, with its two syncs);
- ``phases``: per phase, the host time until the call returns (``host_ms``, after a sync) and the
  time until the device has finished it (``total_ms``);
- ``kernels_ms`` and ``launches``: device time of all kernels and the number of kernel launches
  per step (``torch.profiler``), and the ops with the most host self time.

Variants: ``student`` in {``compiled``, ``compiled_cg`` (``options={"mode": "reduce-overhead"}``:
CUDA graphs through cudagraph trees, forward and backward)}, ``teacher`` in {``eager``,
``compiled`` (plain Inductor), ``compiled_cg``}.

    python3 benchmarks/distill_host.py --layers 8 --out out/host.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_variant(model, ids, student_mode: str, teacher_mode: str, steps: int, rotation: int, bf16: bool) -> dict:
    import dbllm_compile as dc
    from dbllm_compile.distill.losses import LossSpec, distill_loss
    from dbllm_compile.profiling import profiler

    student = dc.quantize(model, (ids,), dc.DBLLMConfig(init="maxabs", rotation_block=rotation),
                          example_kwargs={"use_cache": False}, progress=False)
    if bf16:
        from dbllm_compile.passes.dtype_assertions import strip_dtype_assertions

        strip_dtype_assertions(student.graph_module)
    gm = student.graph_module
    scales = list(student.scale_parameters())
    latents = list(student.latent_parameters())
    params = scales + latents
    keep = {id(p) for p in params}
    for p in gm.parameters():
        p.requires_grad_(id(p) in keep)
    opt = torch.optim.AdamW([{"params": scales, "lr": 5e-4}, {"params": latents, "lr": 5e-5}], weight_decay=0.0,
                            fused=torch.cuda.is_available())
    opts = {"mode": "reduce-overhead"} if student_mode == "compiled_cg" else None
    forward = torch.compile(student, backend="dbllm", fullgraph=True, options=opts)
    if teacher_mode == "eager":
        teacher = lambda x: model(x, use_cache=False).logits  # noqa: E731
    else:
        tmod = torch.compile(model, mode="reduce-overhead" if teacher_mode == "compiled_cg" else None)
        teacher = lambda x: tmod(x, use_cache=False).logits  # noqa: E731
    spec = LossSpec()
    cast = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16)
    cg = student_mode == "compiled_cg" or teacher_mode == "compiled_cg"

    state: dict = {}

    def p_begin():
        if cg:
            torch.compiler.cudagraph_mark_step_begin()

    def p_teacher():
        with torch.no_grad(), cast:
            state["t"] = teacher(ids)
            if teacher_mode == "compiled_cg":
                state["t"] = state["t"].clone()  # the graph's output buffer is reused by the next replay

    def p_student():
        with cast:
            out = forward(ids)
            state["s"] = out.logits if hasattr(out, "logits") else out

    def p_loss():
        state["loss"] = distill_loss(state["s"], state["t"], spec)

    def p_backward():
        opt.zero_grad(set_to_none=True)
        state["loss"].backward()

    def p_clip():
        state["g"] = torch.nn.utils.clip_grad_norm_(params, 1.0)

    def p_opt():
        opt.step()

    def p_read():
        state["l"] = state["loss"].item(), float(state["g"])
        state.pop("s"), state.pop("t"), state.pop("loss")

    phases = [("teacher", p_teacher), ("student_forward", p_student), ("loss", p_loss), ("backward", p_backward),
              ("clip", p_clip), ("optimizer", p_opt), ("read", p_read)]

    def step():
        p_begin()
        for _, f in phases:
            f()

    _sync()
    t0 = time.perf_counter()
    step()
    _sync()
    first = time.perf_counter() - t0
    for _ in range(3):
        step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    wall = (time.perf_counter() - t0) / steps
    per = {name: {"host_ms": 0.0, "total_ms": 0.0} for name, _ in phases}
    n = 5
    for _ in range(n):
        p_begin()
        for name, f in phases:
            _sync()
            a = time.perf_counter()
            f()
            b = time.perf_counter()
            _sync()
            c = time.perf_counter()
            per[name]["host_ms"] += (b - a) * 1e3 / n
            per[name]["total_ms"] += (c - a) * 1e3 / n
    prof_steps = 3
    with profiler(ids.device) as prof:
        for _ in range(prof_steps):
            step()
        _sync()
    from torch.autograd import DeviceType

    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                         "cudaLaunchKernelExC", "cudaGraphLaunch"))
    graph_launches = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    host = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.self_cpu_time_total,
                  reverse=True)[:30]
    res = {
        "student": student_mode, "teacher": teacher_mode, "bf16": bf16, "first_step_s": first,
        "wall_ms": wall * 1e3, "phases": per,
        "kernels_ms": kernels / 1e3 / prof_steps, "launches_per_step": launches / prof_steps,
        "graph_launches_per_step": graph_launches / prof_steps,
        "host_top": [{"name": e.key[:100], "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / prof_steps,
                      "calls_per_step": e.count / prof_steps} for e in host],
        "last_loss": state["l"][0],
    }
    del forward, student, opt, state
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return res


def run_train_e2e(model, data, steps: int, rotation: int, compile_teacher: bool, cuda_graphs: bool,
                  compile_cache: str = "") -> dict:
    """:func:`train_end_to_end` itself (the recipe's loop) with ``compile=True``: median tokens/s of
    its own records after the first 20 steps, the first steps' seconds, the losses."""
    import statistics

    import dbllm_compile as dc
    from dbllm_compile.distill import DistillConfig
    from dbllm_compile.distill.checkpoint import MetricsLog
    from dbllm_compile.distill.train import train_end_to_end

    student = dc.quantize(model, (data[:8].to(next(model.parameters()).device),), dc.DBLLMConfig(init="maxabs", rotation_block=rotation),
                          example_kwargs={"use_cache": False}, progress=False)
    cfg = DistillConfig(steps=steps, batch_size=8, compile=True, compile_teacher=compile_teacher,
                        cuda_graphs=cuda_graphs, checkpoint_every=10**6, compile_cache=compile_cache)
    metrics = MetricsLog(None)
    t0, t0_wall = time.perf_counter(), time.time()
    losses = train_end_to_end(student, lambda ids: model(ids, use_cache=False), data, cfg, metrics=metrics,
                              progress=False)
    _sync()
    wall = time.perf_counter() - t0
    rates = [r["tokens_per_s"] for r in metrics.records if "tokens_per_s" in r and r["step"] >= 20]
    times = [r["time"] for r in metrics.records if r.get("stage") == "e2e" and "step" in r]
    res = {"compile_teacher": compile_teacher, "cuda_graphs": cuda_graphs, "steps": steps, "wall_s": wall,
           "tokens_per_s_median": statistics.median(rates) if rates else None,
           "ms_per_step_median": 8 * data.shape[1] / statistics.median(rates) * 1e3 if rates else None,
           "first_step_s": times[0] - t0_wall if times else None, "losses": losses,
           "flags": [r for r in metrics.records if "compiled" in r],
           "first_step_seconds": next((r["first_step_seconds"] for r in metrics.records if "first_step_seconds" in r), None),
           "compile_cache": [{k: r[k] for k in r if k.startswith("compile_cache")} for r in metrics.records
                             if any(k.startswith("compile_cache") for k in r)]}
    del student
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return res


def main() -> int:
    from dbllm_compile.bench import llama_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rotation", type=int, default=64)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--variants", default="compiled/eager,compiled/compiled,compiled_cg/eager,compiled_cg/compiled_cg",
                    help="comma-separated STUDENT/TEACHER pairs")
    ap.add_argument("--e2e-steps", type=int, default=0,
                    help="instead of the variants: train_end_to_end itself for that many steps, old form "
                         "(eager teacher, no CUDA graphs) against the new default, same data")
    ap.add_argument("--compile-cache", default="", metavar="FILE",
                    help="with --e2e-steps: only the default form (compiled teacher, CUDA graphs), with "
                         "DistillConfig.compile_cache=FILE (loaded if it exists, written after the first step); "
                         "run twice with fresh TORCHINDUCTOR_CACHE_DIRs to time a fresh machine with and without it")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = llama_model("smollm2-135m", dev, torch.float32, args.layers)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__, "args": vars(args) | {"out": str(args.out)},
              "date": time.strftime("%Y-%m-%d"), "variants": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.e2e_steps:
        data = torch.randint(0, model.config.vocab_size, (64, args.seq_len), generator=torch.Generator().manual_seed(1))
        result["train_e2e"] = []
        forms = ((True, True),) if args.compile_cache else ((False, False), (True, True))
        for teacher_c, graphs in forms:
            r = run_train_e2e(model, data, args.e2e_steps, args.rotation, teacher_c, graphs, args.compile_cache)
            result["train_e2e"].append(r)
            args.out.write_text(json.dumps(result, indent=1))
            ms = f"{r['ms_per_step_median']:.1f}" if r["ms_per_step_median"] else "n/a"
            print(f"train_end_to_end compile_teacher={teacher_c} cuda_graphs={graphs}: {ms} "
                  f"ms/step median, wall {r['wall_s']:.1f} s, first step {r['first_step_s']:.1f} s, "
                  f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}; first_step_seconds "
                  f"{r['first_step_seconds']:.1f}; {r['compile_cache']}", flush=True)
        if args.compile_cache:
            return 0
        a, b = result["train_e2e"]
        diff = max(abs(x - y) / max(abs(x), 1e-9) for x, y in zip(a["losses"], b["losses"]))
        print(f"max relative loss difference over {args.e2e_steps} steps: {diff:.2e}", flush=True)
        return 0
    for pair in args.variants.split(","):
        s, t = pair.split("/")
        t0 = time.perf_counter()
        try:
            r = run_variant(model, ids, s, t, args.steps, args.rotation, args.bf16)
        except Exception as e:  # a failed variant is a result too
            r = {"student": s, "teacher": t, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            torch._dynamo.reset()
        r["seconds"] = time.perf_counter() - t0
        result["variants"].append(r)
        args.out.write_text(json.dumps(result, indent=1))
        if "error" in r:
            print(f"{s}/{t}: {r['error'][:300]}", flush=True)
            continue
        ph = " ".join(f"{k} {v['host_ms']:.1f}/{v['total_ms']:.1f}" for k, v in r["phases"].items())
        print(f"{s}/{t}: {r['wall_ms']:.1f} ms/step, kernels {r['kernels_ms']:.1f} ms, {r['launches_per_step']:.0f} "
              f"launches ({r['graph_launches_per_step']:.0f} graphs), first {r['first_step_s']:.1f} s\n  phases host/total ms: {ph}",
              flush=True)
        for row in r["host_top"][:12]:
            print(f"    {row['self_cpu_ms_per_step']:8.2f} ms {row['calls_per_step']:7.1f}x {row['name']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
