"""AOTInductor packages of a deployed model: compiled code that runs without dbllm_compile.

``aoti_package(deployed, "model.pt2", device=...)`` compiles the model ahead of time into a
``.pt2`` package that ``torch._inductor.aoti_load_package`` (Python) and
``torch::inductor::AOTIModelPackageLoader`` (C++, ``examples/aoti_cpp/``) run with only torch
installed. How the dual-binary layers get into the package depends on the device:

- ``cpu``: ``dbllm.db_linear`` (a ``custom_op``, opaque to Inductor: a package calling it would
  need dbllm_compile loaded at run time) is decomposed into ATen unpack + matmul
  (:mod:`dbllm_compile.passes.decompose`); Inductor compiles that to C++.
- ``cuda``: every layer is rewritten to ``dbllm.db_linear_gpu``, a ``triton_op`` on weights
  repacked once into the GPU layout (:mod:`dbllm_compile.backends.triton.layout`); Inductor sees
  the Triton kernels themselves and compiles them into the package. The kernels need fp16 or
  bf16 activations (quantize a half-precision model); in float32 the op's body is a dequantize +
  ``F.linear`` and that is what gets compiled.

The package's calling convention is flat, for C++: inputs are the model's positional tensor
inputs followed by its tensor keyword inputs (the non-tensor ones, e.g. ``use_cache=False``,
are baked in); outputs are the tensor leaves of the model's output in ``pytree`` order (for a
Hugging Face causal LM with ``use_cache=False``: ``[logits]``). Both lists are recorded as JSON
in the package metadata (keys ``dbllm.inputs``, ``dbllm.outputs``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx

from dbllm_compile.api import DBLLMModel
from dbllm_compile.artifact.atomic import atomic_file
from dbllm_compile.artifact.pt2 import _require_deployed, example_inputs_of
from dbllm_compile.errors import ArtifactError
from dbllm_compile.ops import DEPLOY_OP, op_arguments
from dbllm_compile.reference.linear import add_offset_term

__all__ = ["FlatCall", "aoti_package", "use_gpu_kernels", "flat_export", "load_aoti", "promote_libstdcxx"]


class FlatCall(torch.nn.Module):
    """``forward(*tensors) -> tuple of tensors``: a model with a flat calling convention.

    ``tensors`` are the positional inputs followed by the keyword inputs named in
    ``tensor_kwargs``; ``fixed_kwargs`` are passed on every call; the output is the list of
    tensor leaves of the model's output.
    """

    def __init__(self, module: torch.nn.Module, num_args: int, tensor_kwargs: list[str], fixed_kwargs: dict[str, Any]):
        super().__init__()
        self.module = module
        self.num_args = num_args
        self.tensor_kwargs = list(tensor_kwargs)
        self.fixed_kwargs = dict(fixed_kwargs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = tensors[: self.num_args]
        kwargs = dict(zip(self.tensor_kwargs, tensors[self.num_args:]))
        out = self.module(*args, **kwargs, **self.fixed_kwargs)
        return tuple(leaf for leaf in torch.utils._pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor))


def _output_names(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[str]:
    with torch.no_grad():
        out = module(*args, **kwargs)
    leaves, _ = torch.utils._pytree.tree_flatten_with_path(out)
    return [torch.utils._pytree.keystr(path) or "output" for path, leaf in leaves if isinstance(leaf, torch.Tensor)]


def use_gpu_kernels(gm: fx.GraphModule, activation_dtype: torch.dtype) -> int:
    """Rewrite every ``dbllm.db_linear`` node of ``gm`` (on CUDA) into ``dbllm.db_linear_gpu``.

    The packed planes ``uint8 [2, N, K_pad/8]`` and scales ``[N, NG]`` of each layer are repacked
    once into the GPU layout (``qweight int32 [N, K_alloc/16]``, ``scales [N, K_alloc/G, 2]`` in
    ``activation_dtype``), stored as buffers ``<weight>_qweight`` / ``<weight>_gpu_scales``, and
    the old buffers removed. A sign-codebook node keeps its offset ``c`` buffer and adds the
    offset term after the kernel (:func:`~dbllm_compile.reference.linear.add_offset_term`, plain
    torch ops that the export traces). Returns the number of nodes rewritten.
    """
    from dbllm_compile.backends.triton import to_gpu_layout
    from dbllm_compile.backends.triton.prepared_op import GPU_OP
    from dbllm_compile.passes.linear_match import get_attr_value
    from dbllm_compile.passes.quantize_linears import _set_attr, replace_node

    count = 0
    done: dict[str, tuple[str, str]] = {}
    replaced: set[str] = set()
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == DEPLOY_OP]:
        a = op_arguments(node)
        x, packed_n, a1_n, a2_n, bias = a["x"], a["packed"], a["a1"], a["a2"], a["bias"]
        in_features, group_size, c_n = a["in_features"], a["group_size"], a["c"]
        base = packed_n.target.removesuffix("_packed")
        replaced.update((packed_n.target, a1_n.target, a2_n.target))
        if base not in done:
            gw = to_gpu_layout(get_attr_value(gm, packed_n.target), get_attr_value(gm, a1_n.target),
                               get_attr_value(gm, a2_n.target), in_features, group_size, activation_dtype)
            names = (f"{base}_qweight", f"{base}_gpu_scales")
            _set_attr(gm, names[0], gw.qweight, parameter=False)
            _set_attr(gm, names[1], gw.scales, parameter=False)
            done[base] = names
        with gm.graph.inserting_before(node):
            qw, sc = (gm.graph.get_attr(t) for t in done[base])
            new = gm.graph.call_function(GPU_OP, (x, qw, sc, bias, in_features, group_size))
            if c_n is not None:  # sign codebook: the kernels compute a1*b1 + a2*b2; add x-sums @ c.T
                c_attr = gm.graph.get_attr(c_n.target)
                new = gm.graph.call_function(add_offset_term, (new, x, c_attr, in_features, group_size))
        replace_node(gm, node, new)
        count += 1
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in replaced - still_read:
        owner, _, attr = name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
    gm.graph.lint()
    gm.recompile()
    return count


def flat_export(
    deployed: DBLLMModel,
    *,
    device: str | torch.device = "cpu",
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic: bool = True,
    decompose: bool | None = None,
) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """Export ``deployed`` with the flat calling convention, ready for AOTInductor.

    Returns the program (dual-binary layers decomposed to ATen on CPU unless
    ``decompose=False``, Triton ops on CUDA) and the metadata ``{"inputs": [...],
    "outputs": [...], "device": ...}``.
    """
    from torch.export import Dim

    from dbllm_compile.passes.decompose import decompose_dual_binary

    _require_deployed(deployed, "aoti_package()")
    device = torch.device(device)
    args, kwargs = example_inputs_of(deployed, example_inputs, example_kwargs)
    tensor_kwargs = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if k not in tensor_kwargs}
    gm = copy.deepcopy(deployed.graph_module).to(device)
    tensors = tuple(t.to(device) for t in (*args, *(kwargs[k] for k in tensor_kwargs)))
    if device.type == "cuda":
        dtype = next((t.dtype for t in gm.buffers() if t.is_floating_point() and t.dtype != torch.float32), torch.float32)
        if use_gpu_kernels(gm, dtype) == 0:
            raise ArtifactError("aoti_package(device='cuda'): the model has no dual-binary layer to compile")
    flat = FlatCall(gm, len(args), tensor_kwargs, fixed).eval()
    names = _output_names(flat.module, tensors[: len(args)], {**dict(zip(tensor_kwargs, tensors[len(args):])), **fixed})
    # One entry per forward() parameter: the varargs parameter takes a tuple of per-tensor specs.
    shapes = (tuple({i: Dim.AUTO for i in range(t.dim())} for t in tensors),) if dynamic else None
    notes = []
    try:
        ep = torch.export.export(flat, tensors, dynamic_shapes=shapes, strict=False)
    except Exception as err:  # noqa: BLE001 - same fallback as quantize(): static shapes
        if not dynamic:
            raise
        notes.append(f"dynamic export failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                     "the package has static shapes")
        ep = torch.export.export(flat, tensors, strict=False)
    if decompose if decompose is not None else device.type == "cpu":
        ep = decompose_dual_binary(ep)
    import inspect

    params = [p for p in inspect.signature(deployed.graph_module.forward).parameters if p not in kwargs]
    inputs = [params[i] if i < len(params) else f"arg{i}" for i in range(len(args))] + tensor_kwargs
    meta = {
        "inputs": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                   for n, t in zip(inputs, tensors)],
        "outputs": names,
        "fixed_kwargs": {k: v for k, v in fixed.items() if isinstance(v, (bool, int, float, str, type(None)))},
        "device": device.type,
        "dual_binary": ("triton (dbllm.db_linear_gpu)" if device.type == "cuda" else
                        "dbllm.db_linear" if decompose is False else "aten unpack+matmul"),
        "dynamic_dims": {str(s): str(r) for s, r in ep.range_constraints.items()},
        "notes": notes,
    }
    return ep, meta


def aoti_package(
    deployed: DBLLMModel,
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic: bool = True,
    inductor_configs: dict[str, Any] | None = None,
) -> Path:
    """Compile ``deployed`` with AOTInductor into the package ``path`` (written atomically).

    Compiling takes tens of seconds even for a tiny model (a C++ compiler runs). The package runs
    with torch only: ``torch._inductor.aoti_load_package(path)(*inputs)`` returns the output list.

    Example:
        >>> # aoti_package(deployed, "model.pt2")                     # CPU: ATen decomposition
        >>> # runner = torch._inductor.aoti_load_package("model.pt2")  # no dbllm_compile needed
        >>> # (logits,) = runner(input_ids)
    """
    ep, meta = flat_export(deployed, device=device, example_inputs=example_inputs,
                           example_kwargs=example_kwargs, dynamic=dynamic)
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {
        **configs.get("aot_inductor.metadata", {}),
        **{f"dbllm.{k}": json.dumps(v) for k, v in meta.items()},
    }
    path = Path(path)
    with atomic_file(path) as tmp:
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs=configs)
    return path


def promote_libstdcxx() -> str | None:
    """Make the C++ runtime already loaded in this process global (``RTLD_GLOBAL``); returns its path.

    Why: on the GPU image (torch 2.11, packages compiled by GCC 13 from ``/opt/gcc``) loading an
    AOTInductor package from Python segfaulted while the same package ran from a C++ program.
    The native stack (``benchmarks/gpu_aoti_check.py``, SIGSEGV handler) ends in
    ``torch::aot_inductor::parse_device_str`` -> ``std::regex`` compilation -> locale facets
    inside the package's ``wrapper.so``, which carries its own copy of libstdc++ code. A C++
    program links libstdc++ into the global symbol scope, so the wrapper binds to that one;
    Python loads torch (and its libstdc++) with ``RTLD_LOCAL``, so the wrapper ran its own copy,
    whose locale state is not initialised (an inference from which load variants crash and which
    run, H100, 2026-11-23). Promoting the loaded libstdc++ to the global scope
    before the package's library is opened makes Python behave like the C++ program. Equivalent
    without dbllm_compile: ``ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)`` before
    ``aoti_load_package``, or ``LD_PRELOAD=<that libstdc++> python ...``.
    """
    import ctypes

    path = None
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libstdc++.so" in line:
                    path = line.split()[-1]
                    break
    except OSError:
        return None
    if path is None:
        return None
    ctypes.CDLL(path, mode=os.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0))
    return path


def load_aoti(path: str | os.PathLike, **kwargs: Any) -> Any:
    """``torch._inductor.aoti_load_package(path, **kwargs)`` after :func:`promote_libstdcxx`
    (the workaround for the segfault on the GPU image); returns the runner."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no AOTInductor package there (write one with aoti_package or "
                                "`dbllm-compile export --format aoti`)")
    promote_libstdcxx()
    return torch._inductor.aoti_load_package(str(path), **kwargs)
