"""What a quantized model was made from: its architecture and the inputs it was exported with.

An artifact stores no Python objects, so to rebuild a model it records, as JSON:

- the *architecture* (:func:`describe_architecture`): for a Hugging Face model the class name
  (``"LlamaForCausalLM"``) and its config dict, enough to build the model again with random or
  no weights (:func:`build_skeleton`); for any other module only its class path, and the user
  passes a module of that architecture when loading;
- the *example inputs* (:func:`describe_inputs`): shape and dtype of every tensor argument,
  so the model can be exported again with the same example shapes (:func:`make_example_inputs`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from dbllm_compile.errors import ArtifactError

__all__ = [
    "describe_inputs",
    "describe_architecture",
    "make_example_inputs",
    "build_skeleton",
    "dtype_from_name",
]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, *, where: str = "manifest") -> torch.dtype:
    """``"float16"`` -> ``torch.float16``; an :class:`ArtifactError` naming ``where`` otherwise."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"{where}: unknown dtype {name!r}; expected a torch dtype name such as 'float32'")
    return dtype


def _tensor_spec(value: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(value.shape), "dtype": _dtype_name(value.dtype)}


def describe_inputs(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Shapes and dtypes of the tensor example inputs, as JSON.

    Returns ``{"args": [spec, ...], "kwargs": {name: spec}}`` with ``spec = {"shape": [...],
    "dtype": "int64"}``, covering every positional argument (all must be tensors) and every
    tensor keyword argument (non-tensor keywords are the model's ``fixed_kwargs``). Returns
    ``None`` when an input is neither a tensor nor a plain value (e.g. a cache object); such a
    model can still be saved, but loading it needs example inputs from the caller.

    Example:
        >>> describe_inputs((torch.zeros(2, 16, dtype=torch.long),), {"use_cache": False})
        {'args': [{'shape': [2, 16], 'dtype': 'int64'}], 'kwargs': {}}
    """
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    spec_kwargs = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            spec_kwargs[key] = _tensor_spec(value)
        elif any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value)):
            return None
    return {"args": [_tensor_spec(a) for a in args], "kwargs": spec_kwargs}


def make_example_inputs(spec: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Tensors of the shapes and dtypes of :func:`describe_inputs` output (zeros; values do not
    matter to ``torch.export``, except that integer inputs are often token ids: 0 is valid)."""
    def make(s: dict[str, Any]) -> torch.Tensor:
        return torch.zeros(s["shape"], dtype=dtype_from_name(s["dtype"], where="example input spec"))

    return tuple(make(s) for s in spec["args"]), {k: make(s) for k, s in spec["kwargs"].items()}


def _is_transformers_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _first_float_dtype(model: torch.nn.Module) -> str:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return _dtype_name(t.dtype)
    return "float32"


def describe_architecture(model: torch.nn.Module) -> dict[str, Any]:
    """The source model's architecture as JSON (no weights).

    ``{"kind": "transformers", "class": "LlamaForCausalLM", "config": {...},
    "transformers_version": "5.23.0", "dtype": "float32"}`` for a Hugging Face model,
    ``{"kind": "module", "class": "my_pkg.MyNet", "dtype": "float32"}`` otherwise.

    Example:
        >>> describe_architecture(torch.nn.Linear(4, 4))["class"]
        'torch.nn.modules.linear.Linear'
    """
    dtype = _first_float_dtype(model)
    if _is_transformers_model(model):
        import transformers

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        return {
            "kind": "transformers",
            "class": type(model).__name__,
            "config": config,
            "transformers_version": transformers.__version__,
            "dtype": dtype,
        }
    cls = type(model)
    return {"kind": "module", "class": f"{cls.__module__}.{cls.__qualname__}", "dtype": dtype}


def build_skeleton(architecture: dict[str, Any], *, device: str | torch.device = "meta",
                   where: str = "manifest") -> torch.nn.Module:
    """Build the source architecture with no weights (on the meta device by default).

    Only Hugging Face models can be built from the manifest: the class must be a model class
    exported by ``transformers`` (nothing else is imported from a name read from disk). For any
    other module, pass a module of the same architecture to the loader instead.

    Raises:
        ArtifactError: the architecture is not a transformers model, or transformers cannot
            build it (the message names ``where`` and the class).
    """
    if architecture.get("kind") != "transformers":
        raise ArtifactError(
            f"{where}: the source model is {architecture.get('class', 'an unknown module')!r}, not a "
            "Hugging Face model, so it cannot be rebuilt from the manifest alone; pass a module of "
            "that architecture: load_deployed(path, model=MyModel(...)) (its weights are not used)"
        )
    import transformers

    name = architecture.get("class", "")
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ArtifactError(
            f"{where}: {name!r} is not a model class of transformers {transformers.__version__} "
            f"(the artifact was written with transformers {architecture.get('transformers_version')}); "
            "install a transformers version that has it, or pass the model: load_deployed(path, model=...)"
        )
    config_dict = copy.deepcopy(architecture.get("config") or {})
    try:
        config = cls.config_class.from_dict(config_dict)
        dtype = dtype_from_name(architecture.get("dtype", "float32"), where=where)
        with torch.device(device):
            model = cls._from_config(config, dtype=dtype)
    except ArtifactError:
        raise
    except Exception as err:  # transformers raises many types; name the file and the class
        raise ArtifactError(
            f"{where}: transformers {transformers.__version__} could not build {name} from the stored "
            f"config ({type(err).__name__}: {err}); use the transformers version the artifact was "
            f"written with ({architecture.get('transformers_version')})"
        ) from err
    return model.eval()
