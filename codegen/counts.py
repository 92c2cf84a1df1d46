"""SASS counts of the generated kernels' inner loops, per what they depend on -- not N or K.

A loop iteration's instructions depend on the strategy, dtype, tile, blocks, warps, stages, K's
divisibility by 16, the GPU target and the Triton version; N and K change how many iterations run
(and, through immediate operands and scheduling, a loop's count by a percent or so).  So the cost
model reads, per candidate, one ``LoopCounts`` (warp-instructions per iteration of the 2:4 and
dense loops, per pipe; registers, shared memory, pipeline depth), found:

1. in this process's memo;
2. in ``sass_counts.json`` (package data), shipped with patchc for the planner's candidates (bf16 / fp16, 128x128
   tiles, sm_80 / sm_90, the supported Triton versions; ``python -m patchc.codegen.counts`` rebuilds
   it and ``tests/test_cost_model.py`` re-derives entries);
3. in ``<cache root>/sass_counts/<key>.json`` (an earlier compile on this machine);
4. else, when compiling is allowed (``PATCHC_SASS_COUNTS=compile``, or ``compile=True``), by an AOT
   compile of a representative kernel (``asm``, a child process, ~2-4 s), cached on disk;
5. else estimated from the shipped entries of the same strategy (``source="estimated"``): the
   planner never waits on a compiler for an unusual tile or dtype.
"""
from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from typing import Optional

from patchc.caches import BoundedCache
from patchc.files import atomic_write, cache_root

from .spec import KernelSpec

PIPES = ("int", "fp", "lsu", "tensor", "xu", "uniform", "other")
ENV = "PATCHC_SASS_COUNTS"
_MEMO = BoundedCache("SASS counts", 4096)       # key -> LoopCounts
_LOCK = threading.Lock()


@dataclass(frozen=True)
class LoopCounts:
    """Per warp and iteration: ``s`` (the 2:4 loop) and ``d`` (the dense loop) as
    ``{"instructions": n, "pipes": {pipe: n}}``; ``other``: instructions outside loops (once per
    program); resources as compiled."""

    s: dict
    d: dict
    other: int
    registers: int
    shared_bytes: int
    spills: int
    depth: int
    source: str = "compiled"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopCounts":
        return cls(**d)


@functools.lru_cache(maxsize=1)
def triton_minor() -> str:
    try:
        v = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "none"
    return ".".join(v.split(".")[:2])


def key(spec: KernelSpec, arch: int, triton: Optional[str] = None) -> str:
    """What a kernel's loop bodies depend on, as a string key."""
    kdiv = 16 if spec.k % 16 == 0 else spec.k & -spec.k
    return (f"{triton or triton_minor()}|sm{arch}|{spec.strategy}|{spec.dtype}|{spec.tile[0]}x{spec.tile[1]}|"
            f"m{spec.block_m}n{spec.block_n}k{spec.block_k}t{spec.block_t}|w{spec.num_warps}s{spec.num_stages}|"
            f"kd{kdiv}|{spec.input_precision or '-'}")


def representative(spec: KernelSpec) -> KernelSpec:
    """A kernel with the same loop bodies: 2 tile-rows, 4 tile-columns (K's divisibility kept),
    no bias, no split-K; interpret off."""
    tn, tk = spec.tile
    kdiv = 16 if spec.k % 16 == 0 else spec.k & -spec.k
    k = 4 * tk if kdiv == 16 else 4 * tk - 16 + kdiv
    return replace(spec, n=2 * tn, k=k, bias=False, split_k=1, interpret=False, activation=None)


def _from_compiled(loops: list, resources: dict, total: int) -> LoopCounts:
    if not loops or len(loops) < 2:
        raise RuntimeError(f"expected a 2:4 and a dense loop in the SASS, found {len(loops or [])}")
    s, d = ({"instructions": lp["instructions"], "pipes": lp["pipes"]} for lp in loops[:2])
    return LoopCounts(s=s, d=d, other=max(0, total - sum(lp["instructions"] for lp in loops)),
                      registers=int(resources.get("registers") or 0), shared_bytes=int(resources["shared_bytes"]),
                      spills=int(resources.get("spill_stores") or 0), depth=int(resources.get("pipeline_depth", 1)))


def compile_counts(spec: KernelSpec, arch: int, cache_dir=None) -> LoopCounts:
    """AOT-compile the representative kernel of ``spec`` for ``sm_<arch>`` and count its SASS."""
    from . import asm, sass
    from .cache import get_kernel
    gk = get_kernel(representative(spec), cache_dir)
    res = json.loads(asm.get_asm(gk, f"sm_{arch}", "resources"))
    loops = json.loads(asm.get_asm(gk, f"sm_{arch}", "loops"))
    text = asm.get_asm(gk, f"sm_{arch}", "sass")
    total = len(sass.parse(text).get(gk.name, [])) if loops is not None else 0
    return _from_compiled(loops, res, total)


def _disk(k: str, cache_dir=None):
    import hashlib
    return cache_root(cache_dir) / "sass_counts" / (hashlib.sha256(k.encode()).hexdigest()[:24] + ".json")


SHIPPED = "sass_counts.json"


@functools.lru_cache(maxsize=1)
def _shipped() -> dict:
    from pathlib import Path
    return json.loads(Path(__file__).with_name(SHIPPED).read_text())


def shipped() -> dict:
    """The shipped table: key -> counts (a copy: callers may not change the one in memory)."""
    return dict(_shipped())


def get_counts(spec: KernelSpec, arch: int = 90, compile: Optional[bool] = None, cache_dir=None) -> LoopCounts:
    """The ``LoopCounts`` of ``spec`` on ``sm_<arch>`` (see the module docstring for the order)."""
    k = key(spec, arch)
    hit = _MEMO.get(k)
    if hit is not None:
        return hit
    table = shipped()
    if k in table:
        lc = LoopCounts.from_dict({f: v for f, v in table[k].items() if f != "meta"} | {"source": "shipped"})
    else:
        lc = None
        path = _disk(k, cache_dir)
        try:
            d = json.loads(path.read_text())
            if d.get("key") == k:
                lc = LoopCounts.from_dict(d["counts"])
        except (OSError, ValueError, KeyError, TypeError):
            lc = None
        if lc is None:
            want = compile if compile is not None else os.environ.get(ENV, "").lower() == "compile"
            if want:
                lc = compile_counts(spec, arch, cache_dir)
                try:
                    atomic_write(path, json.dumps({"key": k, "counts": lc.to_dict()}))
                except OSError:
                    pass
            else:
                lc = estimate(spec, arch, table)
    with _LOCK:
        _MEMO.put(k, lc)
    return lc


def groups_per_thread(spec: KernelSpec) -> float:
    """Groups of 4 weights a thread handles per loop step (what a loop body's size scales with)."""
    return spec.block_n * spec.block_k * spec.block_t / (4 * 32 * spec.num_warps)


def describe(spec: KernelSpec, arch: int) -> dict:
    """What ``estimate`` needs to know of a table entry's kernel."""
    return {"strategy": spec.strategy, "dtype": spec.dtype, "arch": arch, "triton": triton_minor(),
            "gpt": groups_per_thread(spec)}


def estimate(spec: KernelSpec, arch: int, table: dict) -> LoopCounts:
    """Counts of a kernel nobody compiled, from shipped entries of the same strategy: per loop,
    instructions = overhead + cost per group x groups per thread, interpolated between the
    shipped entries with the fewest and the most groups per thread (the nearest target and Triton
    version that has any); resources from the entry nearest in groups per thread."""
    fp32 = spec.dtype == "fp32"
    rows = [(abs(v["meta"]["arch"] - arch), v["meta"]["triton"] != triton_minor(), v["meta"]["gpt"], v)
            for v in table.values()
            if v["meta"]["strategy"] == spec.strategy and (v["meta"]["dtype"] == "fp32") == fp32]
    if not rows:
        rows = [(abs(v["meta"]["arch"] - arch), v["meta"]["triton"] != triton_minor(), v["meta"]["gpt"], v)
                for v in table.values() if v["meta"]["strategy"] == spec.strategy]
    if not rows:
        raise KeyError(f"no shipped SASS counts to estimate {spec.name} from")
    best = min(r[:2] for r in rows)
    rows = sorted((r for r in rows if r[:2] == best), key=lambda r: r[2])
    (_, _, g0, lo), (_, _, g1, hi) = rows[0], rows[-1]
    g = groups_per_thread(spec)

    def interp(a, b):
        return a * g / g0 if g1 == g0 else max(1.0, a + (b - a) * (g - g0) / (g1 - g0))

    def loop(name):
        a, b = lo[name], hi[name]
        return {"instructions": round(interp(a["instructions"], b["instructions"])),
                "pipes": {p: round(interp(a["pipes"].get(p, 0), b["pipes"].get(p, 0))) for p in PIPES}}

    near = min(rows, key=lambda r: abs(r[2] - g))[3]
    return LoopCounts(s=loop("s"), d=loop("d"), other=near["other"], registers=near["registers"],
                      shared_bytes=near["shared_bytes"], spills=0, depth=near["depth"], source="estimated")


def main(argv=None) -> int:
    """Rebuild the shipped table for the running Triton: compile the planner's candidates for
    bf16 / fp16, 128x128 tiles, sm_80 and sm_90, and merge them into ``sass_counts.json``."""
    import argparse
    from pathlib import Path

    from .candidates import all_specs
    p = argparse.ArgumentParser(prog="python -m patchc.codegen.counts", description=main.__doc__)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16"])
    args = p.parse_args(argv)
    mine = triton_minor()
    table = {k: v for k, v in shipped().items() if v["meta"]["triton"] != mine}      # this version: afresh
    for dtype in args.dtype:
        specs = all_specs(dtype, (128, 128))
        for arch in args.arch:
            from . import asm
            from .cache import get_kernel
            asm.compile_many([get_kernel(representative(s)) for s in specs], [f"sm_{arch}"])
            for s in specs:
                table[key(s, arch)] = compile_counts(s, arch).to_dict() | {"meta": describe(s, arch)}
                print(key(s, arch), table[key(s, arch)]["s"]["instructions"], flush=True)
    rows = [f" {json.dumps(k)}: {json.dumps({f: v for f, v in d.items() if f != 'source'}, sort_keys=True)}"
            for k, d in sorted(table.items())]
    atomic_write(Path(__file__).with_name(SHIPPED), "{\n" + ",\n".join(rows) + "\n}\n")
    _shipped.cache_clear()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
