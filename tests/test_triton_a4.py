"""4-bit-activation kernels (backends/triton/a4.py) against their references.

Without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported) on tiny shapes; with a GPU on CUDA. Codes and scales of the activation quantizer are
bit-exact; the int8 GEMM is compared with the float64 evaluation of the same formula
(``rtol`` 2 ulp of fp16 on ``max|y|``: the integer products are exact, only float32 scaling and
the final rounding differ) and, looser, with the module-level numerics (fake-quantized
activations rounded to fp16, then the dual-binary linear).
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, make_layer as make_packed_layer

from dbllm_compile.backends.triton import a4  # noqa: E402
from dbllm_compile.backends.triton.a4_reference import integer_weights, level_lut, level_scales, lut_levels  # noqa: E402
from dbllm_compile.backends.triton.layout import to_gpu_layout  # noqa: E402
from dbllm_compile.reference.activation import fake_quantize_activation, quantize_activation_int  # noqa: E402
from dbllm_compile.reference.linear import db_linear_packed_reference  # noqa: E402


def make_layer(n, k, g, seed=0):
    """A random layer in the GPU layout, plus its reference-layout planes and scales (on CPU)."""
    packed, a1, a2, bias, _ = make_packed_layer(n, k, g, seed=seed)
    gw = to_gpu_layout(packed, a1, a2, k, g, torch.float16)
    return gw, packed.cpu(), a1.cpu(), a2.cpu(), bias


@pytest.mark.parametrize("ratio", [0.95, 1.0, 0.3])
def test_act_quant_kernel_is_bit_exact(ratio):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 200, generator=gen) * 3
    x[1] = 0.0                                           # a zero row: scale 1, codes 0
    x[2, :8] = torch.tensor([7.0, -3.5, 2.5, 0.5, -0.5, 1.5, -2.5, 6.5])  # ties, r = 1 -> s = 1
    x[2, 8:] = 0.0
    x = x.half().to(DEVICE)
    r = torch.tensor(ratio)
    q, s = a4.act_quant_int8(x, r, k_alloc=256, block_k=64)
    q_ref, s_ref = quantize_activation_int(x.cpu(), r)
    assert torch.equal(q[:, :200].cpu(), q_ref) and torch.equal(q[:, 200:].cpu(), torch.zeros(6, 56, dtype=torch.int8))
    assert torch.equal(s.cpu(), s_ref.flatten())


@pytest.mark.parametrize("m,n,k,g", [(1, 48, 128, 32), (5, 40, 100, 32), (17, 64, 192, 64), (3, 32, 256, 128)],
                         ids=["m1", "pad-k-odd-n", "g64", "g128"])
@pytest.mark.parametrize("levels", ["exact", "group"])
def test_a4_matmul_matches_integer_reference(m, n, k, g, levels):
    gw, packed, a1, a2, bias = make_layer(n, k, g, seed=m + n)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(2)) * 2).half().to(DEVICE)
    r = torch.tensor(0.9)
    y = a4.a4_linear(x, r, gw, bias, levels=levels, block_m=16, block_n=32)
    q, s = a4.act_quant_int8(x, r, gw.qweight.shape[1] * 16)
    ref = a4.a4_linear_reference(q.cpu(), s.cpu(), _cpu(gw), bias.cpu(), levels=levels)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    if levels == "exact":  # the module-level numerics: fake-quantized fp16 activations, then the linear
        xq = fake_quantize_activation(x.cpu(), r)
        ref2 = db_linear_packed_reference(xq.float(), packed, a1, a2, bias.cpu().float(), k, g)
        torch.testing.assert_close(y.cpu().float(), ref2, rtol=4e-3, atol=4e-3 * ref2.abs().max().item())


def _cpu(gw):
    from dbllm_compile.backends.triton.layout import GpuWeights

    return GpuWeights(gw.qweight.cpu(), gw.scales.cpu(), gw.in_features, gw.group_size)


def test_int_levels_error_is_far_below_the_two_bit_error():
    gw, *_ = make_layer(64, 256, 64, seed=5)
    err = a4.int_level_error(_cpu(gw))
    assert err["rel_level_error"] < 1 / 127, err   # at most t/2 per level, t = max level / 127


def test_a4_rejects_unsupported_group_and_shape():
    gw, *_ = make_layer(32, 64, 32, seed=0)
    with pytest.raises(ValueError, match="features"):
        a4.a4_linear(torch.zeros(1, 65, dtype=torch.float16, device=DEVICE), torch.tensor(1.0), gw)
    assert not a4.a4_supported(16) and a4.a4_supported(64)


@pytest.mark.parametrize("k,with_c", [(128, False), (100, True)], ids=["k=4g", "pad-k-offset"])
def test_cuda_implementations_of_the_int_ops(k, with_c):
    """``int_dispatch`` (the CUDA kernels of ``act_quant_int`` / ``db_linear_a4``) against the
    reference ops: codes bit-exact, outputs within fp16 rounding (interpreter without a GPU)."""
    from dbllm_compile import ops_int  # noqa: F401
    from dbllm_compile.backends.triton.dispatch import clear_cache
    from dbllm_compile.backends.triton.int_dispatch import act_quant_int_cuda, db_linear_a4_cuda

    n, g = 40, 32
    packed, a1, a2, bias, _ = make_packed_layer(n, k, g, seed=7)
    c = (torch.randn(n, a1.shape[1], generator=torch.Generator().manual_seed(8)) * 0.01).half().to(DEVICE) if with_c else None
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(9)).half().to(DEVICE)
    r = torch.tensor(0.85, device=DEVICE)
    codes, scale = act_quant_int_cuda(x, r)
    ref_codes, ref_scale = quantize_activation_int(x.cpu(), r.cpu())
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scale.cpu(), ref_scale)
    y = db_linear_a4_cuda(codes, scale, packed, a1, a2, bias, k, g, torch.float16, c)
    ref = torch.ops.dbllm.db_linear_a4(codes.cpu(), scale.cpu(), packed.cpu(), a1.cpu(), a2.cpu(), bias.cpu().float(),
                                       k, g, torch.float32, None if c is None else c.cpu())
    assert y.shape == (2, 3, n) and y.dtype == torch.float16
    torch.testing.assert_close(y.cpu().float(), ref, rtol=4e-3, atol=4e-3 * ref.abs().max().item())
    clear_cache()


# ---- levels="row": one integer product over all of K, one step per output row -------------------

def _direct_levels(a1, a2, per_row):
    """Step and integer levels written out element by element (float32, numpy rint)."""
    import numpy as np

    a1, a2 = a1.float().numpy(), a2.float().numpy()
    top = np.maximum(np.maximum(np.abs(a1), np.abs(a2)), np.abs(a1 + a2))
    t = np.empty_like(a1)
    for n in range(a1.shape[0]):
        for g in range(a1.shape[1]):
            step = np.float32(max(top[n]) if per_row else top[n, g]) / np.float32(127.0)
            t[n, g] = step if step > 0 else np.float32(1.0)
    return torch.from_numpy(t), torch.from_numpy(np.rint(a1 / t)), torch.from_numpy(np.rint(a2 / t))


def test_row_step_and_integer_levels_match_a_direct_computation():
    gw, packed, a1, a2, bias = make_layer(6, 256, 64, seed=3)
    a1, a2 = gw.scales[:, :4, 0].cpu().clone(), gw.scales[:, :4, 1].cpu().clone()
    a1[2], a2[2] = 0.0, 0.0                          # an all-zero row: step 1, levels 0
    a1[3, 1] = 0.3                                   # an outlier group sets row 3's step
    t, i1, i2 = a4.row_int_levels(a1, a2)
    t_d, i1_d, i2_d = _direct_levels(a1, a2, per_row=True)
    assert torch.equal(t, t_d[:, 0]) and torch.equal(i1, i1_d) and torch.equal(i2, i2_d)
    assert t[2] == 1.0 and not i1[2].any() and i1[3, 1] == 127 and i1.abs().max() <= 127 and i2.abs().max() <= 127
    tg, i1g, i2g = a4.int_levels(a1, a2)             # the group step, unchanged
    tg_d, i1g_d, i2g_d = _direct_levels(a1, a2, per_row=False)
    assert torch.equal(tg, tg_d) and torch.equal(i1g, i1g_d) and torch.equal(i2g, i2g_d)
    rl = a4.prepare_row_levels(_cpu(gw))             # the kernel's tables: 4 levels per group, 0 past NG
    t, i1, i2 = a4.row_int_levels(gw.scales[:, :4, 0].cpu(), gw.scales[:, :4, 1].cpu())
    lv = lut_levels(rl.lut)
    assert torch.equal(rl.step, t) and rl.lut.shape == gw.scales.shape[:2] and not rl.lut[:, 4:].any()
    assert torch.equal(lv[:, :4], torch.stack([torch.zeros_like(i1), i1, i2, (i1 + i2).clamp(-127, 127)], -1).long())


def test_level_lut_clamps_the_sum_and_level_scales_count_it():
    assert lut_levels(level_lut(torch.tensor([64.0, -64.0, -127.0]), torch.tensor([64.0, -64.0, 0.0]))).tolist() == \
        [[0, 64, 64, 127], [0, -64, -64, -127], [0, -127, 0, -127]]
    with pytest.raises(ValueError, match="levels must lie"):
        level_lut(torch.tensor([128.0]), torch.tensor([0.0]))
    # a1 = a2: each is exactly 63.5 steps, both round to 64 (half to even), the sum 128 is clamped
    a = torch.tensor([[1.0]])
    assert [v.item() for v in a4.row_int_levels(a, a)[1:]] == [64.0, 64.0] and level_scales(a, a, "row")[2] == 1
    s1, s2, clamped = level_scales(torch.tensor([[0.5, 0.01]]), torch.tensor([[-0.25, 0.0]]), "row")
    assert clamped == 0 and torch.allclose(s1, torch.tensor([[0.5, 3 * 0.5 / 127]]))


def test_reference_levels_match_the_dequantized_layer():
    """Every mode of the float64 reference equals the dequantized layer with the mode's scales
    (``level_scales``) times the activations: the group form is the one measured before."""
    m, n, k, g = 3, 24, 200, 32
    gw, packed, a1, a2, bias = make_layer(n, k, g, seed=4)
    q, s = quantize_activation_int(torch.randn(m, k, generator=torch.Generator().manual_seed(5)), torch.tensor(0.9))
    q = torch.nn.functional.pad(q, (0, gw.k_pad - k))
    from dbllm_compile.reference import dequantize_bits
    from dbllm_compile.reference.packing import unpack_planes

    b1, b2 = unpack_planes(packed, gw.k_pad)
    for levels in ("exact", "group", "row"):
        scales = gw.scales[:, :gw.num_groups].cpu()
        s1, s2, clamped = level_scales(scales[..., 0], scales[..., 1], levels)
        assert clamped == 0
        w = dequantize_bits(b1, b2, s1.double(), s2.double(), g).double()
        direct = (q.double() @ w.T) * s.double() + bias.double()
        ref = a4.a4_linear_reference(q, s.flatten(), _cpu(gw), bias, levels=levels)
        torch.testing.assert_close(ref, direct, rtol=1e-6, atol=1e-6 * direct.abs().max().item())


ROW_CASES = [  # m, n, k, g, block_m, block_n, block_k, group_m
    (5, 40, 100, 32, 16, 32, 64, 2),      # odd M, N not a multiple of BLOCK_N, K not a multiple of BLOCK_K
    (1, 48, 64, 64, 16, 32, 64, 8),       # M = 1, K = G
    (17, 72, 448, 64, 16, 32, 128, 3),    # several groups per K step, partial band of row tiles
    (3, 32, 384, 128, 16, 32, 256, 8),    # G = 128, two groups per step, K = 1.5 steps
    (9, 40, 1000, 64, None, None, None, 8),  # default blocks, padded K
]


@pytest.mark.parametrize("m,n,k,g,bm,bn,bk,gm", ROW_CASES,
                         ids=["odd-m-pad-n-pad-k", "m1-k=g", "g64-k128", "g128-k256", "defaults"])
def test_a4_row_matmul_matches_its_reference(m, n, k, g, bm, bn, bk, gm):
    gw, packed, a1, a2, bias = make_layer(n, k, g, seed=m + n + k)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(6)) * 2).half().to(DEVICE)
    r = torch.tensor(0.9)
    y = a4.a4_linear(x, r, gw, bias, levels="row", block_m=bm, block_n=bn, block_k=bk, group_m=gm)
    q, s = a4.act_quant_int8(x, r, gw.qweight.shape[1] * 16)
    ref = a4.a4_linear_reference(q.cpu(), s.cpu(), _cpu(gw), bias.cpu(), levels="row")
    torch.testing.assert_close(y.cpu().double(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    # the launcher with prepared tables and codes padded only to K_pad (as int_dispatch pads them)
    q2 = torch.nn.functional.pad(q[:, :k], (0, gw.k_pad - k))
    y2 = a4.a4_matmul(q2, s, gw, bias, torch.float16, levels="row", row_levels=a4.prepare_row_levels(gw),
                      block_m=bm, block_n=bn, block_k=bk, group_m=gm)
    assert torch.equal(y2, y)


def test_a4_row_int32_extremes_and_bound():
    """All codes +-7 against all levels 127 (the clamped sum 64 + 64): the largest |sum| the
    int32 accumulator can see for this K, exact; and the launcher's K bound."""
    n, k, g = 32, 4096, 64
    bits = torch.ones(2, n, k, dtype=torch.uint8)
    from dbllm_compile.reference import pack_planes

    half = torch.full((n, k // g), 0.5)
    gw = to_gpu_layout(pack_planes(bits[0], bits[1]).to(DEVICE), half.to(DEVICE), half.to(DEVICE), k, g, torch.float16)
    assert lut_levels(a4.prepare_row_levels(gw).lut)[0, 0].tolist() == [0, 64, 64, 127]
    x = torch.ones(16, k, dtype=torch.float16, device=DEVICE)
    x[1::2] = -1.0
    y = a4.a4_linear(x, torch.tensor(1.0), gw, None, levels="row", block_m=16, block_n=32, block_k=256)
    expect = 127.0 * 7 * k / 127.0 * (1.0 / 7)      # t = 1/127, s = 1/7, every term 7 * 127
    assert torch.equal(y.cpu().float(), torch.tensor([expect, -expect]).repeat(8)[:, None].expand(16, n).half().float())
    assert a4.ROW_MAX_K == 2_415_617 and 7 * 127 * a4.ROW_MAX_K <= 2**31 - 1 < 7 * 127 * (a4.ROW_MAX_K + 1)
    big = a4.ROW_MAX_K + 1
    from dbllm_compile.backends.triton.layout import GpuWeights

    k_alloc = -(-big // 1024) * 1024
    gw_big = GpuWeights(torch.zeros(1, k_alloc // 16, dtype=torch.int32), torch.zeros(1, k_alloc // g, 2,
                        dtype=torch.float16), big, g)
    q = torch.zeros(1, k_alloc, dtype=torch.int8)
    with pytest.raises(ValueError, match="in_features=2415618 > 2415617"):
        a4.a4_matmul(q, torch.ones(1), gw_big, None, torch.float16, levels="row")


def test_a4_level_mode_errors():
    gw, *_ = make_layer(32, 128, 64, seed=0)
    q = torch.zeros(2, gw.qweight.shape[1] * 16, dtype=torch.int8, device=DEVICE)
    s = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="levels='rows' is not one of"):
        a4.a4_matmul(q, s, gw, None, torch.float16, levels="rows")
    with pytest.raises(ValueError, match="block_k=96 must be a multiple of group_size=64"):
        a4.a4_matmul(q, s, gw, None, torch.float16, levels="row", block_k=96)
    with pytest.raises(ValueError, match="block_k=128 applies to levels='row' only"):
        a4.a4_matmul(q, s, gw, None, torch.float16, levels="group", block_k=128)
    with pytest.raises(ValueError, match="row_levels were given"):
        a4.a4_matmul(q, s, gw, None, torch.float16, row_levels=a4.prepare_row_levels(gw))
    other, *_ = make_layer(16, 128, 64, seed=1)
    with pytest.raises(ValueError, match="row_levels do not match"):
        a4.a4_matmul(q, s, gw, None, torch.float16, levels="row", row_levels=a4.prepare_row_levels(other))
    with pytest.raises(ValueError, match="levels='Row'"):
        a4.a4_linear_reference(q.cpu(), s.cpu(), _cpu(gw), None, levels="Row")


def test_row_level_error_is_bounded_by_the_row_step():
    """Each level moves by at most t[n] / 2 (a1, a2) or t[n] (a1 + a2): the row form costs more
    than the group form (its step is the row's largest) but stays within that bound."""
    gw, *_ = make_layer(64, 256, 64, seed=5)
    gwc = _cpu(gw)
    t, _, _ = a4.row_int_levels(gwc.scales[:, :4, 0], gwc.scales[:, :4, 1])
    err_row, err_group = a4.int_level_error(gwc, "row"), a4.int_level_error(gwc, "group")
    assert err_row["max_abs_level_error"] <= t.max().item() * (1 + 1e-6)
    assert err_group["rel_level_error"] <= err_row["rel_level_error"] < 2 / 127
    assert a4.int_level_error(gwc, "exact")["rel_level_error"] == 0.0


@pytest.mark.parametrize("n,k,g,wide", [(40, 100, 32, False), (72, 448, 64, True), (24, 384, 128, False)],
                         ids=["g32-pad", "g64-k_alloc", "g128"])
def test_row_int8_decode_matches_the_integer_weights(n, k, g, wide):
    from dbllm_compile.backends.triton.a4_dense import decode_row_int8

    gw, *_ = make_layer(n, k, g, seed=n + k)
    k_w = gw.qweight.shape[1] * 16 if wide else None
    w = decode_row_int8(gw, k_w=k_w, block_n=32, block_k=128).cpu()
    w_ref, _ = integer_weights(_cpu(gw), "row")
    assert w.dtype == torch.int8 and w.shape == (n, k_w or gw.k_pad)
    assert torch.equal(w[:, :gw.k_pad].double(), w_ref) and not w[:, gw.k_pad:].any()


@pytest.mark.parametrize("m,n,k,g", [(17, 40, 100, 32), (33, 64, 448, 64), (20, 32, 384, 128)],
                         ids=["g32-pad-k", "g64", "g128"])
def test_a4_row_dense_matches_the_fused_kernel_and_reference(m, n, k, g):
    """decode + ``torch._int_mm`` + scale: the same float32 expression as the fused kernel."""
    from dbllm_compile.backends.triton.a4_dense import a4_row_dense_matmul, decode_row_int8

    gw, packed, a1, a2, bias = make_layer(n, k, g, seed=m + k)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(7)) * 2).half().to(DEVICE)
    r = torch.tensor(0.9)
    q, s = a4.act_quant_int8(x, r, gw.qweight.shape[1] * 16)
    y = a4_row_dense_matmul(q, s, gw, bias, torch.float16)
    fused = a4.a4_matmul(q, s, gw, bias, torch.float16, levels="row", block_m=16, block_n=32, block_k=g)
    ref = a4.a4_linear_reference(q.cpu(), s.cpu(), _cpu(gw), bias.cpu(), levels="row")
    torch.testing.assert_close(y.cpu().double(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    torch.testing.assert_close(y, fused, rtol=1e-3, atol=1e-3 * fused.abs().max().item())
    q_pad = q[:, :gw.k_pad].contiguous()   # codes only K_pad wide, weight decoded once and reused
    y2 = a4_row_dense_matmul(q_pad, s, gw, bias, torch.float16, w_int=decode_row_int8(gw))
    assert torch.equal(y2, y)
    with pytest.raises(ValueError, match="contiguous int8"):
        a4_row_dense_matmul(q[:, :k], s, gw, bias, torch.float16)
    with pytest.raises(ValueError, match="w_int must be int8"):
        a4_row_dense_matmul(q_pad, s, gw, bias, torch.float16, w_int=decode_row_int8(gw, k_w=q.shape[1]))
