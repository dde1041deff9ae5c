"""Generate the quantize CLI's calibration text (same spec, same cache key) without the rest of the run."""
import sys, time, types
import torch
from rich.console import Console
from dbllm_compile.models import load_model
# As run (commit a396940): from dbllm_compile.cli.quantize import BUDGETS, _calibration
# The function has since moved; the same call today (or: dbllm-compile quantize ... --calibration-only):
from dbllm_compile.cli.budgets import BUDGETS, calibration_data as _calibration

path, tokens, gen_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
device = sys.argv[4] if len(sys.argv) > 4 else "cuda"
t0 = time.time()
model, tok = load_model(path, device=device)
budget = dict(BUDGETS["gpu"], tokens=tokens)
args = types.SimpleNamespace(gen_batch_size=gen_batch, seed=0, corpus=None, corpus_fraction=1.0)
if len(sys.argv) > 5:  # key only
    from dbllm_compile.distill.calibration import CalibrationSpec, calibration_cache_key, teacher_fingerprint
    from dbllm_compile.distill.calibration.generate import first_token_candidates
    print("fingerprint", teacher_fingerprint(model))
    sys.exit()
data = _calibration(args, model, tok, budget, Console())
print("done", data, "seconds", data.seconds, "from_cache", data.from_cache, "wall", time.time() - t0)
