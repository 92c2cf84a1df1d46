"""Ahead-of-time compilation of generated kernels for a GPU target, without a GPU.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``
gives TTIR / TTGIR / LLIR / PTX / cubin on any machine, but not in a process that imported Triton
with ``TRITON_INTERPRET=1`` (its ``@triton.jit`` functions are interpreter objects there).  So the
compile always runs in a child process (``python -m patchc.codegen.asm``) whose environment lacks
that variable, and its results are cached next to ``kernel.py``:
``<entry>/asm/<target>/{ttir,ttgir,llir,ptx,cubin,resources.json}``.  The resource summary
(registers, spills, stack) is read from ``ptxas -v`` (Triton bundles ptxas); shared memory is
Triton's own ``metadata.shared``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

TEXT_KINDS = ("ttir", "ttgir", "llir", "ptx")
KINDS = TEXT_KINDS + ("resources",)
DONE = "resources.json"         # written last: its presence marks a complete asm entry


def parse_target(target: str) -> int:
    """"sm_90" / "sm_90a" / "90" -> 90."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", str(target).strip().lower())
    if not m:
        raise ValueError(f"unknown GPU target {target!r}; use e.g. 'sm_80' or 'sm_90'")
    return int(m.group(1))


def asm_dir(kernel_path, target: str) -> Path:
    return Path(kernel_path).parent / "asm" / f"sm_{parse_target(target)}"


def get_asm(gk, target: str = "sm_90", kind: str = "ptx") -> str:
    """``kind`` of ``gk`` (a GeneratedKernel) compiled for ``target``; compiled on first use."""
    if kind not in KINDS:
        raise ValueError(f"asm kind {kind!r} is not one of {list(KINDS)}")
    d = asm_dir(gk.path, target)
    if not (d / DONE).exists():
        compile_many([gk.path], [target])
    return (d / ("resources.json" if kind == "resources" else kind)).read_text()


def compile_many(paths, targets, timeout: Optional[float] = None) -> None:
    """AOT-compile every kernel file in ``paths`` for every target in one child process (each
    result is cached as soon as it is done, so a timed-out batch resumes where it stopped)."""
    jobs = [(str(p), parse_target(t)) for p in paths for t in targets
            if not (asm_dir(p, t) / DONE).exists()]
    if not jobs:
        return
    timeout = timeout or 120 + 30 * len(jobs)     # ~1-3 s per compile + ptxas; import ~5 s
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "patchc.codegen.asm", json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"patchc: AOT compile of {len(jobs)} kernel(s) failed:\n{proc.stderr[-4000:]}")


# ---- the child process ------------------------------------------------------------------
def _ptxas_path(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except Exception:  # noqa: BLE001 -- older layouts: the bundled binary
        import triton
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def ptxas_resources(ptx: str, arch: int) -> dict:
    """Registers / spills / stack of the PTX's kernel from ``ptxas -v`` (empty dict if unavailable)."""
    gpu = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
    gpu_name = gpu.group(1) if gpu else f"sm_{arch}"
    src = Path(os.environ.get("TMPDIR", "/tmp")) / f"patchc_{os.getpid()}.ptx"
    src.write_text(ptx)
    try:
        out = subprocess.run([_ptxas_path(arch), "-v", f"--gpu-name={gpu_name}", str(src), "-o", os.devnull],
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return {}
    finally:
        src.unlink(missing_ok=True)
    log = out.stdout + out.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else None  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack_bytes": num(r"(\d+) bytes stack frame"),
            "ptxas_log": log.strip()[-2000:]}


def compile_file(path: str, arch: int) -> None:
    """Compile one kernel file for ``sm_<arch>`` in this process and write its asm entry."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    from patchc.files import atomic_write

    from .cache import load_module
    mod = load_module(path)
    fn = getattr(mod, mod.KERNEL_NAME)
    target = GPUTarget("cuda", arch, 32)
    sig = dict(mod.SIGNATURE)
    try:   # the pointer alignment the JIT sees on a real launch (torch allocations are 16-byte aligned)
        div = make_backend(target).parse_attr("D")
        attrs = {(i,): div for i, t in enumerate(sig.values()) if t.startswith("*")}
    except Exception:  # noqa: BLE001 -- attribute format differs: compile without hints
        attrs = {}
    opts = {"num_warps": mod.NUM_WARPS, "num_stages": mod.NUM_STAGES}
    ck = triton.compile(ASTSource(fn, sig, {}, attrs), target=target, options=opts)
    d = asm_dir(path, f"sm_{arch}")
    for kind in TEXT_KINDS:
        atomic_write(d / kind, str(ck.asm[kind]).encode())
    atomic_write(d / "cubin", bytes(ck.asm["cubin"]))
    ptx = ck.asm["ptx"]
    res = {"target": f"sm_{arch}", "kernel": mod.KERNEL_NAME, "shared_bytes": int(ck.metadata.shared),
           "num_warps": mod.NUM_WARPS, "num_stages": mod.NUM_STAGES,
           "local_memory": bool(re.search(r"\.local\b", ptx)), "triton": triton.__version__}
    res.update(ptxas_resources(ptx, arch))
    atomic_write(d / DONE, json.dumps(res, indent=1, sort_keys=True).encode())


def main(argv=None) -> int:
    jobs = json.loads((argv or sys.argv[1:])[0])
    if os.environ.get("TRITON_INTERPRET"):
        print("patchc.codegen.asm must run without TRITON_INTERPRET", file=sys.stderr)
        return 2
    for path, arch in jobs:
        compile_file(path, int(arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
