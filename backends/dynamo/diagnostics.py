"""What the ``"dbllm"`` backend did: counters readable from Python, and log lines.

Every graph the backend compiles adds a :class:`GraphRecord`; :func:`stats` returns a
:class:`CompileStats` snapshot (totals, per-graph records, Dynamo's graph breaks and the number
of recompilations seen), :func:`reset_stats` clears it. The same facts are logged on the
``dbllm_compile.compile`` logger (INFO: one line per graph; DEBUG: every skipped linear).

Example::

    from dbllm_compile.backends.dynamo import stats
    cmodel(ids)
    print(stats().summary())          # rewritten / skipped with reasons / graph breaks / recompiles
    assert stats().linears_rewritten == 210
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CompileStats", "GraphRecord", "stats", "reset_stats", "record_graph", "logger"]

logger = logging.getLogger("dbllm_compile.compile")


@dataclass
class GraphRecord:
    """One graph handed to the backend.

    Attributes:
        compile_id: Dynamo's compile id (``"frame/attempt"``); attempt > 0 is a recompilation.
        recompile: whether this graph recompiles a frame compiled before.
        mode: ``"quantize"`` (linears quantized on the fly), ``"lower"`` (existing dual-binary
            ops lowered) or ``"passthrough"`` (nothing of ours in the graph).
        training: whether the graph was compiled for training (some input requires grad).
        rewritten: layer names quantized on the fly.
        lowered: counts of dual-binary ops by how they were lowered
            (``"db_linear_gpu"``, ``"db_linear"``, ``"db_linear_train:decomposed"``, ...);
            ``"db_linear_gpu:fused_groups"`` / ``"db_linear_gpu:fused_linears"``: fused sibling
            calls emitted and the ``db_linear_gpu`` calls they replace (:mod:`.fusion`);
            ``"db_glu_gpu:fused"``: gated MLPs rewritten into one ``db_glu_gpu`` call;
            ``"db_gemv_pdl"``: batch-1 calls launched with PDL (:mod:`.pdl`).
        skipped: ``(layer, node, reason)`` of linears left in full precision.
        fallbacks: ``(node, reason)`` of dual-binary ops left on a slower path.
        weight_cache_hits: layers whose quantized weights were reused from an earlier graph.
        seconds: time spent in the backend's own passes (not Inductor).
    """

    compile_id: str
    recompile: bool
    mode: str
    training: bool
    rewritten: list[str] = field(default_factory=list)
    lowered: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    weight_cache_hits: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        lowered = ", ".join(f"{v} {k}" for k, v in sorted(self.lowered.items())) or "none"
        return (f"graph {self.compile_id}{' (recompile)' if self.recompile else ''} [{self.mode}"
                f"{', training' if self.training else ''}]: rewrote {len(self.rewritten)} linear(s), "
                f"skipped {len(self.skipped)}, lowered ops: {lowered}, fallbacks {len(self.fallbacks)}, "
                f"{self.seconds:.2f} s")


@dataclass
class CompileStats:
    """A snapshot of the backend's counters (see the module docstring)."""

    graphs: list[GraphRecord]
    graph_breaks: dict[str, int]

    @property
    def graphs_compiled(self) -> int:
        return len(self.graphs)

    @property
    def recompiles(self) -> int:
        return sum(g.recompile for g in self.graphs)

    @property
    def linears_rewritten(self) -> int:
        return sum(len(g.rewritten) for g in self.graphs)

    @property
    def ops_lowered(self) -> Counter:
        total: Counter = Counter()
        for g in self.graphs:
            total.update(g.lowered)
        return total

    @property
    def fused_groups(self) -> int:
        """Fused ``db_linear_gpu`` calls emitted by the sibling fusion (:mod:`.fusion`)."""
        return self.ops_lowered["db_linear_gpu:fused_groups"]

    @property
    def linears_fused(self) -> int:
        """``db_linear_gpu`` calls replaced by those fused calls."""
        return self.ops_lowered["db_linear_gpu:fused_linears"]

    @property
    def glu_fused(self) -> int:
        """Gated MLPs (``silu(gate(x)) * up(x)``) rewritten into one ``db_glu_gpu`` call (:mod:`.fusion`)."""
        return self.ops_lowered["db_glu_gpu:fused"]

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        return [s for g in self.graphs for s in g.skipped]

    @property
    def fallbacks(self) -> list[tuple[str, str]]:
        return [f for g in self.graphs for f in g.fallbacks]

    @property
    def num_graph_breaks(self) -> int:
        return sum(self.graph_breaks.values())

    def summary(self) -> str:
        lines = [
            f"dbllm backend: {self.graphs_compiled} graph(s), {self.recompiles} recompile(s), "
            f"{self.num_graph_breaks} graph break(s); rewrote {self.linears_rewritten} linear(s), "
            f"skipped {len(self.skipped)}; lowered {dict(self.ops_lowered)}; "
            f"{len(self.fallbacks)} fallback(s)"
        ]
        if self.fused_groups:
            lines.append(f"  fused {self.linears_fused} sibling db_linear_gpu call(s) into {self.fused_groups} call(s)")
        if self.glu_fused:
            lines.append(f"  fused {self.glu_fused} gated MLP(s) (silu(gate) * up) into db_glu_gpu call(s)")
        reasons: dict[str, list[str]] = {}
        for name, _, reason in self.skipped:
            reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            lines.append(f"  skipped {shown}: {reason}")
        lines.extend(f"  fallback {node}: {reason}" for node, reason in self.fallbacks)
        lines.extend(f"  graph break x{n}: {reason}" for reason, n in self.graph_breaks.items())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs_compiled": self.graphs_compiled,
            "recompiles": self.recompiles,
            "graph_breaks": self.num_graph_breaks,
            "graph_break_reasons": dict(self.graph_breaks),
            "linears_rewritten": self.linears_rewritten,
            "ops_lowered": dict(self.ops_lowered),
            "fused_groups": self.fused_groups,
            "linears_fused": self.linears_fused,
            "glu_fused": self.glu_fused,
            "skipped": [list(s) for s in self.skipped],
            "fallbacks": [list(f) for f in self.fallbacks],
        }


_lock = threading.Lock()
_graphs: list[GraphRecord] = []
_breaks_at_reset: Counter = Counter()


def _dynamo_graph_breaks() -> Counter:
    from torch._dynamo.utils import counters

    return Counter(dict(counters["graph_break"]))


def record_graph(record: GraphRecord) -> None:
    """Add a graph's record and log it."""
    with _lock:
        _graphs.append(record)
    logger.info("%s", record.line())
    for name, node, reason in record.skipped:
        logger.debug("  skipped %s (node %s): %s", name, node, reason)
    for node, reason in record.fallbacks:
        logger.info("  fallback %s: %s", node, reason)


def stats() -> CompileStats:
    """The counters since the last :func:`reset_stats` (or process start)."""
    breaks = _dynamo_graph_breaks()
    breaks.subtract(_breaks_at_reset)
    with _lock:
        return CompileStats(graphs=list(_graphs), graph_breaks={k: v for k, v in breaks.items() if v > 0})


def reset_stats() -> None:
    """Forget every record (Dynamo's own counters are not touched; graph breaks count from now)."""
    global _breaks_at_reset
    with _lock:
        _graphs.clear()
        _breaks_at_reset = _dynamo_graph_breaks()
