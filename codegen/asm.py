"""Ahead-of-time compilation of generated kernels for a GPU target, without a GPU, as launched.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``
gives TTIR / TTGIR / LLIR / PTX / cubin on any machine.  The signature, constants and
divisibility hints come from Triton's own launch binder applied to the arguments a launch passes
(``args.sample_args``: pointers 16-byte aligned, ints as given), so the compiled kernel is the one
a launch builds: an int equal to 1 becomes a constant, an int divisible by 16 and every aligned
pointer get the divisibility hint, arguments marked ``do_not_specialize`` get neither.

It does not work in a process that imported Triton with ``TRITON_INTERPRET=1``, so the compile
runs in a child (``python -m patchc.codegen.asm``) without that variable; results are cached next
to ``kernel.py``: ``<entry>/asm/sm_<arch>/{ttir,ttgir,llir,ptx,sass,cubin,loops.json,resources.json}``.
Registers and spills come from ``ptxas -v`` (Triton bundles ptxas), shared memory from Triton's
metadata, the SASS and its inner loops from ``cuobjdump -sass`` (``codegen.sass``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

TEXT_KINDS = ("ttir", "ttgir", "llir", "ptx", "sass")
KINDS = TEXT_KINDS + ("resources", "loops")
DONE = "resources.json"         # written last: its presence marks a complete asm entry


def parse_target(target) -> int:
    """"sm_90" / "sm_90a" / "90" -> 90."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", str(target).strip().lower())
    if not m:
        raise ValueError(f"unknown GPU target {target!r}; use e.g. 'sm_80' or 'sm_90'")
    return int(m.group(1))


def asm_dir(kernel_path, target) -> Path:
    return Path(kernel_path).parent / "asm" / f"sm_{parse_target(target)}"


def job_for(gk, target) -> dict:
    """The compile job of a ``GeneratedKernel``: its file, target, launch arguments and options."""
    from .args import sample_args
    s = gk.spec
    return {"path": str(gk.path), "arch": parse_target(target), "args": sample_args(s),
            "num_warps": s.num_warps, "num_stages": s.num_stages, "out": str(asm_dir(gk.path, target))}


def _done(job: dict) -> bool:
    try:
        res = json.loads((Path(job["out"]) / DONE).read_text())
    except (OSError, ValueError):
        return False
    return res.get("args") == job["args"]


def get_asm(gk, target="sm_90", kind: str = "ptx") -> str:
    """``kind`` of ``gk`` (a GeneratedKernel) compiled for ``target`` as launched; compiled on first use."""
    if kind not in KINDS:
        raise ValueError(f"asm kind {kind!r} is not one of {list(KINDS)}")
    job = job_for(gk, target)
    if not _done(job):
        run_jobs([job])
    name = {"resources": "resources.json", "loops": "loops.json"}.get(kind, kind)
    return (Path(job["out"]) / name).read_text()


def compile_many(kernels, targets, timeout: Optional[float] = None) -> None:
    """AOT-compile every ``GeneratedKernel`` for every target in one child process (each result is
    cached as soon as it is done, so a timed-out batch resumes where it stopped)."""
    run_jobs([job_for(gk, t) for gk in kernels for t in targets], timeout)


def run_jobs(jobs, timeout: Optional[float] = None) -> None:
    """Run compile jobs (``job_for``) that are not cached yet, in one child process."""
    jobs = [j for j in jobs if not _done(j)]
    if not jobs:
        return
    timeout = timeout or 120 + 30 * len(jobs)     # ~1-3 s per compile + ptxas; import ~5 s
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "patchc.codegen.asm", json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"patchc: AOT compile of {len(jobs)} kernel(s) failed:\n{proc.stderr[-4000:]}")


# ---- the child process ------------------------------------------------------------------
class _Ptr:
    """A stand-in for a tensor argument: what Triton's specialiser reads (dtype, a 16-byte-aligned
    address), so the binder specialises exactly as for a real allocation."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 1 << 20


def _values(args):
    import torch

    from patchc.dtypes import torch_dtype
    names = {"i32": torch.int32, "i64": torch.int64, "u8": torch.uint8}
    out = []
    for a in args:
        if isinstance(a, dict):
            out.append(_Ptr(names.get(a["ptr"]) or torch_dtype(a["ptr"])))
        else:
            out.append(a)
    return out


def specialise(fn, args, arch: int, num_warps: int, num_stages: int):
    """(ASTSource, options dict) of ``fn`` launched with ``args`` (descriptors, see ``args``) on
    ``sm_<arch>``: Triton's own launch binder decides the signature, constants and hints."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from triton import knobs
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    # the options JITFunction.run adds before binding: the same options, the same Triton cache entry
    bound, spec, opts = binder(*_values(args), num_warps=num_warps, num_stages=num_stages,
                               debug=getattr(fn, "debug", None) or knobs.runtime.debug,
                               instrumentation_mode=knobs.compilation.instrumentation_mode)
    options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, spec, opts)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def _ptxas_path(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            return get_ptxas(arch).path
        except TypeError:
            return get_ptxas().path
    except Exception:  # noqa: BLE001 -- older layouts: the bundled binary
        import triton
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def ptxas_resources(ptx: str, arch: int) -> dict:
    """Registers / spills / stack of the PTX's kernel from ``ptxas -v`` (empty dict if unavailable)."""
    import tempfile
    gpu = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
    gpu_name = gpu.group(1) if gpu else f"sm_{arch}"
    with tempfile.TemporaryDirectory(prefix="patchc-ptxas-") as d:
        src = Path(d) / "kernel.ptx"
        src.write_text(ptx)
        try:
            out = subprocess.run([_ptxas_path(arch), "-v", f"--gpu-name={gpu_name}", str(src), "-o", os.devnull],
                                 capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            return {}
    log = out.stdout + out.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else None  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack_bytes": num(r"(\d+) bytes stack frame"),
            "ptxas_log": log.strip()[-2000:]}


def pipeline_depth(ttgir: str) -> int:
    """The deepest multi-buffered shared-memory allocation in a TTGIR (1 when nothing is
    pipelined): ``ttg.local_alloc ... memdesc<3x...`` is a 3-deep buffer."""
    depths = [int(d) for d in re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x", ttgir)]
    return max(depths, default=1)


def compile_job(job: dict) -> None:
    """Compile one job in this process and write its asm entry."""
    import triton

    from patchc.files import atomic_write

    from . import sass
    from .load import load_module
    arch = int(job["arch"])
    mod = load_module(job["path"])
    fn = getattr(mod, job.get("name") or mod.KERNEL_NAME)
    src, opts = specialise(fn, job["args"], arch, job["num_warps"], job["num_stages"])
    from triton.backends.compiler import GPUTarget
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    out = Path(job["out"])
    for kind in TEXT_KINDS[:-1]:
        atomic_write(out / kind, str(ck.asm[kind]).encode())
    atomic_write(out / "cubin", bytes(ck.asm["cubin"]))
    res = {"target": f"sm_{arch}", "kernel": fn.__name__, "shared_bytes": int(ck.metadata.shared),
           "num_warps": job["num_warps"], "num_stages": job["num_stages"], "triton": triton.__version__,
           "local_memory": bool(re.search(r"\.local\b", ck.asm["ptx"])), "args": job["args"],
           "signature": {k: str(v) for k, v in src.signature.items()},
           "constants": {fn.arg_names[k[0]]: v for k, v in src.constants.items() if isinstance(v, int)},
           "divisible": sorted(fn.arg_names[k[0]] for k in src.attrs),
           "pipeline_depth": pipeline_depth(ck.asm["ttgir"])}
    res.update(ptxas_resources(ck.asm["ptx"], arch))
    try:
        text = sass.disassemble(bytes(ck.asm["cubin"]))
        atomic_write(out / "sass", text.encode())
        loops = [lp.summary() for lp in sass.kernel_loops(text, fn.__name__)]
    except sass.SassUnavailable as exc:
        atomic_write(out / "sass", f"# {exc}\n".encode())
        loops = None
    atomic_write(out / "loops.json", json.dumps(loops, indent=1).encode())
    res["sass_loops"] = None if loops is None else len(loops)
    atomic_write(out / DONE, json.dumps(res, indent=1, sort_keys=True).encode())


def main(argv=None) -> int:
    jobs = json.loads((argv or sys.argv[1:])[0])
    if os.environ.get("TRITON_INTERPRET"):
        print("patchc.codegen.asm must run without TRITON_INTERPRET", file=sys.stderr)
        return 2
    for job in jobs:
        compile_job(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
