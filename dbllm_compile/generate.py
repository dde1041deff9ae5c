"""Text generation for Hugging Face causal LMs: static KV cache, compiled prefill and decode steps.

:class:`StaticCacheGenerator` owns one ``transformers.StaticCache`` (fixed shapes, so the decode
step compiles once and CUDA graphs can replay it) and two compiled step functions:

- prefill: the prompt ``[B, T]`` at cache positions ``0..T-1``, logits of the last position only;
- decode: one token ``[B, 1]`` at position ``p``; compiled with ``fullgraph=True`` and, on CUDA,
  ``mode="reduce-overhead"`` (CUDA graphs) by default. Greedy generation compiles the step with
  its argmax (the token ids come out of the graph); sampling compiles the step up to the logits.

Any ``torch.compile`` backend works (``"dbllm"`` for 2-bit weights, ``"inductor"`` for the
full-precision baseline, ``None`` for eager), which is what the ``generate`` and ``bench`` CLI
commands compare. Timings synchronise the device and separate the first call of each step (which
compiles) from the steady state.

Example::

    from dbllm_compile.generate import StaticCacheGenerator
    gen = StaticCacheGenerator(model, max_cache_len=256, backend="dbllm", options={"init": "mse"})
    result = gen.generate(tokenizer("Once upon", return_tensors="pt").input_ids, max_new_tokens=32)
    print(tokenizer.decode(result.tokens[0]), result.decode_tokens_per_s)
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from dbllm_compile.errors import DBLLMError
from dbllm_compile.static_cache import make_static_cache, set_step_positions, use_step_positions

__all__ = ["GenerationResult", "StaticCacheGenerator", "make_static_cache"]


@dataclass
class GenerationResult:
    """Output and timings of one :meth:`StaticCacheGenerator.generate` call.

    Attributes:
        tokens: ``[B, new_tokens]`` generated ids (the prompt excluded).
        prompt_tokens: prompt length ``T``.
        prefill_seconds: time of the prefill step (includes compilation on a first call).
        decode_seconds: time of the decode steps after the first generated token.
        decode_steps: number of decode steps timed.
        peak_memory_bytes: peak CUDA memory allocated during the call (None on CPU).
        first_call: whether this call compiled the steps (timings include compilation).
    """

    tokens: torch.Tensor
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    peak_memory_bytes: int | None
    first_call: bool

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.tokens.shape[0] * self.prompt_tokens / max(self.prefill_seconds, 1e-12)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.tokens.shape[0] * self.decode_steps / max(self.decode_seconds, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "tokens"}
        d.update(prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s,
                 new_tokens=int(self.tokens.shape[1]), batch=int(self.tokens.shape[0]))
        return d


def _prefill_step(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, cache_position: torch.Tensor,
                  extra: Mapping[str, Any]) -> torch.Tensor:
    set_step_positions(cache, cache_position)
    out = model(input_ids=input_ids, past_key_values=cache, cache_position=cache_position, use_cache=True, **extra)
    return out.logits[:, -1, :]


def _decode_step(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, cache_position: torch.Tensor,
                 extra: Mapping[str, Any]) -> torch.Tensor:
    set_step_positions(cache, cache_position)
    out = model(input_ids=input_ids, past_key_values=cache, cache_position=cache_position, use_cache=True, **extra)
    return out.logits[:, -1, :]


def _greedy_decode_step(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, cache_position: torch.Tensor,
                        extra: Mapping[str, Any]) -> torch.Tensor:
    """:func:`_decode_step` plus the greedy pick, ``[B, 1]`` token ids: the argmax runs inside the
    compiled graph (and its CUDA graph) instead of as one more eager kernel per token."""
    return _decode_step(model, input_ids, cache, cache_position, extra).argmax(dim=-1, keepdim=True)


def _compile_step(fn: Any, backend: Any, options: Mapping[str, Any] | None, mode: str | None) -> Any:
    """``torch.compile`` of one step. ``torch.compile`` refuses ``mode`` together with ``options``;
    the "dbllm" backend then takes the mode as ``options["mode"]``, any other backend gets an error."""
    kw: dict[str, Any] = {"backend": backend, "fullgraph": True, "dynamic": False}
    if options:
        opts = dict(options)
        if mode is not None and mode != "default":
            if backend != "dbllm":
                raise ValueError(f"StaticCacheGenerator: backend {backend!r} takes mode={mode!r} or options, not "
                                 "both (torch.compile refuses the pair); put the mode's settings into options")
            opts.setdefault("mode", mode)
        kw["options"] = opts
    else:
        kw["mode"] = mode
    return torch.compile(fn, **kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StaticCacheGenerator:
    """Generation with a static KV cache and compiled steps (see the module docstring).

    Args:
        model: a Hugging Face causal LM (``model(input_ids, past_key_values=StaticCache, ...)``).
        max_cache_len: prompt plus generated tokens must fit.
        backend: ``torch.compile`` backend of both steps (``"dbllm"``, ``"inductor"``, ...), or
            None to run eagerly.
        options: backend options (``torch.compile(options=...)``).
        mode: compile mode of the decode step; default ``"reduce-overhead"`` on CUDA, none on CPU.
        prefill_mode: compile mode of the prefill step (default none).
        attention: None keeps the model's attention implementation; ``"dbllm"`` switches the
            model (in place) to :mod:`dbllm_compile.attention`: decode steps run the Triton
            decode-attention kernel, everything else SDPA; ``"sdpa"`` switches it to SDPA.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_cache_len: int = 256,
        backend: str | Any | None = "dbllm",
        options: Mapping[str, Any] | None = None,
        mode: str | None = "auto",
        prefill_mode: str | None = None,
        attention: str | None = None,
    ):
        self.model = model.eval()
        if attention == "dbllm":
            from dbllm_compile.attention import use_decode_attention

            use_decode_attention(model)
        elif attention == "sdpa":
            if not hasattr(model, "set_attn_implementation"):
                raise DBLLMError(f"StaticCacheGenerator: attention='sdpa' needs a transformers model; "
                                 f"{type(model).__name__} has no set_attn_implementation (pass attention=None)")
            model.set_attn_implementation("sdpa")
        elif attention is not None:
            raise DBLLMError(f"StaticCacheGenerator: attention={attention!r}; use None, 'sdpa' or 'dbllm'")
        self.max_cache_len = max_cache_len
        self.device = next(model.parameters()).device
        if mode == "auto":
            mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.mode = mode
        self._extra: dict[str, Any] = {}
        params = inspect.signature(model.forward).parameters
        if "logits_to_keep" in params:
            self._extra["logits_to_keep"] = 1
        elif "num_logits_to_keep" in params:
            self._extra["num_logits_to_keep"] = 1
        if backend is None:
            self._prefill, self._decode, self._decode_greedy = _prefill_step, _decode_step, _greedy_decode_step
        else:  # (torch.compile compiles on the first call: only the decode step that runs is compiled)
            self._prefill = _compile_step(_prefill_step, backend, options, prefill_mode)
            self._decode = _compile_step(_decode_step, backend, options, mode)
            self._decode_greedy = _compile_step(_greedy_decode_step, backend, options, mode)
        self._cache: Any = None
        self._cache_batch = 0
        self._calls = 0

    def _fresh_cache(self, batch: int) -> Any:
        if self._cache is None or self._cache_batch != batch:
            self._cache = make_static_cache(self.model, batch, self.max_cache_len)
            self._cache_batch = batch
            # transformers allocates the cache tensors lazily, on the first update; one eager
            # token allocates them now, so the compiled steps never see an uninitialised cache
            # (which would cost a recompilation on the second call).
            one = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            _decode_step(self.model, one, self._cache, torch.zeros(1, dtype=torch.long, device=self.device), self._extra)
            # one counter for all layers, advanced once per step (dbllm_compile.static_cache)
            use_step_positions(self._cache)
        self._cache.reset()
        return self._cache

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``input_ids`` (``[B, T]``); greedy by default.

        Stops early when every row has produced ``eos_token_id``.
        """
        if input_ids.dim() != 2:
            raise DBLLMError(f"generate: input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        batch, t = input_ids.shape
        if t + max_new_tokens > self.max_cache_len:
            raise DBLLMError(
                f"generate: prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds max_cache_len="
                f"{self.max_cache_len}; create the generator with a larger max_cache_len"
            )
        input_ids = input_ids.to(self.device)
        first = self._calls == 0
        self._calls += 1
        cache = self._fresh_cache(batch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        logits = self._prefill(self.model, input_ids, cache, torch.arange(t, device=self.device), self._extra)
        token = self._pick(logits, temperature, top_k, generator).clone()
        _sync(self.device)
        t1 = time.perf_counter()
        out = [token]
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        # every position made on the device at once: a torch.tensor([...], device=cuda) per step is
        # a copy from pageable host memory, which waits for the stream, so the host could not queue
        # step n+1 while the GPU ran step n (about 0.4 ms per token on an H100, docs/results.md 6)
        positions = torch.arange(t, t + max(max_new_tokens - 1, 0), device=self.device)
        for step in range(max_new_tokens - 1):
            if eos_token_id is not None:
                done |= token.squeeze(-1) == eos_token_id
                if bool(done.all()):
                    break
            pos = positions[step:step + 1].clone()  # a fresh tensor: a view's storage offset would recompile on CPU
            if temperature <= 0:
                token = self._decode_greedy(self.model, token, cache, pos, self._extra).clone()
            else:
                logits = self._decode(self.model, token, cache, pos, self._extra)
                token = self._pick(logits, temperature, top_k, generator).clone()
            out.append(token)
        _sync(self.device)
        t2 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return GenerationResult(
            tokens=torch.cat(out, dim=1), prompt_tokens=t, prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
            decode_steps=len(out) - 1, peak_memory_bytes=peak, first_call=first,
        )
