"""``torch.profiler`` helpers shared by the benchmarks and the distillation stages' ``profile_steps``."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["profiler", "top_ops"]


def profiler(device: torch.device) -> Any:
    """A ``torch.profiler.profile`` recording CPU ops, and CUDA kernels on a CUDA device (not entered)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=acts)


def top_ops(prof: Any, device: torch.device, steps: int, top: int = 25) -> list[dict[str, Any]]:
    """The ``top`` entries by self device time (self CPU time without a GPU), per step, as dicts
    (name, microseconds per step, calls per step).

    On CUDA the table mixes ATen ops and the kernels they launch (both carry the kernels' device
    time), so its rows must not be summed; the first row, ``"(all kernels)"``, is the device time
    of the kernels alone.
    """
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    out = [{"name": e.key[:120], "us_per_step": getattr(e, key, 0.0) / steps, "calls_per_step": e.count / steps}
           for e in rows]
    if device.type == "cuda":
        from torch.autograd import DeviceType

        kernels = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        out.insert(0, {"name": "(all kernels)", "us_per_step": kernels / steps, "calls_per_step": 0.0})
    return out
