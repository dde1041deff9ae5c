"""Quantized weights of the on-the-fly mode: computed once per parameter, shared by every graph.

A model compiled for generation gives the backend several graphs (prefill, decode, a
recompilation for a new shape); each reads the same parameters. The dual-binary form of a
parameter is therefore cached here, keyed by the parameter's identity and version counter and
by everything that determines the bits (group size, init, scale dtype, layout, target form).
Entries are held through weak references to the parameter: an entry dies with its parameter,
and an in-place update of the parameter (``param._version`` changes) re-quantizes it.

Forms:

- ``"reference"``: ``(packed uint8 [2, N, K_pad/8], a1, a2)`` with the scales in the stored
  ``scale_dtype``: what ``dbllm::db_linear`` reads (CPU, and CUDA through the dispatcher); with
  ``codebook="sign"`` ``(packed, a1, a2, c)`` (the offset, same shape and dtype as the scales).
- a float dtype (``torch.float16`` / ``torch.bfloat16``): the GPU layout
  (:class:`~dbllm_compile.backends.triton.GpuWeights`) for activations of that dtype, what
  ``dbllm::db_linear_gpu`` reads. The reference-layout planes are not kept on the GPU.

Artifact hook: :func:`load_artifact_layers` is where ``options["artifact"]`` is read.
"""

from __future__ import annotations

from typing import Any

import torch

from dbllm_compile.config import DBLLMConfig
from dbllm_compile.errors import ConfigError
from dbllm_compile.passes.quantize_linears import _init_layer
from dbllm_compile.reference.dual_binary import check_weight
from dbllm_compile.reference.linear import train_weight_reference
from dbllm_compile.reference.packing import pack_planes
from dbllm_compile.tensor_cache import TensorCache

__all__ = ["quantized_weights", "clear_weight_cache", "weight_cache_size", "load_artifact_layers"]

_cache = TensorCache()


@torch.no_grad()
def _quantize(param: torch.Tensor, layout: str, config: DBLLMConfig, name: str):
    weight = param.detach()
    latent = weight if layout == "nk" else weight.t()
    if config.rotation_block:  # the input is rotated by Q: quantize W @ Q, as quantize() does
        from dbllm_compile.reference.rotation import rotate_weight

        latent = rotate_weight(latent, config.rotation_block)
    check_weight(latent, name)
    init, _ = _init_layer(latent, config, name)  # the same initialisation as quantize()
    c = getattr(init, "c", None)
    sd = config.torch_scale_dtype
    _, b1, b2 = train_weight_reference(latent, init.a1, init.a2, config.group_size, sd, c)
    return pack_planes(b1, b2), init.a1.to(sd), init.a2.to(sd), None if c is None else c.to(sd)


def quantized_weights(param: torch.Tensor, layout: str, config: DBLLMConfig, form: Any, name: str) -> tuple[Any, bool]:
    """``(weights in the given form, cache hit)`` for ``param`` (see the module docstring).

    The bits are those :func:`dbllm_compile.quantize` followed by :func:`dbllm_compile.convert`
    give the same weight with the same config: same initialisation, same rounding of the scales.
    """
    key = (layout, config.group_size, config.init, config.init_grid_points, config.init_refine_iters,
           config.scale_dtype, config.codebook, config.rotation_block, form)
    cached = _cache.get((param,), key)
    if cached is not None:
        return cached, True
    packed, a1, a2, c = _quantize(param, layout, config, name)
    if form == "reference":
        value: Any = (packed, a1, a2) if c is None else (packed, a1, a2, c)
    else:
        if c is not None:
            raise ConfigError(f"layer {name!r}: the GPU layout has no offset; the sign codebook runs on "
                              "dbllm::db_linear (form 'reference')")
        from dbllm_compile.backends.triton import to_gpu_layout

        in_features = param.shape[1] if layout == "nk" else param.shape[0]
        value = to_gpu_layout(packed, a1, a2, in_features, config.group_size, form)
        del packed
    return _cache.put((param,), value, key), False


def clear_weight_cache() -> None:
    """Drop every cached quantized weight, per layer and fused (compiled graphs keep the ones they use)."""
    from .fusion import clear_fused_cache

    _cache.clear()
    clear_fused_cache()


def weight_cache_size() -> int:
    """Number of cached (parameter, form) entries."""
    return len(_cache)


def load_artifact_layers(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, Any]]:
    """Trained layers of an artifact: ``{weight name: (packed, a1, a2, group_size, c)}`` (``c`` the
    sign codebook's offset, or None).

    The hook of ``options["artifact"]``. Contract: weight names are module paths of the weight
    parameter as the model names it (``model.layers.0.self_attn.q_proj.weight``, the same names
    :func:`dbllm_compile.quantize` reports), ``packed`` is ``uint8 [2, N, K_pad/8]`` in the
    reference layout, ``a1``/``a2`` the stored scales. The backend uses these tensors for the
    layers they name instead of quantizing them on the fly.

    It delegates to ``dbllm_compile.artifact.load_layers`` (artifact loading, built separately);
    while that function does not exist the option is rejected instead of silently ignored.
    """
    from dbllm_compile import artifact

    loader = getattr(artifact, "load_layers", None)
    if loader is None:
        raise ConfigError(
            f"torch.compile backend 'dbllm': options['artifact']={path!r} needs artifact loading "
            "(dbllm_compile.artifact.load_layers), which this version of dbllm_compile does not have "
            "yet; leave 'artifact' out to quantize on the fly, or compile the model returned by "
            "dbllm_compile.quantize()/convert() (its trained ops are lowered as they are)"
        )
    return loader(path)
