"""Diagnose AOTInductor on a GPU machine: why ``aoti_load_package`` crashed, and whether the
dual-binary package (Triton kernels compiled in) runs from Python and from C++.

Every step runs in its own subprocess (``python -X faulthandler``), so a segfault is recorded
(return code -11 and the faulthandler stack) instead of ending the check. Steps:

1. ``env``: torch / CUDA / Triton / compiler versions, GPU name.
2. ``compile_plain``: compile ``nn.Linear`` on CUDA (fp16) and on CPU into packages.
3. loading the plain CUDA package in fresh processes, one variant each:
   ``load_default`` (``aoti_load_package``), ``load_single_threaded`` (``run_single_threaded=True``),
   ``load_loader_direct`` (``torch._C._aoti.AOTIModelPackageLoader`` with an explicit device
   index), ``load_after_cuda_init`` (CUDA context created first), ``load_after_triton_import``,
   ``compile_and_load_same_process``; and ``load_cpu_package`` (a CPU package on this image).
   If ``gdb`` exists, ``gdb_backtrace`` records the native stack of ``load_default``.
4. ``dbllm_compile``: a tiny fp16 Llama quantized on CUDA, converted, packaged with
   :func:`dbllm_compile.artifact.aoti.aoti_package` (``device="cuda"``: ``dbllm.db_linear_gpu``
   Triton kernels), then ``dbllm_load`` runs it in a fresh process with ``dbllm_compile``
   blocked from import and compares with the eager model.
5. ``cpp_build`` / ``cpp_run_plain`` / ``cpp_run_dbllm``: build ``examples/aoti_cpp`` (CMake, or
   g++ directly when CMake is missing) and run both packages from C++.

Writes ``aoti_check.json`` (and the packages, logs) under ``--out`` (default ``$OUT`` or
``./aoti-check``); prints a one-line verdict per step.

Run from the repository root (GPU machine)::

    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 benchmarks/gpu_aoti_check.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PLAIN_RUN = """
x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
out = runner(x)
torch.cuda.synchronize()
print("ran: output", tuple(out[0].shape), float(out[0].float().abs().sum()))
"""

def _with_run(body: str) -> str:
    """A load step followed by the common run of the plain package (both dedented first)."""
    return textwrap.dedent(body) + textwrap.dedent(PLAIN_RUN)


def step_code(name: str, out: Path) -> str:
    """The Python source of step ``name``, as run in its subprocess."""
    return f"OUT = {str(out)!r}\n" + textwrap.dedent(STEPS[name])


STEPS: dict[str, str] = {
    "env": """
        import torch, platform, subprocess
        print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
        print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
        try:
            import triton; print("triton", triton.__version__)
        except ImportError as e:
            print("triton missing", e)
        for cmd in (["gcc", "--version"], ["g++", "--version"], ["cmake", "--version"], ["nvcc", "--version"], ["gdb", "--version"]):
            try:
                print(cmd[0], subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0])
            except (OSError, IndexError) as e:
                print(cmd[0], "missing", e)
        import torch._inductor.config as c
        print("aot_inductor.package_cpp_only", getattr(c.aot_inductor, "package_cpp_only", None))
    """,
    "compile_plain": """
        import torch
        for device, dtype in (("cuda", torch.float16), ("cpu", torch.float32)):
            m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device, dtype).eval()
            x = torch.randn(4, 64, device=device, dtype=dtype)
            ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
            path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{OUT}/plain_{device}.pt2")
            print("compiled", path, flush=True)
        import os; os._exit(0)   # the Inductor compile worker pool otherwise keeps the process alive
    """,
    "load_default": _with_run("""
        import torch
        runner = torch._inductor.aoti_load_package(f"{OUT}/plain_cuda.pt2")
    """),
    "load_single_threaded": _with_run("""
        import torch
        runner = torch._inductor.aoti_load_package(f"{OUT}/plain_cuda.pt2", run_single_threaded=True)
    """),
    "load_loader_direct": """
        import torch
        loader = torch._C._aoti.AOTIModelPackageLoader(f"{OUT}/plain_cuda.pt2", "model", False, 1, 0)
        print("metadata", loader.get_metadata())
        x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
        out = loader.run([x]); torch.cuda.synchronize()
        print("ran: output", tuple(out[0].shape))
    """,
    "load_after_cuda_init": _with_run("""
        import torch
        torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
        runner = torch._inductor.aoti_load_package(f"{OUT}/plain_cuda.pt2")
    """),
    "load_after_triton_import": _with_run("""
        import torch, triton
        runner = torch._inductor.aoti_load_package(f"{OUT}/plain_cuda.pt2")
    """),
    "compile_and_load_same_process": _with_run("""
        import torch
        m = torch.nn.Linear(64, 64).cuda().half().eval()
        ep = torch.export.export(m, (torch.randn(4, 64, device="cuda", dtype=torch.float16),))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{OUT}/plain_same.pt2")
        runner = torch._inductor.aoti_load_package(path)
    """),
    "load_libstdcxx_global": _with_run("""
        import ctypes, os, torch
        lib = next(line.split()[-1] for line in open("/proc/self/maps") if "libstdc++.so" in line)
        print("libstdc++ in process:", lib, flush=True)
        ctypes.CDLL(lib, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
        runner = torch._inductor.aoti_load_package(f"{OUT}/plain_cuda.pt2")
    """),
    "load_libstdcxx_by_name": _with_run("""
        import ctypes, os
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)
        import torch
        runner = torch._inductor.aoti_load_package(f"{OUT}/plain_cuda.pt2")
    """),
    "load_dlopenflags_global": _with_run("""
        import os, sys
        sys.setdlopenflags(os.RTLD_GLOBAL | os.RTLD_NOW)
        import torch
        runner = torch._inductor.aoti_load_package(f"{OUT}/plain_cuda.pt2")
    """),
    "load_via_dbllm": _with_run("""
        import torch
        from dbllm_compile.artifact.aoti import load_aoti
        runner = load_aoti(f"{OUT}/plain_cuda.pt2")
    """),
    "load_so_runner": """
        import glob, torch
        sos = sorted(glob.glob(f"{OUT}/plain_cuda_unzipped/**/*.so", recursive=True))
        print("shared objects", sos, flush=True)
        so = sos[0]
        import os
        cubin_dir = os.path.dirname(so)
        runner = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda", cubin_dir, False)
        x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
        out = runner.run([x]); torch.cuda.synchronize()
        print("ran: output", tuple(out[0].shape))
    """,
    "load_so_ctypes": """
        import ctypes, glob, torch
        so = sorted(glob.glob(f"{OUT}/plain_cuda_unzipped/**/*.so", recursive=True))[0]
        lib = ctypes.CDLL(so, mode=ctypes.RTLD_GLOBAL)
        print("dlopen ok", so, hasattr(lib, "AOTInductorModelContainerCreateWithDevice"))
    """,
    "load_cpu_package": """
        import torch
        runner = torch._inductor.aoti_load_package(f"{OUT}/plain_cpu.pt2")
        print("ran: output", tuple(runner(torch.randn(4, 64))[0].shape))
    """,
    "dbllm_compile": """
        import json, torch, zipfile
        import dbllm_compile as dc
        from transformers import LlamaConfig, LlamaForCausalLM
        from safetensors.torch import save_file
        from dbllm_compile.artifact.aoti import aoti_package
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
        model = LlamaForCausalLM(cfg).eval().to("cuda", torch.float16)
        example = torch.randint(0, 512, (2, 16), device="cuda")
        q = dc.quantize(model, (example,), dc.DBLLMConfig(), example_kwargs={"use_cache": False}, progress=False)
        deployed = dc.convert(q, progress=False)
        path = aoti_package(deployed, f"{OUT}/dbllm_cuda.pt2", device="cuda")
        names = zipfile.ZipFile(path).namelist()
        kernels = [n for n in names if n.endswith((".cubin", ".hsaco", ".fatbin", ".ptx"))]
        print("package files", len(names), "kernel binaries", len(kernels), kernels[:6])
        ids = (torch.arange(3 * 11) * 7 % 512).reshape(3, 11).cuda()   # same ids as examples/aoti_cpp
        ref = deployed(ids).logits
        save_file({"ids": ids.cpu(), "logits": ref.float().cpu()}, f"{OUT}/dbllm_reference.safetensors")
        json.dump({"sum": float(ref.double().sum()), "first": ref.flatten()[:4].double().tolist(),
                   "kernel_binaries": len(kernels)}, open(f"{OUT}/dbllm_reference.json", "w"))
        print("eager reference saved; logits sum", float(ref.double().sum()), flush=True)
        import os; os._exit(0)   # the Inductor compile worker pool otherwise keeps the process alive
    """,
    "dbllm_load": """
        import sys
        sys.modules["dbllm_compile"] = None        # the package must run without dbllm_compile
        import torch
        from safetensors.torch import load_file
        ref = load_file(f"{OUT}/dbllm_reference.safetensors")
        import ctypes, os                           # the libstdc++ workaround, without dbllm_compile
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)
        runner = torch._inductor.aoti_load_package(f"{OUT}/dbllm_cuda.pt2")
        print("metadata", {k: v for k, v in runner.get_metadata().items() if k.startswith("dbllm.")})
        (logits,) = runner(ref["ids"].cuda())
        err = (logits.float().cpu() - ref["logits"]).abs().max().item()
        scale = ref["logits"].abs().max().item()
        print("max abs diff vs eager", err, "max |logit|", scale)
        assert err <= 2e-2 * max(1.0, scale), "AOTI package differs from the eager model"
        print("ran: same outputs (fp16 tolerance)")
    """,
}

# Native diagnosis of a crashing load (no gdb on the GPU image): an LD_PRELOAD library whose
# SIGSEGV handler prints the faulting PC and a backtrace with dladdr names, installed at load
# time (Python runs without -X faulthandler here so it keeps the handler).
SEGV_HANDLER_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
static void show(const char *what, void *addr) {
  Dl_info info;
  if (dladdr(addr, &info) && info.dli_fname)
    fprintf(stderr, "SEGV_DIAG %s %p %s+%#lx %s\n", what, addr, info.dli_fname,
            (unsigned long)((char *)addr - (char *)info.dli_fbase), info.dli_sname ? info.dli_sname : "?");
  else
    fprintf(stderr, "SEGV_DIAG %s %p ?\n", what, addr);
}
static void handler(int sig, siginfo_t *si, void *ctx) {
  void *frames[64];
  int n = backtrace(frames, 64);
  fprintf(stderr, "SEGV_DIAG signal %d fault address %p\n", sig, si->si_addr);
  show("pc", (void *)((ucontext_t *)ctx)->uc_mcontext.gregs[REG_RIP]);
  for (int i = 0; i < n; i++) show("frame", frames[i]);
  fflush(stderr);
  signal(sig, SIG_DFL);
  raise(sig);
}
__attribute__((constructor)) static void install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = handler;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, 0);
  sigaction(SIGBUS, &sa, 0);
}
"""


def native_backtrace(out: Path, step: str) -> dict:
    """Run step ``step`` with the SIGSEGV-handler library preloaded; demangle its frames."""
    src, lib = out / "segv_diag.c", out / "libsegv_diag.so"
    src.write_text(SEGV_HANDLER_C)
    build = subprocess.run(["gcc", "-shared", "-fPIC", "-O0", "-o", str(lib), str(src), "-ldl"],
                           capture_output=True, text=True)
    if build.returncode != 0:
        return {"rc": "build failed", "stderr": build.stderr[-2000:]}
    env = dict(os.environ, LD_PRELOAD=str(lib))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", step_code(step, out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("SEGV_DIAG")]
    if shutil.which("c++filt") and lines:
        lines = subprocess.run(["c++filt"], input="\n".join(lines), capture_output=True, text=True).stdout.splitlines()
    (out / f"{step}_native.log").write_text(f"rc={proc.returncode}\n" + "\n".join(lines) + "\n--- stderr\n" + proc.stderr[-8000:])
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "frames": lines[:40]}


def inspect_package(out: Path) -> dict:
    """What the plain CUDA package holds, and what its shared library needs (``ldd -r``)."""
    import zipfile

    pkg = out / "plain_cuda.pt2"
    if not pkg.exists():
        return {"rc": "missing", "reason": f"{pkg} not compiled"}
    z = zipfile.ZipFile(pkg)
    files = {i.filename: i.file_size for i in z.infolist()}
    dest = out / "plain_cuda_unzipped"
    z.extractall(dest)
    result: dict = {"rc": 0, "files": files}
    for so in dest.rglob("*.so"):
        ldd = subprocess.run(["ldd", "-r", str(so)], capture_output=True, text=True)
        undefined = [line for line in (ldd.stdout + ldd.stderr).splitlines() if "undefined" in line]
        result[str(so.relative_to(dest))] = {"ldd": ldd.stdout[-3000:], "undefined_symbols": len(undefined),
                                             "undefined_first": undefined[:20]}
    (out / "inspect_package.json").write_text(json.dumps(result, indent=2))
    return result


WORKAROUNDS = ("load_libstdcxx_global", "load_libstdcxx_by_name", "load_dlopenflags_global", "load_via_dbllm")

LOAD_VARIANTS = ("load_default", "load_single_threaded", "load_loader_direct", "load_after_cuda_init",
                 "load_after_triton_import", "compile_and_load_same_process", "load_cpu_package")


def run_step(name: str, out: Path, timeout: int) -> dict:
    """Run STEPS[name] in a fresh ``python -X faulthandler`` process; never raises."""
    code = step_code(name, out)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, stdout, stderr = "timeout", (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or ""), ""
    result = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "stdout": stdout[-4000:], "stderr": stderr[-6000:]}
    if isinstance(rc, int) and rc < 0:
        result["signal"] = signal.Signals(-rc).name
    (out / f"{name}.log").write_text(f"rc={rc}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    return result


def gdb_backtrace(out: Path) -> dict:
    """Native stack of the default load, when gdb is installed."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return {"rc": "skipped", "reason": "gdb not installed"}
    code = step_code("load_default", out)
    proc = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary", "--args",
                           sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    (out / "gdb_backtrace.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    frames = [line for line in proc.stdout.splitlines() if line.startswith("#")]
    return {"rc": proc.returncode, "frames": frames[:40]}


def build_cpp(out: Path) -> dict:
    """Build examples/aoti_cpp: CMake if present, else one g++ command against the wheel's libtorch."""
    import torch.utils.cpp_extension as ext

    build = out / "aoti_cpp_build"
    build.mkdir(exist_ok=True)
    src = ROOT / "examples" / "aoti_cpp"
    t0 = time.perf_counter()
    if shutil.which("cmake"):
        import torch

        cmds = [["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                ["cmake", "--build", str(build), "-j"]]
    else:
        import torch

        lib = Path(torch.__file__).parent / "lib"
        includes = sum((["-I", p] for p in ext.include_paths()), [])
        cuda_libs = ["-ltorch_cuda", "-lc10_cuda"] if (lib / "libtorch_cuda.so").exists() else []
        cmds = [["g++", "-std=c++17", "-O1", str(src / "main.cpp"), "-o", str(build / "aoti_run"), *includes,
                 f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-L", str(lib),
                 f"-Wl,-rpath,{lib}", "-Wl,--no-as-needed", "-ltorch", "-ltorch_cpu", *cuda_libs, "-lc10"]]
    log = []
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        log.append(f"$ {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if proc.returncode != 0:
            (out / "cpp_build.log").write_text("\n".join(log))
            return {"rc": proc.returncode, "command": cmd, "stderr": proc.stderr[-4000:]}
    (out / "cpp_build.log").write_text("\n".join(log))
    return {"rc": 0, "binary": str(build / "aoti_run"), "seconds": round(time.perf_counter() - t0, 1)}


def run_cpp(binary: str, args: list[str], out: Path, name: str) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=300)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        rc, stdout, stderr = "timeout", "", ""
    (out / f"{name}.log").write_text(f"rc={rc}\n{stdout}\n--- stderr\n{stderr}")
    result = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "stdout": stdout[-3000:], "stderr": stderr[-3000:]}
    if isinstance(rc, int) and rc < 0:
        result["signal"] = signal.Signals(-rc).name
    return result


def _verdict(result: dict) -> str:
    rc = result.get("rc")
    return "ok" if rc == 0 else f"FAILED ({result.get('signal', rc)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "aoti-check")))
    parser.add_argument("--timeout", type=int, default=420, help="seconds per step")
    parser.add_argument("--skip-cpp", action="store_true")
    parser.add_argument("--only", default=None,
                        help="comma-separated steps to run (default: all); e.g. diagnose,cpp reuses the packages in --out")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"steps": {}}

    def record(name: str, result: dict) -> dict:
        report["steps"][name] = result
        print(f"{name:32s} {_verdict(result)}  ({result.get('seconds', '-')} s)", flush=True)
        (out / "aoti_check.json").write_text(json.dumps(report, indent=2))
        return result

    groups = set((args.only or "env,plain,loads,workarounds,diagnose,dbllm,cpp").split(","))
    if "env" in groups:
        record("env", run_step("env", out, 120))
    if "plain" in groups:
        record("compile_plain", run_step("compile_plain", out, args.timeout))
    if "loads" in groups:
        for name in LOAD_VARIANTS:
            record(name, run_step(name, out, args.timeout))
    if "workarounds" in groups:
        for name in WORKAROUNDS:
            record(name, run_step(name, out, args.timeout))
    if "diagnose" in groups:
        record("inspect_package", inspect_package(out))
        record("load_so_ctypes", run_step("load_so_ctypes", out, args.timeout))
        record("load_so_runner", run_step("load_so_runner", out, args.timeout))
        record("native_backtrace", native_backtrace(out, "load_loader_direct"))
        if shutil.which("gdb"):
            record("gdb_backtrace", gdb_backtrace(out))
    if "dbllm" in groups:
        record("dbllm_compile", run_step("dbllm_compile", out, args.timeout))
        if report["steps"]["dbllm_compile"]["rc"] == 0:
            record("dbllm_load", run_step("dbllm_load", out, args.timeout))
    if "cpp" in groups and not args.skip_cpp:
        build = record("cpp_build", build_cpp(out))
        if build["rc"] == 0:
            record("cpp_run_plain", run_cpp(build["binary"], [str(out / "plain_cuda.pt2"), "float", "4", "64", "float16"],
                                            out, "cpp_run_plain"))
            if (out / "dbllm_cuda.pt2").exists():
                cpp = record("cpp_run_dbllm", run_cpp(build["binary"], [str(out / "dbllm_cuda.pt2"), "ids", "3", "11", "512"],
                                                      out, "cpp_run_dbllm"))
                ref = out / "dbllm_reference.json"
                if cpp["rc"] == 0 and ref.exists():
                    cpp["reference"] = json.loads(ref.read_text())
                    record("cpp_run_dbllm", cpp)
    loads = {n: report["steps"][n]["rc"] for n in LOAD_VARIANTS if n in report["steps"]}
    report["summary"] = {
        "plain_load_variants_rc": loads,
        "workarounds_rc": {n: report["steps"][n]["rc"] for n in WORKAROUNDS if n in report["steps"]},
        "dbllm_python": report["steps"].get("dbllm_load", {}).get("rc"),
        "dbllm_cpp": report["steps"].get("cpp_run_dbllm", {}).get("rc"),
    }
    (out / "aoti_check.json").write_text(json.dumps(report, indent=2))
    print(f"report: {out / 'aoti_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
