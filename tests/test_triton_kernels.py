"""Triton kernels of the packed linear against the reference.

On a machine without a GPU every kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``,
set below before Triton is imported) on tiny shapes, fp16 only (the interpreter's bf16 ``tl.dot``
is wrong). With a GPU the same tests run on CUDA with real shapes, fp16 and bf16, plus the op
integration (eager, ``torch.compile``, CUDA graphs).

Tolerances: the kernels decode exactly the reference's weights (``fp16(a1*b1 + a2*b2)``; the sum
is rounded once in both) and accumulate in float32, so the output differs from a float32
product of the same weights only by accumulation order and the final rounding to the
activation dtype: ``rtol = 2 ulp`` of the dtype (fp16 2e-3, bf16 1.6e-2), ``atol = rtol * max|y|``.
Layout conversions and the dequantize kernel are bit-exact.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, DTYPES, GPU, assert_close, make_layer, reference

import dbllm_compile  # noqa: E402,F401
import dbllm_compile.backends  # noqa: E402,F401  (registers the CUDA kernel and db_linear_gpu)
from dbllm_compile.backends import triton as dbt  # noqa: E402
from dbllm_compile.backends.triton import launch, tuning  # noqa: E402
from dbllm_compile.backends.triton.launch import KernelConfig  # noqa: E402
from dbllm_compile.reference import dequantize_bits  # noqa: E402
from dbllm_compile.reference.linear import db_linear_packed_reference  # noqa: E402


# ---------------------------------------------------------------- layout (bit-exact)

@pytest.mark.parametrize("n,k,g", [(5, 100, 32), (7, 64, 64), (3, 2048, 128), (4, 48, 16), (9, 1100, 64)],
                         ids=["pad", "k=g", "g128", "g16", "k>1024"])
def test_layout_roundtrip_and_dequantize_are_exact(n, k, g):
    packed, a1, a2, _, bits = make_layer(n, k, g, device="cpu")
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16, rows_per_chunk=2)
    assert gw.qweight.dtype == torch.int32 and gw.qweight.shape[1] * 16 % 1024 == 0
    p2, c1, c2 = dbt.from_gpu_layout(gw)
    assert torch.equal(p2, packed) and torch.equal(c1, a1) and torch.equal(c2, a2)
    w_ref = dequantize_bits(bits[0], bits[1], a1, a2, g)[:, :k].half()
    assert torch.equal(dbt.dequantize_gpu_layout(gw), w_ref)


def test_layout_rejects_unsupported_group_size():
    packed, a1, a2, _, _ = make_layer(4, 96, 48, device="cpu")
    with pytest.raises(ValueError, match="group_size=48"):
        dbt.to_gpu_layout(packed, a1, a2, 96, 48, torch.float16)


# ---------------------------------------------------------------- kernels

if GPU:
    SHAPES = [(1, 4096, 4096, 64), (16, 11008, 4096, 64), (7, 4000, 4160, 64), (33, 1000, 4100, 64),
              (100, 512, 64, 64), (257, 4096, 1024, 128), (1, 300, 1000, 32), (300, 2048, 8192, 64)]
    CONFIGS = None  # every tuning candidate of the shape's M bucket
else:
    SHAPES = [(1, 40, 100, 32), (5, 70, 256, 64), (3, 48, 64, 64), (7, 50, 128, 64), (33, 20, 192, 64)]
    CONFIGS = [KernelConfig(block_m=16, block_n=32, block_k=128), KernelConfig(block_m=16, block_n=16, block_k=256),
               KernelConfig(block_m=32, block_n=64, block_k=64, group_tiles=2),
               KernelConfig(block_m=16, block_n=32, block_k=64, group_tiles=2, swap=True),
               KernelConfig(kind="dequant", block_n=16, block_k=128),
               KernelConfig(kind="dequant", block_n=16, block_k=128, chunk_n=32)]
SHAPE_IDS = [f"m{m}-n{n}-k{k}-g{g}" for m, n, k, g in SHAPES]


def _configs(m, n, k, g):
    cands = tuning.candidates(m, n, k, g) if CONFIGS is None else CONFIGS
    return [c for c in cands if launch.config_fits(c, g)] or [tuning.default_config(m, n, k, g)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("m,n,k,g", SHAPES, ids=SHAPE_IDS)
def test_every_config_matches_reference(m, n, k, g, dtype):
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=m + n)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype).to(DEVICE)
    ref = reference(x, packed, a1, a2, bias, k, g)
    ref_nb = reference(x, packed, a1, a2, None, k, g)
    for i, cfg in enumerate(_configs(m, n, k, g)):
        with_bias = i % 2 == 0
        y = dbt.run_config(x, gw, bias if with_bias else None, cfg)
        assert y.shape == (m, n) and y.dtype == dtype, cfg.short()
        assert torch.isfinite(y).all(), cfg.short()
        assert_close(y, ref if with_bias else ref_nb, dtype)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_dequantize_kernel_is_exact(dtype, g):
    n, k = (1000, 4160) if GPU else (40, 200)
    packed, a1, a2, _, _ = make_layer(n, k, g)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, dtype)
    for cfg in (KernelConfig(kind="dequant", block_n=16, block_k=128), KernelConfig(kind="dequant", block_n=8, block_k=256)):
        w = launch.launch_dequant(gw, dtype, cfg)
        assert torch.equal(w.cpu(), dbt.dequantize_gpu_layout(gw).cpu()), cfg.short()
    wide = torch.zeros(n, k + 8, dtype=dtype, device=DEVICE)  # into a caller's buffer with a row stride
    assert launch.launch_dequant(gw, dtype, cfg, out=wide[:, 4:4 + k]).data_ptr() == wide[:, 4:].data_ptr()
    assert torch.equal(wide[:, 4:4 + k].cpu(), w.cpu()) and not wide[:, :4].any() and not wide[:, 4 + k:].any()
    with pytest.raises(ValueError, match="unit stride along K"):
        launch.launch_dequant(gw, dtype, cfg, out=wide[:, :k].t().contiguous().t())


@pytest.mark.parametrize("shape", [(1, 100), (5, 100), (2, 3, 100)], ids=["m1", "odd-m", "3d"])
def test_dispatcher_matches_reference_and_caches_weights(shape):
    n, k, g = 40, 100, 32
    packed, a1, a2, bias, _ = make_layer(n, k, g)
    x = torch.randn(*shape).half().to(DEVICE)
    dbt.clear_cache()
    y = dbt.db_linear_cuda(x, packed, a1, a2, bias, k, g)
    assert y.shape == (*shape[:-1], n) and dbt.cache_size() == 1
    ref = db_linear_packed_reference(x.cpu().float(), packed.cpu(), a1.cpu(), a2.cpu(), bias.cpu().float(), k, g)
    assert_close(y, ref, torch.float16)
    dbt.db_linear_cuda(x, packed, a1, a2, bias, k, g)
    assert dbt.cache_size() == 1  # same tensors: no second repack
    with torch.no_grad():
        a1.mul_(2)  # in-place update bumps the version: the entry is re-prepared
    y2 = dbt.db_linear_cuda(x, packed, a1, a2, None, k, g)
    ref2 = db_linear_packed_reference(x.cpu().float(), packed.cpu(), a1.cpu(), a2.cpu(), None, k, g)
    assert_close(y2, ref2, torch.float16)
    del packed, a1, a2
    import gc

    gc.collect()
    assert dbt.cache_size() == 0  # entries die with their tensors


def test_dispatcher_falls_back_to_reference_for_fp32():
    packed, a1, a2, bias, _ = make_layer(8, 64, 64)
    x = torch.randn(3, 64, device=DEVICE)
    y = dbt.db_linear_cuda(x, packed, a1, a2, bias, 64, 64)
    torch.testing.assert_close(y, db_linear_packed_reference(x, packed, a1, a2, bias, 64, 64))


def test_tuning_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("DBLLM_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_memory", None)
    cfg = KernelConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)
    tuning._store(DEVICE, tuning.cache_key(torch.float16, 4096, 4096, 64, 2), cfg)
    monkeypatch.setattr(tuning, "_memory", None)  # a new process
    assert tuning.lookup(DEVICE, torch.float16, 9, 4096, 4096, 64) == cfg  # same M bucket (16)
    assert tuning.lookup(DEVICE, torch.float16, 17, 4096, 4096, 64) is None
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_gpu_op_opcheck_and_reference_on_cpu():
    n, k, g = 24, 100, 32
    packed, a1, a2, bias, _ = make_layer(n, k, g, device="cpu")
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(2, 3, k).half()
    y = torch.ops.dbllm.db_linear_gpu(x, gw.qweight, gw.scales, bias, k, g)
    assert_close(y, reference(x.reshape(-1, k), packed, a1, a2, bias, k, g).reshape(2, 3, n), torch.float16)
    torch.library.opcheck(torch.ops.dbllm.db_linear_gpu.default, (x.float(), gw.qweight, gw.scales.float(), None, k, g))


# ---------------------------------------------------------------- GPU integration

gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_op_eager_compile_and_cuda_graph(dtype):
    n, k, g = 2048, 1024, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g)
    x = torch.randn(2, 3, k, device=DEVICE, dtype=dtype)
    op = torch.ops.dbllm.db_linear
    ref = reference(x.reshape(-1, k), packed, a1, a2, bias, k, g).reshape(2, 3, n)
    y = op(x, packed, a1, a2, bias, k, g)  # eager: prepares + tunes
    assert_close(y, ref, dtype)
    compiled = torch.compile(lambda t: op(t, packed, a1, a2, bias, k, g), fullgraph=True)
    assert_close(compiled(x), ref, dtype)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = op(static_x, packed, a1, a2, bias, k, g)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    assert_close(static_y, reference(x2.reshape(-1, k), packed, a1, a2, bias, k, g).reshape(2, 3, n), dtype)


@gpu_only
def test_gpu_op_under_torch_compile_sees_the_kernel():
    n, k, g = 1024, 1024, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(5, k, device=DEVICE, dtype=torch.float16)
    f = torch.compile(lambda t: torch.ops.dbllm.db_linear_gpu(t, gw.qweight, gw.scales, bias, k, g) * 2,
                      fullgraph=True)
    assert_close(f(x), 2 * reference(x, packed, a1, a2, bias, k, g), torch.float16)


@gpu_only
def test_traced_gpu_op_tunes_its_static_shape(tmp_path, monkeypatch):
    """A compiled decode step (static M) is tuned at trace time, not run with the default."""
    from dbllm_compile.backends.triton import tuning

    monkeypatch.setenv("DBLLM_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_memory", None)
    n, k, g = 1536, 1024, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g)
    gw = dbt.to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
    assert tuning.lookup(x.device, x.dtype, 1, n, k, g) is None
    f = torch.compile(lambda t: torch.ops.dbllm.db_linear_gpu(t, gw.qweight, gw.scales, bias, k, g), fullgraph=True)
    assert_close(f(x), reference(x, packed, a1, a2, bias, k, g), torch.float16)
    assert tuning.lookup(x.device, x.dtype, 1, n, k, g) is not None


@gpu_only
@pytest.mark.parametrize("k", [1024, 1000])
def test_sign_codebook_offset_on_cuda_matches_reference(k):
    """``dbllm::db_linear`` with the per-group offset ``c`` (sign codebook) on CUDA: the kernel
    plus the offset term outside it equals the reference."""
    from dbllm_compile.reference.linear import db_linear_packed_reference

    n, g = 768, 64
    packed, a1, a2, bias, _ = make_layer(n, k, g, seed=3)
    c = (torch.randn(n, a1.shape[1], device=DEVICE) * 0.01).half()
    x = torch.randn(3, 5, k, device=DEVICE, dtype=torch.float16)
    y = torch.ops.dbllm.db_linear(x, packed, a1, a2, bias, k, g, c)
    ref = db_linear_packed_reference(x.float().cpu(), packed.cpu(), a1.cpu(), a2.cpu(), bias.cpu(), k, g, c.cpu())
    assert_close(y.float().cpu(), ref.float(), torch.float16)
