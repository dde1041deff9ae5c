"""MLIR of a deployed model through torch-mlir (``pip install torch-mlir``, optional).

Two forms:

- ``torch`` dialect, as torch-mlir's FX importer produces it: ATen ops as ``torch.aten.*`` and
  each dual-binary layer kept as one named op,
  ``torch.operator "torch.dbllm.db_linear"(%x, %packed, %a1, %a2, %bias, %K, %G)`` (plus ``%c``
  last for the sign codebook), with its
  packed planes ``ui8 [2, N, K_pad/8]`` and scales as literals. This is the form for a compiler
  that implements the op itself. (torch-mlir's *backend contract* form, output type ``torch``,
  rejects any op it has no shape and dtype functions for, and its generator of those functions
  is not in the torch-mlir wheel, so the named op stays at the imported level.)
- ``linalg-on-tensors``: the op is first decomposed into ATen unpack + matmul
  (:mod:`dbllm_compile.passes.decompose`), then torch-mlir lowers everything to ``linalg``,
  ``arith`` and ``math`` on tensors, which any MLIR compiler takes.

:func:`run_linalg` compiles the ``linalg-on-tensors`` module to LLVM with upstream MLIR passes
and runs it with MLIR's execution engine on CPU (the wheel ships the engine but not torch-mlir's
reference backend), which is how the tests check that it computes what the op computes.

torch-mlir writes the whole module into ``TMPDIR`` when a pipeline fails; every call here
points ``TMPDIR`` at a private directory that is removed afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from dbllm_compile.api import DBLLMModel
from dbllm_compile.artifact.atomic import atomic_file
from dbllm_compile.errors import ArtifactError

__all__ = ["OUTPUT_TYPES", "mlir_available", "to_mlir", "save_mlir", "run_linalg"]

OUTPUT_TYPES = ("torch", "linalg-on-tensors")


def mlir_available() -> str | None:
    """``None`` if torch-mlir is importable, else the reason it is not."""
    try:
        import torch_mlir.fx  # noqa: F401
    except ImportError as err:
        return f"torch-mlir is not installed ({err}); pip install torch-mlir (or dbllm-compile[mlir])"
    return None


def _require_mlir() -> None:
    reason = mlir_available()
    if reason:
        raise ArtifactError(reason)


@contextlib.contextmanager
def _private_tmpdir() -> Iterator[Path]:
    """Point ``tempfile`` (and ``TMPDIR``) at a fresh directory, removed on exit."""
    path = Path(tempfile.mkdtemp(prefix="dbllm-mlir-"))
    old_env, old_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(path), str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = old_tempdir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        shutil.rmtree(path, ignore_errors=True)


def _persistent_copy(deployed: DBLLMModel) -> DBLLMModel:
    """A copy whose buffers are all persistent (torch-mlir's importer needs every buffer in
    the program's state dict; non-persistent ones such as ``rotary_emb.inv_freq`` are not)."""
    gm = copy.deepcopy(deployed.graph_module)
    for module in gm.modules():
        module._non_persistent_buffers_set.clear()
    return DBLLMModel(gm, deployed.config, deployed.report, stage="deploy", fixed_kwargs=deployed.fixed_kwargs,
                      example_spec=deployed.example_spec, architecture=deployed.architecture)


def to_mlir(
    deployed: DBLLMModel,
    output_type: str = "linalg-on-tensors",
    *,
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic: bool = False,
) -> Any:
    """Import ``deployed`` into MLIR; returns a ``torch_mlir.ir.Module`` (``str()`` is its text).

    Args:
        output_type: ``"torch"`` (dual-binary layers as named ops) or ``"linalg-on-tensors"``
            (decomposed to unpack + matmul, lowered to linalg).
        example_inputs / example_kwargs: defaults to the shapes the model was quantized with.
        dynamic: keep batch and sequence dynamic (``?`` dimensions); static by default, which
            is what :func:`run_linalg` runs.

    The inputs are the model's positional tensor inputs then its tensor keyword inputs; the
    results are the tensor leaves of its output (as :mod:`.aoti`'s flat convention).

    Raises:
        ArtifactError: torch-mlir is missing, or its pipeline failed (first diagnostics quoted).
    """
    from dbllm_compile.artifact.aoti import flat_export

    _require_mlir()
    if output_type not in OUTPUT_TYPES:
        raise ArtifactError(f"to_mlir(): output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    from torch_mlir import fx as tm_fx

    ep, _ = flat_export(_persistent_copy(deployed), device="cpu", example_inputs=example_inputs,
                        example_kwargs=example_kwargs, dynamic=dynamic, decompose=output_type != "torch")
    with _private_tmpdir():
        try:
            return tm_fx.export_and_import(ep, output_type="raw" if output_type == "torch" else output_type,
                                           func_name="forward")
        except Exception as err:  # torch-mlir raises its own error types; keep the diagnostics short
            text = "\n".join(str(err).strip().splitlines()[:6])
            raise ArtifactError(f"torch-mlir could not produce {output_type!r} for this model:\n{text}") from None


def save_mlir(deployed: DBLLMModel, path: str | os.PathLike, output_type: str = "linalg-on-tensors", **kwargs: Any) -> Path:
    """Write :func:`to_mlir` as MLIR text to ``path`` atomically (weights inline as
    ``dense_resource`` blobs, so the file is self-contained)."""
    module = to_mlir(deployed, output_type, **kwargs)
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            module.operation.print(file=f, large_elements_limit=None)
    return path


_LOWERING = (
    "builtin.module("
    "one-shot-bufferize{bufferize-function-boundaries function-boundary-type-conversion=identity-layout-map},"
    "func.func(convert-linalg-to-loops),"
    "expand-strided-metadata,lower-affine,convert-scf-to-cf,"
    "convert-math-to-libm,convert-math-to-llvm,"
    "func.func(convert-arith-to-llvm),convert-index-to-llvm,"
    "finalize-memref-to-llvm,convert-func-to-llvm,convert-cf-to-llvm,"
    "reconcile-unrealized-casts)"
)


def run_linalg(module: Any, inputs: Sequence[torch.Tensor], func_name: str = "forward") -> torch.Tensor:
    """Compile a static-shape ``linalg-on-tensors`` module to LLVM and run ``func_name`` on CPU.

    ``module`` is a ``torch_mlir.ir.Module`` or the path of a ``.mlir`` file (e.g. from
    :func:`save_mlir`).

    Uses upstream MLIR passes (bufferize, linalg to loops, to LLVM) and
    ``torch_mlir.execution_engine.ExecutionEngine``. Supports functions with one tensor result.

    Returns:
        The result as a CPU tensor.
    """
    import ctypes

    import numpy as np
    from torch_mlir import ir
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.passmanager import PassManager
    from torch_mlir.runtime import np_to_memref as memref

    if isinstance(module, (str, os.PathLike)):
        text, context = Path(module).read_text(), ir.Context()
    else:
        text, context = str(module), module.context
    with _private_tmpdir(), context:
        module = ir.Module.parse(text)
        func = next(op for op in module.body.operations if "sym_name" in op.attributes
                    and ir.StringAttr(op.attributes["sym_name"]).value == func_name)
        results = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value).results
        if len(results) != 1:
            raise ArtifactError(f"run_linalg(): {func_name} must return one tensor, it returns {len(results)} values")
        result_type = ir.RankedTensorType(results[0])
        func.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
        PassManager.parse(_LOWERING).run(module.operation)
        engine = ExecutionEngine(module, opt_level=2)
        np_inputs = [t.detach().cpu().contiguous().numpy() for t in inputs]
        np_dtype = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32}[str(result_type.element_type)]
        out = memref.make_nd_memref_descriptor(result_type.rank, memref.as_ctype(np_dtype))()
        args = [ctypes.pointer(ctypes.pointer(out))]
        args += [ctypes.pointer(ctypes.pointer(memref.get_ranked_memref_descriptor(a))) for a in np_inputs]
        engine.invoke(func_name, *args)
        return torch.from_numpy(memref.ranked_memref_to_numpy(ctypes.pointer(out)).copy())
