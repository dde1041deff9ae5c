"""``dbllm::decode_attention`` (``backends/triton/decode_attention.py``) against its reference, and
the ``"dbllm"`` Hugging Face attention implementation (``dbllm_compile/attention.py``).

Without a GPU the kernels run in Triton's interpreter on CPU tensors; on a GPU, compiled.
The reference itself is checked against ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_setup import DEVICE, GPU

import dbllm_compile.backends  # noqa: F401
from dbllm_compile.backends.triton.decode_attention import (
    decode_attention_reference,
    default_splits,
    launch_decode_attention,
)

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def _inputs(b, h, hkv, length, d, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g).to(dtype).to(device)
    k = torch.randn(b, hkv, length, d, generator=g).to(dtype).to(device)
    v = torch.randn(b, hkv, length, d, generator=g).to(dtype).to(device)
    return q, k, v


def _close(y, ref, dtype):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.float().abs().max().item()), err


def test_reference_matches_sdpa():
    q, k, v = _inputs(2, 4, 2, 9, 16, torch.float32, device="cpu")
    keep = torch.rand(2, 1, 1, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True
    ref = decode_attention_reference(q, k, v, keep, 0.25)
    sd = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=keep,
                                        scale=0.25)
    torch.testing.assert_close(ref, sd.transpose(1, 2), rtol=1e-5, atol=1e-5)


CASES = [  # b, h, hkv, L, d, splits, block_l
    (1, 4, 4, 1, 64, 1, 16),
    (1, 4, 2, 37, 64, 1, 16),
    (2, 6, 2, 37, 80, 3, 16),  # head dim not a power of 2; GQA 3
    (1, 3, 1, 152, 128, 5, 32),
    (2, 2, 2, 64, 32, 4, 16),  # slices of exactly one tile
    (1, 2, 1, 50, 64, 7, 8),  # more slices requested than fit: the launcher trims them
]


@pytest.mark.parametrize("b,h,hkv,length,d,splits,block_l", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "bool_bh"])
def test_kernel_matches_reference(b, h, hkv, length, d, splits, block_l, mask_kind):
    dtype = torch.float16
    q, k, v = _inputs(b, h, hkv, length, d, dtype, seed=length + d)
    g = torch.Generator().manual_seed(7)
    mask = None
    if mask_kind == "bool":  # a static cache's mask: positions up to the current one
        pos = torch.tensor([length // 2, length - 1][:b])
        mask = (torch.arange(length)[None, :] <= pos[:, None])[:, None, None, :].expand(b, 1, 1, length)
    elif mask_kind == "float":
        mask = torch.where(torch.rand(1, 1, 1, length, generator=g) > 0.5, 0.0, torch.finfo(dtype).min).to(dtype)
        mask[..., 0] = 0.0
    elif mask_kind == "bool_bh":
        mask = torch.rand(b, h, 1, length, generator=g) > 0.4
        mask[..., -1] = True
    if mask is not None:
        mask = mask.to(DEVICE)
    ref = decode_attention_reference(q, k, v, mask, d ** -0.5)
    y = launch_decode_attention(q, k, v, mask, d ** -0.5, block_l=block_l, splits=splits)
    _close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_dtypes(dtype):
    q, k, v = _inputs(1, 4, 2, 40, 64, dtype, seed=3)
    ref = decode_attention_reference(q, k, v, None, 0.125)
    _close(launch_decode_attention(q, k, v, None, 0.125, block_l=16, splits=2), ref, dtype)


def test_rows_masked_out_entirely_give_zeros():
    q, k, v = _inputs(2, 2, 2, 20, 32, torch.float16, seed=5)
    keep = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    keep[1] = False
    keep = keep.to(DEVICE)
    for splits in (1, 2):
        y = launch_decode_attention(q, k, v, keep, 0.2, block_l=16, splits=splits)
        assert torch.isfinite(y).all()
        assert (y[1] == 0).all()
        _close(y[:1], decode_attention_reference(q[:1], k[:1], v[:1], keep[:1], 0.2), torch.float16)


def test_strided_cache_views():
    """k/v as views of a larger cache ([B, L, H, D] transposed), q non-contiguous."""
    q, _, _ = _inputs(1, 4, 2, 30, 64, torch.float16, seed=9)
    big = torch.randn(1, 30, 2, 2, 64, generator=torch.Generator().manual_seed(2)).half().to(DEVICE)
    k, v = big[:, :, :, 0].transpose(1, 2), big[:, :, :, 1].transpose(1, 2)
    qs = torch.randn(1, 1, 4, 64, generator=torch.Generator().manual_seed(4)).half().to(DEVICE).transpose(1, 2)
    for qq in (q, qs):
        _close(launch_decode_attention(qq, k, v, None, 0.125, block_l=16, splits=3),
               decode_attention_reference(qq, k, v, None, 0.125), torch.float16)


def test_default_splits():
    assert default_splits(32, 152, 32, 132) == 5  # Llama-2-7B decode: 5 tiles of 32 caps 9 wanted
    assert default_splits(32, 4096, 32, 132) == 9
    assert default_splits(512, 4096, 32, 132) == 1
    assert default_splits(1, 10_000, 32, 132) == 16


def test_op_checks_shapes_and_runs_the_reference_on_cpu():
    q, k, v = _inputs(1, 4, 2, 12, 16, torch.float32, device="cpu")
    y = torch.ops.dbllm.decode_attention(q, k, v, None, 0.25)
    torch.testing.assert_close(y, decode_attention_reference(q, k, v, None, 0.25))
    with pytest.raises(RuntimeError, match="one query token"):
        torch.ops.dbllm.decode_attention(q.expand(1, 4, 2, 16), k, v, None, 0.25)
    with pytest.raises(RuntimeError, match="not a multiple"):
        torch.ops.dbllm.decode_attention(q[:, :3], k, v, None, 0.25)


@pytest.mark.skipif(not GPU, reason="the op's Triton path needs CUDA tensors")
def test_op_on_gpu_matches_reference():
    q, k, v = _inputs(1, 32, 8, 152, 128, torch.float16, seed=11)
    keep = (torch.arange(152) <= 100)[None, None, None, :].to(DEVICE)
    _close(torch.ops.dbllm.decode_attention(q, k, v, keep, 128 ** -0.5),
           decode_attention_reference(q, k, v, keep, 128 ** -0.5), torch.float16)


def test_hf_model_decode_matches_sdpa(tiny_llama, monkeypatch):
    """Greedy generation with a static cache: the "dbllm" attention gives sdpa's logits, and
    the compiled decode step (fullgraph) contains the op."""
    from dbllm_compile.attention import ATTENTION_NAME, use_decode_attention
    from dbllm_compile.generate import StaticCacheGenerator

    model = tiny_llama.to(DEVICE)
    ids = torch.tensor([[1, 5, 9, 3]], device=DEVICE)
    base = StaticCacheGenerator(model, max_cache_len=16, backend=None).generate(ids, max_new_tokens=6)
    with torch.no_grad():
        ref_logits = model(torch.cat([ids, base.tokens], 1)).logits
    use_decode_attention(model)
    assert model.config._attn_implementation == ATTENTION_NAME
    import dbllm_compile.attention as att

    calls = []
    orig = att._run_op

    def spy(*args):
        calls.append(tuple(args[0].shape))
        return orig(*args)

    monkeypatch.setattr(att, "_run_op", spy)
    ours = StaticCacheGenerator(model, max_cache_len=16, backend=None).generate(ids, max_new_tokens=6)
    assert calls, "the decode steps did not call dbllm::decode_attention"
    assert all(s[2] == 1 for s in calls)
    assert torch.equal(ours.tokens, base.tokens)
    with torch.no_grad():
        logits = model(torch.cat([ids, base.tokens], 1)).logits  # prefill path: sdpa
    torch.testing.assert_close(logits, ref_logits)
    comp = StaticCacheGenerator(model, max_cache_len=16, backend="inductor" if GPU else "eager")
    assert torch.equal(comp.generate(ids, max_new_tokens=6).tokens, base.tokens)


def test_long_caches_go_to_sdpa(tiny_llama, monkeypatch):
    import dbllm_compile.attention as att
    from dbllm_compile.generate import StaticCacheGenerator

    calls = []
    orig = att._run_op
    monkeypatch.setattr(att, "_run_op", lambda *a: calls.append(1) or orig(*a))
    monkeypatch.setattr(att, "MAX_CACHE_LEN", 8)
    ids = torch.tensor([[1, 5, 9, 3]], device=DEVICE)
    gen = StaticCacheGenerator(tiny_llama.to(DEVICE), max_cache_len=16, backend=None, attention="dbllm")
    gen.generate(ids, max_new_tokens=3)
    assert not calls


def test_use_decode_attention_rejects_non_hf_models(mlp):
    from dbllm_compile.attention import use_decode_attention
    from dbllm_compile.errors import DBLLMError

    with pytest.raises(DBLLMError, match="Sequential"):
        use_decode_attention(mlp)
