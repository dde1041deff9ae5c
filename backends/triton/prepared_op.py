"""``torch.ops.dbllm.db_linear_gpu``: the linear on weights already in the GPU layout (``triton_op``),
and ``torch.ops.dbllm.db_glu_gpu``, a gated MLP's ``silu(gate(x)) * up(x)`` on the same weights.

``db_linear_gpu(x, qweight, scales, bias, in_features, group_size) -> Tensor``
``db_glu_gpu(x, qweight, scales, bias, in_features, group_size) -> Tensor``: ``qweight``/``scales``
(and ``bias``) hold the gate's rows then the up projection's (``2H`` rows); the result has ``H``
features. At batch 1 (fp16, a gemv configuration chosen for the ``2H x K`` shape) the gemv
kernel computes both products and the ``silu * up`` in its epilogue, one launch instead of the
linear plus Inductor's elementwise kernel (:mod:`.gemv`); otherwise it runs ``db_linear_gpu``'s
path and the elementwise product in torch ops (which Inductor fuses as before). Built by the
backend's GLU fusion (:mod:`dbllm_compile.backends.dynamo.fusion`).

``qweight``/``scales`` are :class:`~.layout.GpuWeights` fields (see :mod:`.layout`), prepared
once at load time with :func:`~.layout.to_gpu_layout` for the activation dtype. Unlike
``dbllm::db_linear`` (a ``custom_op``, opaque to Inductor, repacking through a cache), this op
is a ``torch.library.triton_op``: ``torch.compile`` sees the Triton kernels themselves and
AOTInductor packages can embed them, and there is no weight cache. Kernel configurations come
from the on-disk tuning cache (:mod:`.tuning`); a shape the cache lacks is tuned on the first
call: on the real inputs in eager mode, on synthetic inputs of the traced shapes while
``torch.compile`` or export traces the op with a static batch (a symbolic batch gets the
default configuration).

On CPU (and for activations or group sizes the kernels do not cover) it computes
``F.linear(x, dequantize_gpu_layout(...))``, the torch reference of the same numbers.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .launch import glu_gemv_applies, launch_gemv, run_config
from .layout import GpuWeights, dequantize_gpu_layout, supports_group_size
from .tuning import choose, choose_traced

__all__ = ["db_linear_gpu", "db_glu_gpu", "GPU_OP", "GLU_OP"]


def _is_real_cuda(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.is_cuda and not is_fake(t) and not torch.compiler.is_compiling()


def checked_weights(op: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                    group_size: int) -> GpuWeights:
    """The op's weights as :class:`GpuWeights`, after checking them against ``x`` (errors name ``op``)."""
    gw = GpuWeights(qweight, scales, in_features, group_size)
    torch._check(x.shape[-1] == in_features,
                 lambda: f"{op}: x has {x.shape[-1]} features, layer expects {in_features}")
    torch._check(qweight.dim() == 2 and qweight.shape[1] * 16 >= gw.k_pad,
                 lambda: f"{op}: qweight {tuple(qweight.shape)} too small for K={in_features}")
    return gw


def runs_kernels(x: torch.Tensor, scales: torch.Tensor, group_size: int) -> bool:
    """Whether the Triton kernels take this call (CUDA, the dtype the scales were prepared for, a
    supported group size); otherwise the torch reference runs."""
    return x.device.type == "cuda" and x.dtype == scales.dtype and supports_group_size(group_size)


def rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x`` as ``[M, K]`` with unit stride along K."""
    x2 = x.reshape(-1, in_features)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def glu_config(cfg):
    """``cfg`` for the GLU epilogue: a gemv's split-K dropped (the epilogue needs whole rows)."""
    return dataclasses.replace(cfg, split_k=1) if cfg.kind in ("gemv", "gemvc") and cfg.split_k > 1 else cfg


def _choose(x2: torch.Tensor, gw: GpuWeights, bias: torch.Tensor | None):
    """The kernel configuration of ``x2 @ gw`` (tuned on real inputs in eager mode; see module docstring)."""
    if _is_real_cuda(x2):
        return choose(x2, gw, bias)
    return choose_traced(x2.device, x2.dtype, x2.shape[0], gw.out_features, gw.in_features, gw.group_size,
                         bias is not None)


@torch.library.triton_op("dbllm::db_linear_gpu", mutates_args=())
def db_linear_gpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """``y = x @ w.T + bias`` with ``w`` decoded from the GPU layout (see module docstring)."""
    gw = checked_weights("db_linear_gpu", x, qweight, scales, in_features, group_size)
    n = qweight.shape[0]
    if not runs_kernels(x, scales, group_size):
        w = dequantize_gpu_layout(gw).to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2 = rows(x, in_features)
    cfg = _choose(x2, gw, bias)
    y = run_config(x2, gw, bias, cfg, wrap=True)
    return y.reshape(*x.shape[:-1], n)


def _gpu_setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, bias, in_features, group_size = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.in_features, ctx.group_size = in_features, group_size
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gpu_backward(ctx, grad_y):
    """Frozen weights: ``dL/dx = dL/dy @ w`` (dense weight from the GPU layout) and ``dL/dbias``."""
    qweight, scales = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        w = dequantize_gpu_layout(GpuWeights(qweight, scales, ctx.in_features, ctx.group_size))
        grad_x = (grad_y @ w.to(grad_y.dtype)).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_b, None, None


db_linear_gpu.register_autograd(_gpu_backward, setup_context=_gpu_setup_context)

GPU_OP = torch.ops.dbllm.db_linear_gpu.default


@torch.library.triton_op("dbllm::db_glu_gpu", mutates_args=())
def db_glu_gpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """``silu(y[..., :H]) * y[..., H:]`` with ``y = x @ w.T + bias``, ``w`` of ``2H`` rows (module docstring)."""
    gw = checked_weights("db_glu_gpu", x, qweight, scales, in_features, group_size)
    n = qweight.shape[0]
    torch._check(n % 2 == 0, lambda: f"db_glu_gpu: {n} weight rows; expected gate and up rows, 2H in all")
    h = n // 2
    if not runs_kernels(x, scales, group_size):
        w = dequantize_gpu_layout(gw).to(x.dtype)
        y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
        return F.silu(y[..., :h]) * y[..., h:]
    x2 = rows(x, in_features)
    cfg = glu_config(_choose(x2, gw, bias))
    if glu_gemv_applies(x2, gw, cfg):
        if bias is not None and bias.dtype != x2.dtype:
            bias = bias.to(x2.dtype)
        z = launch_gemv(x2, gw, bias, cfg, wrap=True, glu=True)
    else:
        y = run_config(x2, gw, bias, cfg, wrap=True)
        z = F.silu(y[:, :h]) * y[:, h:]
    return z.reshape(*x.shape[:-1], h)


def _glu_setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, bias, in_features, group_size = inputs
    ctx.save_for_backward(x, qweight, scales, bias)
    ctx.in_features, ctx.group_size = in_features, group_size


def _glu_backward(ctx, grad_z):
    """Frozen weights: gradients of ``x`` and ``bias`` through ``silu(g) * u`` (recomputed in float32)."""
    x, qweight, scales, bias = ctx.saved_tensors
    w = dequantize_gpu_layout(GpuWeights(qweight, scales, ctx.in_features, ctx.group_size)).float()
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    gate, up = y.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    dz = grad_z.float()
    grad_y = torch.cat([dz * up * sig * (1 + gate * (1 - sig)), dz * gate * sig], dim=-1)
    grad_x = (grad_y @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_b = None
    if bias is not None and ctx.needs_input_grad[3]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(bias.dtype)
    return grad_x, None, None, grad_b, None, None


db_glu_gpu.register_autograd(_glu_backward, setup_context=_glu_setup_context)

GLU_OP = torch.ops.dbllm.db_glu_gpu.default
