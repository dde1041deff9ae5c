"""``python -m dbllm_compile`` runs the ``dbllm-compile`` command line."""

import sys

from dbllm_compile.cli import main

sys.exit(main())
