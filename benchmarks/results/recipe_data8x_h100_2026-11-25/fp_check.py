"""Which tensors made the old (float64-sum) teacher fingerprint differ between CUDA and CPU; the new one on both."""
import sys, torch
from dbllm_compile.models import load_model
from dbllm_compile.distill.calibration import teacher_fingerprint

def old_lines(m):
    out = {}
    seen = set()
    with torch.no_grad():
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            if id(t) in seen: continue
            seen.add(id(t))
            flat = t.detach().reshape(-1).to(torch.float64)
            idx = torch.arange(16, device=flat.device) * (flat.numel() - 1) // 15
            out[name] = (f"{float(flat.sum()):.12e}", f"{float(torch.linalg.vector_norm(flat)):.12e}", tuple(flat[idx].tolist()))
    return out

m, _ = load_model(sys.argv[1], device="cuda")
new_gpu = teacher_fingerprint(m)
og = old_lines(m)
m = m.cpu()
new_cpu = teacher_fingerprint(m)
oc = old_lines(m)
print("new fingerprint cuda", new_gpu, "cpu", new_cpu, "equal", new_gpu == new_cpu)
diff = [(n, og[n], oc[n]) for n in og if og[n] != oc[n]]
print("old method: tensors differing", len(diff), "of", len(og))
for n, a, b in diff[:12]:
    print(" ", n, "sum", a[0], b[0], "norm", a[1], b[1], "samples equal", a[2] == b[2])
