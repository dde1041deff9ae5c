"""The ``dbllm-compile`` command line.

One module per subcommand; each exposes ``add_parser(subparsers)`` (which sets ``run`` as the
parser's default) and ``run(args) -> int``:

- ``quantize`` (:mod:`dbllm_compile.cli.quantize`): the main job — quantize, distil, convert,
  evaluate and save a model.
- ``export`` (:mod:`dbllm_compile.cli.export`): a saved artifact to safetensors, hf, pt2, aoti or mlir.
- ``generate`` (:mod:`dbllm_compile.cli.generate`): text through ``torch.compile(backend="dbllm")``
  with a static KV cache.
- ``bench`` (:mod:`dbllm_compile.cli.bench`): prefill/decode tokens/s and peak memory, 2-bit vs
  the model dtype through plain ``torch.compile``, same run.

Beside them, :mod:`dbllm_compile.cli.budgets` holds the main job's distillation budgets
(``--budget cpu|gpu``) and its calibration-text step (``--calibration-only``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dbllm_compile.cli import bench, export, generate, quantize

__all__ = ["build_parser", "main"]

_SUBCOMMANDS = (quantize, export, generate, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbllm-compile",
        description="Compile a model's linear layers into 2-bit dual-binary (DB-LLM) layers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dbllm-compile`` console script."""
    from dbllm_compile.errors import DBLLMError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except DBLLMError as exc:
        print(f"dbllm-compile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
