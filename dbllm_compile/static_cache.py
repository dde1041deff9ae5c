"""The static KV cache of :mod:`dbllm_compile.generate`: built for the model, and written at the
step's own positions.

``transformers``' ``StaticCache`` keeps one position counter per layer (``cumulative_length``, a
0-d tensor): every layer's ``update`` writes at ``arange(n) + counter`` and then advances its own
counter in place. In a compiled decode step that is one more tiny kernel per layer (Inductor
does not fuse the 32 increments of a 32-layer model with anything: on an H100, 1.2 us of kernel
plus a launch gap each, ``docs/decode.md``). :func:`use_step_positions` turns the cache's layers
into ``StepPositionLayer`` s (a subclass made per layer class): they write at the positions the step passes
(``cache_position``, which the generator knows anyway), share one counter and advance it once
per step, from the first layer. Same cache contents, same ``get_seq_length()``.

Applied only to caches whose layers are all plain, initialised ``StaticLayer`` s with a tensor
counter (the ``transformers`` 5.x layout); any other cache is left as it is.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["make_static_cache", "use_step_positions", "set_step_positions"]


def make_static_cache(model: torch.nn.Module, batch_size: int, max_cache_len: int) -> Any:
    """A ``transformers.StaticCache`` for ``model`` (works with the 4.x and 5.x signatures)."""
    from transformers import StaticCache

    param = next(model.parameters())
    try:
        return StaticCache(config=model.config, max_cache_len=max_cache_len, max_batch_size=batch_size,
                           device=param.device, dtype=param.dtype)
    except TypeError:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)


class _StepPositions:
    """The positions of the current step, shared by the layers of one cache."""

    position: torch.Tensor | None = None


_classes: dict[type, type] = {}


def _step_position_class(base: type) -> type:
    cls = _classes.get(base)
    if cls is None:
        cls = type("StepPositionLayer", (base,), {"update": _update, "__doc__": _LAYER_DOC})
        _classes[base] = cls
    return cls


def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
    position = self._dbllm_steps.position
    if position is None:
        from dbllm_compile.errors import DBLLMError

        raise DBLLMError("static cache: a layer converted by use_step_positions() was updated without the step's "
                         "positions; call set_step_positions(cache, cache_position) before the model")
    if self._dbllm_first:
        self.cumulative_length.add_(key_states.shape[-2])
    self.keys.index_copy_(2, position, key_states)
    self.values.index_copy_(2, position, value_states)
    return self.keys, self.values


_LAYER_DOC = """A ``StaticLayer`` that writes at the step's ``cache_position`` (:func:`set_step_positions`)
instead of its own counter; the first layer advances the counter all layers share."""


def use_step_positions(cache: Any) -> bool:
    """Convert ``cache``'s layers in place (module docstring); True if it was converted.

    Call after the layers are initialised (their tensors allocated), before compiling against it.
    """
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    if not layers or getattr(cache, "_dbllm_steps", None) is not None:
        return getattr(cache, "_dbllm_steps", None) is not None
    for layer in layers:
        if type(layer) is not StaticLayer or not getattr(layer, "is_initialized", False):
            return False
        if not isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            return False
    steps = _StepPositions()
    counter = layers[0].cumulative_length
    for i, layer in enumerate(layers):
        layer.__class__ = _step_position_class(type(layer))
        layer._dbllm_steps = steps
        layer._dbllm_first = i == 0
        layer.cumulative_length = counter
    cache._dbllm_steps = steps
    return True


def set_step_positions(cache: Any, cache_position: torch.Tensor) -> None:
    """Tell a converted cache where this step writes (nothing for a cache left as it was)."""
    steps = getattr(cache, "_dbllm_steps", None)
    if steps is not None:
        steps.position = cache_position
