"""Measurements of the torch.compile backend, shared by ``dbllm-compile bench`` and
``benchmarks/gpu_compile_bench.py``.

Each function builds what it needs, measures, and returns a JSON-ready dict:

- :func:`decode_speed`: generation through :class:`~dbllm_compile.generate.StaticCacheGenerator`,
  2-bit through ``backend="dbllm"`` vs the same model through ``backend="inductor"``, same run.
- :func:`distill_step_speed`: one end-to-end distillation step (student forward + loss +
  backward + AdamW on scales and latent weights), eager vs ``torch.compile(backend="dbllm")``.
- :func:`greedy_match`: greedy tokens through the backend (static cache, compiled steps) vs the
  eager quantized model from ``quantize()`` + ``convert()`` (no cache, full recompute per token).
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["llama_model", "decode_speed", "distill_step_speed", "greedy_match"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama_model(shape: str, device: str, dtype: torch.dtype, layers: int | None = None) -> torch.nn.Module:
    """A random-weight Llama of a known shape: ``"llama2-7b"``, ``"smollm2-135m"`` or ``"tiny"``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {
        "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
        "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                             tie_word_embeddings=True),
        "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
    }
    kw = dict(shapes[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def decode_speed(model: torch.nn.Module, *, prompt_len: int, new_tokens: int, options: dict[str, Any],
                 mode: str | None = "auto", extra: dict[str, dict[str, Any]] | None = None,
                 profile_tokens: int = 0, attention: str | None = None) -> dict[str, Any]:
    """Prefill/decode tokens per second and peak memory: fp baseline vs 2-bit, same model, same run.

    ``attention``: :class:`~dbllm_compile.generate.StaticCacheGenerator`'s option, the same for
    every variant (``"dbllm"``: the Triton decode attention for the fp baseline too).

    ``extra``: more ``backend="dbllm"`` variants timed in the same run, by name (e.g.
    ``{"dbllm_unfused": {**options, "fuse_siblings": False, "fuse_glu": False}}``); each gets its own
    ``decode_speedup_<name>``. ``profile_tokens > 0``: also profile one generation of that many
    new tokens per variant (kernels inside CUDA graphs included) and store the ops with the most
    device time, per generated token, as ``out[name]["profile"]``."""
    from dbllm_compile.backends.dynamo import reset_stats, stats
    from dbllm_compile.generate import StaticCacheGenerator

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, Any] = {"prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": str(next(model.parameters()).dtype),
                           "attention": attention or getattr(model.config, "_attn_implementation", None)}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    variants = [("baseline", "inductor", None), ("dbllm", "dbllm", options)]
    variants += [(name, "dbllm", opts) for name, opts in (extra or {}).items()]
    for name, backend, opts in variants:
        reset_stats()
        gen = StaticCacheGenerator(model, max_cache_len=prompt_len + new_tokens + 8, backend=backend,
                                   options=opts, mode=mode, attention=attention)
        t0 = time.perf_counter()
        gen.generate(ids, new_tokens)  # compiles prefill and decode
        gen.generate(ids, new_tokens)  # CUDA graphs record on the first replays
        compile_s = time.perf_counter() - t0
        runs = [gen.generate(ids, new_tokens) for _ in range(3)]
        best = max(runs, key=lambda r: r.decode_tokens_per_s)
        out[name] = {**best.to_dict(), "compile_and_warmup_s": compile_s,
                     "decode_tokens_per_s_all": [r.decode_tokens_per_s for r in runs],
                     "tokens": best.tokens[0].tolist()[:16]}
        if backend == "dbllm":
            out[name]["backend_stats"] = stats().to_dict()
        if profile_tokens > 0:
            out[name]["profile"] = _profile(lambda: gen.generate(ids, profile_tokens), 1, device, top=40)
            for row in out[name]["profile"]:
                row["us_per_token"] = row.pop("us_per_step") / profile_tokens  # prefill included
                row["calls_per_token"] = row.pop("calls_per_step") / profile_tokens
        del gen
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["fp_weight_bytes"] = weight_bytes
    out["decode_speedup"] = out["dbllm"]["decode_tokens_per_s"] / out["baseline"]["decode_tokens_per_s"]
    out["prefill_speedup"] = out["dbllm"]["prefill_tokens_per_s"] / out["baseline"]["prefill_tokens_per_s"]
    for name in extra or {}:
        out[f"decode_speedup_{name}"] = out[name]["decode_tokens_per_s"] / out["baseline"]["decode_tokens_per_s"]
    return out


def distill_step_speed(model: torch.nn.Module, *, batch: int, seq_len: int, steps: int, init: str = "maxabs",
                       on_variant: Any = None, rotation_block: int = 0, variants: tuple[str, ...] | None = None,
                       profile_steps: int = 0, fused_adamw: bool = True, bf16: bool = False) -> dict[str, Any]:
    """Seconds per distillation step, eager vs compiled; checks that the scales moved.

    ``on_variant(name, result)`` is called after each variant (progress, partial results).
    ``rotation_block``: Hadamard-rotate every quantized linear's input (``DBLLMConfig.rotation_block``).
    ``variants``: a subset of ``("eager", "compiled", "compiled_opaque_op")`` (default all three).
    ``profile_steps > 0``: also run that many steps under ``torch.profiler`` and store the 25
    kernels/ops with the most device time (self time, per step) as ``result[name]["profile"]``.
    ``fused_adamw``: AdamW with ``fused=True`` on CUDA, as the distillation stages use it.
    ``bf16``: run the student's forward and the loss under bf16 autocast, after removing the
    exported graph's dtype assertions as ``DistillConfig(autocast="bf16")`` does (the recipe runs
    float32 with TF32 matmuls by default; this measures what bf16 activations buy, not their
    accuracy; ``result["dtype_assertions_removed"]`` per variant)."""
    import dbllm_compile as dc
    from dbllm_compile.distill.losses import LossSpec, distill_loss

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    with torch.no_grad():
        t_logits = model(ids, use_cache=False).logits.detach()
    out: dict[str, Any] = {"batch": batch, "seq_len": seq_len, "steps": steps}
    out["rotation_block"] = rotation_block
    out["fused_adamw"] = bool(fused_adamw and device.type == "cuda")
    out["bf16"] = bf16
    table = {"eager": None, "compiled": {"decompose_train": True}, "compiled_opaque_op": {"decompose_train": False}}
    unknown = set(variants or ()) - set(table)
    if unknown:
        raise ValueError(f"distill_step_speed: unknown variants {sorted(unknown)}; choose from {sorted(table)}")
    for name, options in table.items():
        if variants is not None and name not in variants:
            continue
        student = dc.quantize(model, (ids,), dc.DBLLMConfig(init=init, rotation_block=rotation_block),
                              example_kwargs={"use_cache": False}, progress=False)
        removed = None
        if bf16:  # as the distillation stages do: before the student is compiled
            from dbllm_compile.passes.dtype_assertions import strip_dtype_assertions

            removed = strip_dtype_assertions(student.graph_module)
        scales = list(student.scale_parameters())
        latents = list(student.latent_parameters())
        before = torch.cat([s.detach().flatten() for s in scales]).clone()
        opt = torch.optim.AdamW([{"params": scales, "lr": 1e-3}, {"params": latents, "lr": 1e-4}], weight_decay=0.0,
                                **({"fused": True} if fused_adamw and device.type == "cuda" else {}))
        forward = student if options is None else torch.compile(student, backend="dbllm", fullgraph=True, options=options)

        def step() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = distill_loss(forward(ids).logits, t_logits, LossSpec())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        _sync(device)
        t0 = time.perf_counter()
        first_loss = step()
        _sync(device)
        first_s = time.perf_counter() - t0
        step()
        _sync(device)
        t0 = time.perf_counter()
        losses = [step() for _ in range(steps)]
        _sync(device)
        per_step = (time.perf_counter() - t0) / steps
        after = torch.cat([s.detach().flatten() for s in scales])
        out[name] = {"seconds_per_step": per_step, "first_step_s": first_s, "first_loss": first_loss,
                     "last_loss": losses[-1], "scales_changed_fraction": float((after != before).float().mean())}
        if removed is not None:
            out[name]["dtype_assertions_removed"] = removed
        if profile_steps > 0:
            out[name]["profile"] = _profile(step, profile_steps, device)
        if on_variant is not None:
            on_variant(name, out[name])
        student = opt = forward = None  # free before the next variant
        torch._dynamo.reset()
    if "eager" in out and "compiled" in out:
        out["speedup"] = out["eager"]["seconds_per_step"] / out["compiled"]["seconds_per_step"]
    if "eager" in out and "compiled_opaque_op" in out:
        out["speedup_opaque_op"] = out["eager"]["seconds_per_step"] / out["compiled_opaque_op"]["seconds_per_step"]
    return out


def _profile(step: Any, steps: int, device: torch.device, top: int = 25) -> list[dict[str, Any]]:
    """:func:`~dbllm_compile.profiling.top_ops` over ``steps`` calls of ``step``."""
    from dbllm_compile.profiling import profiler, top_ops

    with profiler(device) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    return top_ops(prof, device, steps, top)


def greedy_match(model: torch.nn.Module, prompt_ids: torch.Tensor, *, new_tokens: int, init: str = "mse",
                 mode: str | None = "auto", artifact: str | None = None) -> dict[str, Any]:
    """Greedy tokens: backend (static cache, compiled) vs the eager quantized model (quantize+convert).

    With ``artifact`` (a directory written by ``dbllm-compile quantize`` or ``save_deployed``,
    16-bit activations), both sides use its trained layers: the eager model is the source model
    deployed afresh in its own dtype with the artifact's bits and scales copied in
    (:func:`~dbllm_compile.artifact.apply_layers`), the backend gets ``options["artifact"]``.
    """
    import dataclasses

    import dbllm_compile as dc
    from dbllm_compile.generate import StaticCacheGenerator

    device = next(model.parameters()).device
    ids = prompt_ids.to(device)
    cfg = dc.DBLLMConfig(init=init)
    options: dict[str, Any] = {"init": init}
    if artifact is not None:
        from dbllm_compile.artifact import apply_layers
        from dbllm_compile.artifact.format import read_manifest

        stored = dc.DBLLMConfig.from_dict(read_manifest(artifact)["config"])
        if stored.activation_bits != 16:
            raise ValueError(f"greedy_match: artifact {artifact!r} has {stored.activation_bits}-bit activations; "
                             "the torch.compile backend lowers 16-bit-activation artifacts only")
        # every artifact layer's scales are overwritten, so the cheap init is enough
        cfg = dataclasses.replace(stored, init="maxabs", init_refine_iters=0)
        options = {"init": "maxabs", "artifact": str(artifact), "group_size": stored.group_size,
                   "include": tuple(stored.include), "exclude": tuple(stored.exclude), "keep_head": stored.keep_head,
                   "codebook": stored.codebook}
    deployed = dc.convert(dc.quantize(model, (ids,), cfg, example_kwargs={"use_cache": False}, progress=False),
                          progress=False)
    if artifact is not None:
        apply_layers(deployed, artifact)
    seq = ids
    margins = []  # eager top-1 minus top-2 logit per step: how close each greedy choice was
    with torch.no_grad():
        for _ in range(new_tokens):
            last = deployed(seq).logits[:, -1].float()
            top2 = last.topk(2, dim=-1).values[0]
            margins.append(float(top2[0] - top2[1]))
            nxt = last.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    eager = seq[0, ids.shape[1]:].tolist()
    del deployed
    gen = StaticCacheGenerator(model, max_cache_len=ids.shape[1] + new_tokens + 8, backend="dbllm",
                               options=options, mode=mode)
    gen.generate(ids, new_tokens)
    compiled = gen.generate(ids, new_tokens).tokens[0].tolist()
    same = next((i for i, (a, b) in enumerate(zip(eager, compiled)) if a != b), len(eager))
    return {"init": init, "artifact": artifact, "new_tokens": new_tokens, "eager_tokens": eager,
            "compiled_tokens": compiled, "identical": eager == compiled,
            "first_difference_at": None if eager == compiled else same, "eager_top2_margins": margins,
            "margin_at_first_difference": None if eager == compiled else margins[same]}
