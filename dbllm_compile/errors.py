"""Exceptions raised by dbllm_compile.

Every error names the offending thing (layer, node, file, option), the value received,
and what to do instead.
"""

from __future__ import annotations

__all__ = [
    "DBLLMError",
    "ConfigError",
    "QuantizationError",
    "GraphPassError",
    "ArtifactError",
]


class DBLLMError(Exception):
    """Base class of every error raised by dbllm_compile."""


class ConfigError(DBLLMError, ValueError):
    """An invalid :class:`~dbllm_compile.DBLLMConfig` field or CLI option."""


class QuantizationError(DBLLMError, ValueError):
    """A weight cannot be quantized (NaN/Inf, wrong rank or dtype)."""


class GraphPassError(DBLLMError, RuntimeError):
    """A graph pass met a graph it cannot handle; the message names the node."""


class ArtifactError(DBLLMError, OSError):
    """An artifact on disk is missing, corrupt or of an unknown format version."""
