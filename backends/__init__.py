"""Execution backends of the dual-binary ops (installed as ``dbllm_compile.backends``).

Every device runs the pure-PyTorch reference registered as the default implementation of
``torch.ops.dbllm.db_linear`` / ``db_linear_train`` in :mod:`dbllm_compile.ops` (the CPU path and
the numerics oracle). Importing this package also installs, when Triton is importable, the
Triton kernels of :mod:`dbllm_compile.backends.triton` as the CUDA implementation of
``dbllm::db_linear`` and defines ``dbllm::db_linear_gpu`` (the same linear on weights prepared
in the GPU layout, visible to Inductor). The ``torch.compile`` backend ``"dbllm"`` will live
here too.
"""

from __future__ import annotations

__all__ = ["triton_available"]


def _register_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from dbllm_compile.backends.triton import register

    register()
    return True


triton_available: bool = _register_triton()
"""Whether the Triton kernels were registered (``pip install dbllm-compile[triton]``)."""
