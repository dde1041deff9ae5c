"""The dual-binary linear as ``torch.library`` operators (defined here and nowhere else).

``torch.ops.dbllm.db_linear_train(x, weight, a1, a2, bias, group_size, scale_dtype, c=None)``
    Training form. ``weight`` is the latent ``[N, K]`` weight, ``a1``/``a2`` the learnable
    ``[N, ceil(K/G)]`` scales, ``c`` the optional learnable ``[N, ceil(K/G)]`` offset of the sign
    codebook (``None``: the {0,1} form, exactly as before the argument existed). Forward:
    scales and offset rounded to ``scale_dtype``, nearest-level bits of ``weight - c``,
    ``y = x @ (a1*b1 + a2*b2 + c).T + bias``. Backward:

    - ``dL/dx = dL/dy @ w_hat``
    - ``dL/dweight = dL/dw_hat`` (straight-through estimator through the bit assignment)
    - ``dL/da1[n, g] = sum_{k in g} dL/dw_hat[n, k] * b1[n, k]`` (and ``a2`` with ``b2``;
      straight through the rounding to ``scale_dtype``)
    - ``dL/dc[n, g] = sum_{k in g, k < K} dL/dw_hat[n, k]`` (``d w_hat / d c = 1``; bits straight
      through, as for the scales)
    - ``dL/dbias = sum of dL/dy`` over all leading dimensions.

``torch.ops.dbllm.db_linear(x, packed, a1, a2, bias, in_features, group_size, c=None)``
    Deploy form: ``packed`` is ``uint8 [2, N, K_pad/8]`` in the reference layout of
    :mod:`dbllm_compile.reference.packing`, ``a1``/``a2`` the stored scales, ``c`` the stored
    offset (sign codebook) or ``None``. The weights are frozen: the backward gives
    ``dL/dx = dL/dy @ w_hat`` and ``dL/dbias`` only (gradients through a frozen 2-bit model, e.g.
    a model compiled with ``backend="dbllm"`` outside ``no_grad``).

    ``c`` is the LAST argument and defaults to ``None`` so that call sites and saved graphs of
    the {0,1} form keep their seven arguments. Passes read node arguments by name with
    :func:`op_arguments`, never by position.

``torch.ops.dbllm.act_quant_train(x, clip_logit, group_size=0)`` / ``torch.ops.dbllm.act_quant(x, clip_ratio, group_size=0)``
    Dynamic 4-bit activation quantization (fake quant: the output has the shape and dtype of
    ``x``), defined in :mod:`dbllm_compile.reference.activation`: one scale per token
    (``group_size=0``) or per token and group of ``group_size`` contiguous features (``K`` must
    be divisible by it). The training form takes the learnable logit ``theta``
    (``r = sigmoid(theta)``) and has the straight-through / LSQ gradients of
    :func:`~dbllm_compile.reference.activation.fake_quantize_activation_backward`; the deploy
    form takes the stored ratio ``r`` and is frozen (``dL/dx`` straight through only).
    ``group_size`` is the LAST argument and defaults to 0 (per token) so that call sites and
    saved graphs from before it existed keep their two arguments; read it with
    :func:`op_arguments`.

``torch.ops.dbllm.hadamard(x, block_size)``
    The block-diagonal orthonormal Hadamard rotation of the last dimension of ``x``
    (:func:`dbllm_compile.reference.rotation.rotate`); the input of rotated linears
    (``DBLLMConfig.rotation_block``), whose weights hold ``W @ Q``. Linear and self-inverse: the
    backward is the same rotation of ``dL/dy``. One node per rotated activation, shared by
    sibling linears and placed before their ``act_quant`` (4-bit activations are quantized in
    the rotated basis).

    Why separate ops instead of an activation-mode argument on the linears: linears that read the
    same tensor (q/k/v, gate/up) must share *one* quantized activation and *one* clip factor. A
    separate node placed once before the siblings expresses exactly that in the graph (the pass
    inserts one node per shared input; a kernel backend may later fuse it into the matmuls), and
    the existing ``db_linear``/``db_linear_train`` schemas, saved graphs and kernels are left
    untouched.

The default (CPU) implementations are the pure-PyTorch references in
:mod:`dbllm_compile.reference.linear`. Device kernels plug in per device key with
``db_linear.register_kernel("cuda")`` (see :mod:`dbllm_compile.backends`); the schemas, fake
kernels and autograd live here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from dbllm_compile.reference.activation import (
    clip_ratio_from_logit,
    fake_quantize_activation,
    fake_quantize_activation_backward,
    straight_through_mask,
)
from dbllm_compile.reference.dual_binary import num_groups
from dbllm_compile.reference.rotation import rotate
from dbllm_compile.reference.linear import (
    db_linear_packed_reference,
    db_linear_train_reference,
    train_weight_reference,
)

__all__ = [
    "act_quant",
    "act_quant_train",
    "db_linear",
    "db_linear_train",
    "hadamard",
    "op_arguments",
    "ACT_QUANT_OP",
    "ACT_QUANT_TRAIN_OP",
    "DEPLOY_OP",
    "HADAMARD_OP",
    "TRAIN_OP",
]


def _check_offset(op: str, c: torch.Tensor | None, n: int, g: int) -> None:
    if c is not None:
        torch._check(
            tuple(c.shape) == (n, g),
            lambda: f"{op}: offset c shape {tuple(c.shape)} != {(n, g)} (one per output channel and group)",
        )


def _check_train_args(x, weight, a1, a2, bias, group_size, c=None) -> None:
    n, k = weight.shape
    g = num_groups(k, group_size)
    torch._check(x.shape[-1] == k, lambda: f"db_linear_train: x has {x.shape[-1]} features, weight expects {k}")
    torch._check(tuple(a1.shape) == (n, g), lambda: f"db_linear_train: a1 shape {tuple(a1.shape)} != {(n, g)}")
    torch._check(tuple(a2.shape) == (n, g), lambda: f"db_linear_train: a2 shape {tuple(a2.shape)} != {(n, g)}")
    _check_offset("db_linear_train", c, n, g)
    if bias is not None:
        torch._check(tuple(bias.shape) == (n,), lambda: f"db_linear_train: bias shape {tuple(bias.shape)} != {(n,)}")


@torch.library.custom_op("dbllm::db_linear_train", mutates_args=())
def db_linear_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    scale_dtype: torch.dtype,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training form of the dual-binary linear (see the module docstring)."""
    _check_train_args(x, weight, a1, a2, bias, group_size, c)
    return db_linear_train_reference(x, weight, a1, a2, bias, group_size, scale_dtype, c)


@db_linear_train.register_fake
def _db_linear_train_fake(x, weight, a1, a2, bias, group_size, scale_dtype, c=None):
    _check_train_args(x, weight, a1, a2, bias, group_size, c)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _train_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, a1, a2, bias, group_size, scale_dtype, c = inputs
    ctx.save_for_backward(x, weight, a1, a2, c)
    ctx.group_size = group_size
    ctx.scale_dtype = scale_dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _train_backward(ctx: Any, grad_y: torch.Tensor):
    x, weight, a1, a2, c = ctx.saved_tensors
    g = ctx.group_size
    n, k = weight.shape
    w_hat, b1, b2 = train_weight_reference(weight, a1, a2, g, ctx.scale_dtype, c)
    grad_x = grad_w = grad_a1 = grad_a2 = grad_b = grad_c = None
    needs_c = c is not None and ctx.needs_input_grad[7]
    gy2 = grad_y.reshape(-1, n)
    if ctx.needs_input_grad[0]:
        grad_x = (grad_y @ w_hat.to(grad_y.dtype)).to(x.dtype)
    if any(ctx.needs_input_grad[1:4]) or needs_c:
        acc = torch.promote_types(torch.float32, x.dtype)  # at least float32 accumulation
        grad_w_hat = gy2.to(acc).T @ x.reshape(-1, k).to(acc)  # [N, K]
        if ctx.needs_input_grad[1]:
            grad_w = grad_w_hat.to(weight.dtype)
        pad = b1.shape[1] - k
        gw = torch.nn.functional.pad(grad_w_hat, (0, pad)).reshape(n, -1, g)
        if ctx.needs_input_grad[2]:
            grad_a1 = (gw * b1.reshape(n, -1, g)).sum(-1).to(a1.dtype)
        if ctx.needs_input_grad[3]:
            grad_a2 = (gw * b2.reshape(n, -1, g)).sum(-1).to(a2.dtype)
        if needs_c:  # padded features carry a zero gradient: only real ones count
            grad_c = gw.sum(-1).to(c.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_b = gy2.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_a1, grad_a2, grad_b, None, None, grad_c


db_linear_train.register_autograd(_train_backward, setup_context=_train_setup_context)


def _check_deploy_args(x, packed, a1, a2, bias, in_features, group_size, c=None) -> None:
    n = packed.shape[1]
    g = num_groups(in_features, group_size)
    torch._check(packed.dtype == torch.uint8, lambda: f"db_linear: packed must be uint8, got {packed.dtype}")
    torch._check(
        packed.dim() == 3 and packed.shape[0] == 2 and packed.shape[2] * 8 == g * group_size,
        lambda: f"db_linear: packed shape {tuple(packed.shape)} does not hold 2 planes of "
        f"{g * group_size} bits",
    )
    torch._check(x.shape[-1] == in_features, lambda: f"db_linear: x has {x.shape[-1]} features, layer expects {in_features}")
    torch._check(tuple(a1.shape) == (n, g), lambda: f"db_linear: a1 shape {tuple(a1.shape)} != {(n, g)}")
    torch._check(tuple(a2.shape) == (n, g), lambda: f"db_linear: a2 shape {tuple(a2.shape)} != {(n, g)}")
    _check_offset("db_linear", c, n, g)
    if bias is not None:
        torch._check(tuple(bias.shape) == (n,), lambda: f"db_linear: bias shape {tuple(bias.shape)} != {(n,)}")


@torch.library.custom_op("dbllm::db_linear", mutates_args=())
def db_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deploy form of the dual-binary linear (see the module docstring)."""
    _check_deploy_args(x, packed, a1, a2, bias, in_features, group_size, c)
    return db_linear_packed_reference(x, packed, a1, a2, bias, in_features, group_size, c)


@db_linear.register_fake
def _db_linear_fake(x, packed, a1, a2, bias, in_features, group_size, c=None):
    _check_deploy_args(x, packed, a1, a2, bias, in_features, group_size, c)
    return x.new_empty((*x.shape[:-1], packed.shape[1]))


def _deploy_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, packed, a1, a2, bias, in_features, group_size, c = inputs
    ctx.save_for_backward(packed, a1, a2, c)
    ctx.in_features, ctx.group_size = in_features, group_size
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _deploy_backward(ctx: Any, grad_y: torch.Tensor):
    from dbllm_compile.reference.dual_binary import dequantize_bits, padded_in_features
    from dbllm_compile.reference.packing import unpack_planes

    packed, a1, a2, c = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        b1, b2 = unpack_planes(packed, padded_in_features(ctx.in_features, ctx.group_size))
        w_hat = dequantize_bits(b1, b2, a1, a2, ctx.group_size, c)[:, : ctx.in_features]
        grad_x = (grad_y @ w_hat.to(grad_y.dtype)).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_b, None, None, None


db_linear.register_autograd(_deploy_backward, setup_context=_deploy_setup_context)


def _check_act_args(op: str, x: torch.Tensor, clip: torch.Tensor, group_size: int = 0) -> None:
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have a feature dimension, got a 0-d tensor")
    torch._check(x.dtype.is_floating_point, lambda: f"{op}: x must be a float tensor, got {x.dtype}")
    torch._check(
        clip.numel() == 1,
        lambda: f"{op}: the clip parameter must have one element (one factor per quantized "
        f"activation), got shape {tuple(clip.shape)}",
    )
    torch._check_value(
        group_size >= 0,
        lambda: f"{op}: group_size must be >= 0 (0 = one scale per token), got {group_size}",
    )
    if group_size > 0:
        k = x.shape[-1]
        torch._check_value(
            k % group_size == 0,
            lambda: f"{op}: the feature dimension K={k} of x (shape {tuple(x.shape)}) is not divisible by "
            f"group_size={group_size}; choose an activation group size that divides K, or 0 for one "
            f"scale per token",
        )


@torch.library.custom_op("dbllm::act_quant_train", mutates_args=())
def act_quant_train(x: torch.Tensor, clip_logit: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Training form of the 4-bit activation quantizer: ``[..., K] -> [..., K]`` (module docstring)."""
    _check_act_args("act_quant_train", x, clip_logit, group_size)
    return fake_quantize_activation(x, clip_ratio_from_logit(clip_logit), group_size)


@act_quant_train.register_fake
def _act_quant_train_fake(x, clip_logit, group_size=0):
    _check_act_args("act_quant_train", x, clip_logit, group_size)
    return torch.empty_like(x)


def _act_train_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, clip_logit = inputs[:2]
    ctx.group_size = inputs[2] if len(inputs) > 2 else 0
    ctx.save_for_backward(x, clip_logit)


def _act_train_backward(ctx: Any, grad_y: torch.Tensor):
    x, clip_logit = ctx.saved_tensors
    grad_x, grad_clip = fake_quantize_activation_backward(grad_y, x, clip_logit, ctx.group_size)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_clip if ctx.needs_input_grad[1] else None,
            None)


act_quant_train.register_autograd(_act_train_backward, setup_context=_act_train_setup_context)


@torch.library.custom_op("dbllm::act_quant", mutates_args=())
def act_quant(x: torch.Tensor, clip_ratio: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Deploy form of the 4-bit activation quantizer with a stored ratio ``r`` in ``(0, 1]``."""
    _check_act_args("act_quant", x, clip_ratio, group_size)
    return fake_quantize_activation(x, clip_ratio, group_size)


@act_quant.register_fake
def _act_quant_fake(x, clip_ratio, group_size=0):
    _check_act_args("act_quant", x, clip_ratio, group_size)
    return torch.empty_like(x)


def _act_deploy_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, clip_ratio = inputs[:2]
    ctx.group_size = inputs[2] if len(inputs) > 2 else 0
    ctx.save_for_backward(x, clip_ratio)


def _act_deploy_backward(ctx: Any, grad_y: torch.Tensor):
    x, clip_ratio = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        # Same straight-through rule as training (clipped elements get no gradient); r is frozen.
        inside = straight_through_mask(x, clip_ratio, ctx.group_size)
        grad_x = torch.where(inside, grad_y, torch.zeros_like(grad_y)).to(x.dtype)
    return grad_x, None, None


act_quant.register_autograd(_act_deploy_backward, setup_context=_act_deploy_setup_context)


def _check_hadamard_args(x: torch.Tensor, block_size: int) -> None:
    torch._check_value(
        block_size >= 2 and block_size & (block_size - 1) == 0,
        lambda: f"hadamard: block_size must be a power of two >= 2, got {block_size}",
    )
    torch._check(x.dtype.is_floating_point, lambda: f"hadamard: x must be a float tensor, got {x.dtype}")
    k = x.shape[-1]
    torch._check_value(
        k % block_size == 0,
        lambda: f"hadamard: the feature dimension K={k} of x (shape {tuple(x.shape)}) is not divisible by "
        f"block_size={block_size}",
    )


@torch.library.custom_op("dbllm::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block-diagonal Hadamard rotation of the last dimension (see the module docstring)."""
    _check_hadamard_args(x, block_size)
    return rotate(x, block_size)


@hadamard.register_fake
def _hadamard_fake(x, block_size):
    _check_hadamard_args(x, block_size)
    return torch.empty_like(x)


def _hadamard_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.block_size = inputs[1]


def _hadamard_backward(ctx: Any, grad_y: torch.Tensor):
    return hadamard(grad_y, ctx.block_size), None  # symmetric orthonormal: Q.T == Q


hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup_context)


def op_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of a call to one of the ops above, by schema name (defaults filled in).

    ``node.args``/``node.kwargs`` of a ``db_linear_train`` / ``db_linear`` node may or may not
    hold the trailing ``c``; this is the one place that knows the schema order.

    Example:
        >>> # a = op_arguments(node); a["a1"], a["c"]   # c is None for the {0,1} form
    """
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


TRAIN_OP = torch.ops.dbllm.db_linear_train.default
DEPLOY_OP = torch.ops.dbllm.db_linear.default
ACT_QUANT_TRAIN_OP = torch.ops.dbllm.act_quant_train.default
ACT_QUANT_OP = torch.ops.dbllm.act_quant.default
HADAMARD_OP = torch.ops.dbllm.hadamard.default


# ----------------------------------------------------------------------------- autocast

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_autocast_lib = torch.library.Library("dbllm", "IMPL")  # lives as long as the module


def _register_train_autocast(device_type: str, key: str) -> None:
    """Autocast rule of ``db_linear_train`` on ``device_type``: cast the activation ``x`` only.

    Under ``torch.autocast(device_type, dtype=D)`` a floating ``x`` (float64 excepted, as autocast
    does for its own ops) is cast to ``D`` and the op runs with autocast off: ``y = x_D @
    w_hat.to(D).T + bias`` in ``D``, like ``nn.Linear`` under autocast. The latent ``weight``,
    ``a1``, ``a2`` and ``c`` are *not* cast: the bits and ``w_hat`` come from the float32 master
    values (rounded to ``scale_dtype`` as always), and their gradients are float32
    (:func:`_train_backward` accumulates ``dL/dw_hat`` in float32 and returns each gradient in its
    parameter's dtype). ``dL/dx`` is computed in ``D`` and cast back to ``x``'s dtype by the
    autograd of the cast. The fake kernel then sees ``x_D`` too, so compiled graphs agree with
    eager ones on the output dtype (without this rule the op's ``F.linear`` was lowered by
    autocast inside the op while its fake kernel said float32, and ``x`` was saved in float32).
    """
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset: Any, x: torch.Tensor, *rest: Any, **kwargs: Any) -> torch.Tensor:
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype(device_type))
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return TRAIN_OP(x, *rest, **kwargs)

    _autocast_lib.impl("db_linear_train", kernel, key, with_keyset=True)


for _device_type, _key in _AUTOCAST_KEYS.items():
    _register_train_autocast(_device_type, _key)
