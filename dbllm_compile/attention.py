"""A Hugging Face attention implementation whose decode steps run ``torch.ops.dbllm.decode_attention``.

``transformers`` picks a model's attention function by name (``config._attn_implementation``).
:func:`use_decode_attention` registers the name ``"dbllm"`` (attention function and mask
function) and switches a model to it:

- one query token (a decode step), a cache of at most :data:`MAX_CACHE_LEN` positions, no
  dropout, no soft-capping, no position bias, no attention sinks: the Triton kernel of
  :mod:`dbllm_compile.backends.triton.decode_attention` on CUDA (float32 PyTorch reference
  elsewhere);
- anything else (prefill, training, the cases above): ``transformers``' own SDPA function,
  unchanged.

Masks are built exactly as for ``"sdpa"`` (the same mask function is registered under the new
name). The op is a ``torch.library.triton_op``: ``torch.compile`` (Inductor, the ``"dbllm"``
backend) and CUDA graphs see the kernel. It is used for both sides of the decode benchmark
(``--attention dbllm``), so the fp16 baseline gets the same attention as the 2-bit model.

Example::

    from dbllm_compile.attention import use_decode_attention
    use_decode_attention(model)          # model.config._attn_implementation == "dbllm"
"""

from __future__ import annotations

from typing import Any

import torch

from dbllm_compile.errors import DBLLMError

__all__ = ["ATTENTION_NAME", "decode_attention_forward", "register", "use_decode_attention"]

ATTENTION_NAME = "dbllm"
MAX_CACHE_LEN = 512
"""Longest KV cache (static cache length) the kernel takes; longer ones go to SDPA, which is faster
there on an H100 (``benchmarks/bench_attention.py``: at 1,024 and 4,096 cached positions cuDNN
and FlashAttention read the cache at a higher rate than this split-KV kernel)."""
_registered = False


def _op_available() -> bool:
    import dbllm_compile.backends  # noqa: F401  (defines dbllm::decode_attention when Triton imports)

    return hasattr(torch.ops.dbllm, "decode_attention")


def decode_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention function of the ``"dbllm"`` implementation (the ``transformers`` signature)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = (kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
               or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None
               or kwargs.get("output_attentions", False) or kwargs.get("cache") is not None)
    if (query.shape[2] != 1 or dropout != 0.0 or special or key.shape[-2] > MAX_CACHE_LEN
            or not _op_available()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _run_op(query, key, value, attention_mask, float(scale)), None


def _run_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return torch.ops.dbllm.decode_attention(q, k, v, mask, scale)


def register() -> None:
    """Register ``"dbllm"`` with ``transformers``' attention and mask interfaces. Idempotent."""
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:  # transformers < 4.53
        raise DBLLMError(f"the dbllm decode attention needs transformers >= 4.53 ({exc}); upgrade transformers or "
                         "keep attention='sdpa'") from exc
    AttentionInterface.register(ATTENTION_NAME, decode_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _registered = True


def use_decode_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a ``transformers`` model (in place) to the ``"dbllm"`` attention; returns it.

    Raises :class:`DBLLMError` for a model that does not take ``transformers``' attention
    interface (no ``config._attn_implementation``).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise DBLLMError(f"use_decode_attention: {type(model).__name__} is not a transformers model with an "
                         "attention implementation setting; use attention='sdpa' for it")
    register()
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(ATTENTION_NAME)
            return model
        except (ValueError, ImportError, TypeError):
            pass
    config._attn_implementation = ATTENTION_NAME
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTENTION_NAME
    return model
