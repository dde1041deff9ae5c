"""Where the CUDA W(1+1)A4 deploy path departs from the CPU reference (a device diagnostic).

    python3 benchmarks/a4_gpu_diagnose.py

1. Op level, shapes of a tiny Llama (M = 33 tokens, G = 64): ``act_quant`` (fake quant),
   ``act_quant_int`` and ``db_linear_a4`` on CUDA against the same ops on CPU.
2. Model level: a random 2-layer Llama, deployed with 4-bit activations, logits of the fake-quant
   graph and of the int8 graph (``use_int_activations``) on CUDA against the CPU reference.
Prints relative errors; no assertion, the point is to see which piece differs.
"""

from __future__ import annotations

import copy

import torch

import dbllm_compile as dc
from dbllm_compile.passes.int_activations import use_int_activations


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ops_level() -> None:
    import dbllm_compile.backends  # noqa: F401  (registers the CUDA kernels)
    from dbllm_compile.reference import pack_planes

    g = 64
    for m, n, k in [(33, 128, 256), (33, 256, 256), (33, 512, 256), (33, 256, 512), (6, 40, 128), (64, 256, 256)]:
        gen = torch.Generator().manual_seed(m + n + k)
        bits = torch.randint(0, 2, (2, n, k), generator=gen, dtype=torch.uint8)
        packed = pack_planes(bits[0], bits[1])
        a1 = (torch.rand(n, k // g, generator=gen) * 0.04 + 0.01).half()
        a2 = (-torch.rand(n, k // g, generator=gen) * 0.02).half()
        x = torch.randn(m, k, generator=gen).half()
        r = torch.tensor(0.85)
        xq_cpu = torch.ops.dbllm.act_quant(x, r)
        xq_gpu = torch.ops.dbllm.act_quant(x.cuda(), r.cuda())
        codes_cpu, s_cpu = torch.ops.dbllm.act_quant_int(x, r)
        codes_gpu, s_gpu = torch.ops.dbllm.act_quant_int(x.cuda(), r.cuda())
        y16_cpu = torch.ops.dbllm.db_linear(xq_cpu, packed, a1, a2, None, k, g)
        y16_gpu = torch.ops.dbllm.db_linear(xq_gpu, packed.cuda(), a1.cuda(), a2.cuda(), None, k, g)
        y4_cpu = torch.ops.dbllm.db_linear_a4(codes_cpu, s_cpu, packed, a1, a2, None, k, g, torch.float16)
        y4_gpu = torch.ops.dbllm.db_linear_a4(codes_gpu, s_gpu, packed.cuda(), a1.cuda(), a2.cuda(), None, k, g,
                                             torch.float16)
        print(f"M={m} N={n} K={k}: act_quant {rel(xq_gpu, xq_cpu):.2e}  codes equal "
              f"{torch.equal(codes_gpu.cpu(), codes_cpu)} scales equal {torch.equal(s_gpu.cpu(), s_cpu)}  "
              f"db_linear {rel(y16_gpu, y16_cpu):.2e}  db_linear_a4 {rel(y4_gpu, y4_cpu):.2e}  "
              f"a4 vs 16-bit (CPU) {rel(y4_cpu, y16_cpu):.2e}", flush=True)


def model_level() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    for dtype in (torch.float16,):
        model = LlamaForCausalLM(cfg).eval().to(dtype)
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))

        def deployed(m: torch.nn.Module, device: str):
            q = dc.quantize(m.to(device), (ids.to(device),), example_kwargs={"use_cache": False},
                            config=dc.DBLLMConfig(activation_bits=4), progress=False)
            for p in q.activation_parameters():
                p.data.fill_(1.5)
            return dc.convert(q, progress=False)

        d_cpu = deployed(copy.deepcopy(model), "cpu")
        d_gpu = deployed(copy.deepcopy(model), "cuda")
        test = torch.randint(0, 512, (3, 11), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ref = d_cpu(test, use_cache=False).logits.float()
            fake_gpu = d_gpu(test.cuda(), use_cache=False).logits.float()
            use_int_activations(d_cpu.graph_module)
            use_int_activations(d_gpu.graph_module)
            int_cpu = d_cpu(test, use_cache=False).logits.float()
            int_gpu = d_gpu(test.cuda(), use_cache=False).logits.float()
        node_level(d_gpu, test.cuda())
        print(f"model {dtype}: fake-quant CUDA vs CPU {rel(fake_gpu, ref):.2e}; int CPU vs fake CPU "
              f"{rel(int_cpu, ref):.2e}; int CUDA vs int CPU {rel(int_gpu, int_cpu):.2e}; int CUDA vs fake CUDA "
              f"{rel(int_gpu, fake_gpu):.2e}", flush=True)


def node_level(deployed, ids: torch.Tensor) -> None:
    """Every ``db_linear_a4`` / ``act_quant_int`` call of the int8 graph on CUDA against the CPU op
    on the same (copied) inputs: which call departs, and with which argument layouts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    targets = {torch.ops.dbllm.db_linear_a4.default, torch.ops.dbllm.act_quant_int.default}
    calls = []

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in targets:
                cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
                with torch.utils._python_dispatch._disable_current_modes():
                    ref = func(*cpu_args, **(kwargs or {}))
                outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
                errs = ["%.1e" % rel(o, r) for o, r in zip(outs, refs)]
                lay = [(tuple(a.shape), a.stride(), str(a.dtype)[6:]) for a in args if isinstance(a, torch.Tensor)][:2]
                calls.append(f"  {func.__name__} #{len(calls)}: rel err {errs}  args {lay}  rest {[a for a in args if not isinstance(a, torch.Tensor)]}")
            return out

    with torch.no_grad(), Probe():
        deployed(ids, use_cache=False)
    print("\n".join(calls), flush=True)


if __name__ == "__main__":
    ops_level()
    model_level()
