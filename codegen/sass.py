"""Reading a compiled kernel's SASS: its innermost loops and what each iteration costs per pipe.

``cuobjdump -sass`` (shipped in the Triton wheel) disassembles the cubin; every innermost loop
(a backward branch whose body holds no other backward branch) is counted per warp and per
iteration: all instructions (the issue slot), and per execution pipe.  The pipes follow Nsight
Compute's pipe names, merged where they share a throughput limit:

* ``int``  integer and logic work: the ALU pipe (IADD3, LOP3, SHF, ISETP, SEL, PRMT, LEA, ...)
  plus the integer multiply-adds (IMAD*, IMUL) that run on the FMA-heavy pipe -- 64 lanes per
  SM per clock for each on sm_80/sm_90 (CUDA C++ Programming Guide, arithmetic instruction
  throughput table), so 2 warp-instructions per clock per SM;
* ``fp``   FP32 / packed FP16 arithmetic (FFMA, FADD, FMUL, HFMA2, ...): 128 lanes, 4 per clock;
* ``lsu``  everything the load/store unit issues to L1TEX: global, shared and local loads and
  stores, cp.async (LDGSTS), ldmatrix (LDSM), atomics, shuffles -- 1 per clock per SM (the
  shared L1TEX/MIO front end takes one warp-instruction per clock);
* ``tensor`` HMMA / HGMMA / IMMA; ``xu`` conversions and transcendentals (16 lanes: 0.5);
  ``uniform`` the uniform datapath (U*); ``other`` branches, barriers, NOPs.

The rates above are per device in ``devices.PIPE_RATES``.  An audit of the first kernels counted
524 warp-instructions per 2:4 iteration this way (triton 3.6, sm_90): ``tests/test_sass.py``
re-derives it.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PIPES = ("int", "fp", "lsu", "tensor", "xu", "uniform", "other")

_INT = {"IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "ISETP", "ICMP", "SEL", "PRMT",
        "LEA", "IMNMX", "VIMNMX", "VIADD", "VIADDMNMX", "BMSK", "SGXT", "FLO", "POPC", "BREV", "MOV", "MOV32I",
        "PLOP3", "P2R", "R2P", "CS2R", "FSETP", "FSEL", "FMNMX", "FCHK", "HSETP2", "HMNMX2", "I2IP", "F2FP",
        "IABS", "VABSDIFF", "VABSDIFF4", "IDP", "IDP4A", "IMAD", "IMUL", "IMUL32I", "IMAD32I", "BFE", "BFI",
        "ISCADD", "XMAD"}
_FP = {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I", "HFMA2", "HADD2", "HMUL2", "HFMA2_MMA", "FSWZADD",
       "DADD", "DMUL", "DFMA"}
_LSU = {"LDG", "STG", "LDS", "STS", "LDL", "STL", "LD", "ST", "LDGSTS", "LDSM", "STSM", "ATOM", "ATOMS", "ATOMG",
        "RED", "REDG", "SHFL", "LDC", "MATCH", "S2R"}
_TENSOR = {"HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "QGMMA", "BGMMA"}
_XU = {"MUFU", "I2F", "F2I", "F2F", "I2I", "FRND", "POPC_XU"}


def pipe_of(opcode: str) -> str:
    """The pipe of a SASS opcode (with or without modifiers), e.g. "LDG.E.128" -> "lsu"."""
    base = opcode.split(".")[0]
    if base in _TENSOR:
        return "tensor"
    if base in _LSU:
        return "lsu"
    if base in _INT:
        return "int"
    if base in _FP:
        return "fp"
    if base in _XU:
        return "xu"
    if base.startswith("U"):
        return "uniform"
    return "other"


@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str          # "" or e.g. "@P0" / "@!P1"
    op: str            # opcode with modifiers, e.g. "LDG.E.128"
    args: str

    @property
    def pipe(self) -> str:
        return pipe_of(self.op)


@dataclass
class Loop:
    """One innermost loop: instructions [start, end] (the backward branch is the last one)."""

    start: int
    end: int
    instrs: list = field(repr=False)

    @property
    def count(self) -> int:
        """Warp-instructions per iteration (every one takes an issue slot)."""
        return len(self.instrs)

    def pipes(self) -> dict:
        """Warp-instructions per iteration on every pipe (``PIPES``)."""
        c = Counter(i.pipe for i in self.instrs)
        return {p: c.get(p, 0) for p in PIPES}

    def ops(self) -> Counter:
        """Counts per full opcode (with modifiers)."""
        return Counter(i.op for i in self.instrs)

    def loads(self) -> dict:
        """Global loads per iteration by kind: ``{"LDG.E.128": 2, "LDGSTS.E.BYPASS.128": 4, ...}``."""
        return {op: n for op, n in sorted(self.ops().items())
                if op.startswith(("LDG.", "LDGSTS")) or op == "LDG"}

    def summary(self) -> dict:
        return {"instructions": self.count, "pipes": self.pipes(), "loads": self.loads(),
                "span": [hex(self.start), hex(self.end)]}


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")


def parse(text: str) -> dict:
    """``cuobjdump -sass`` text -> ``{function name: [Instr]}``."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = _LINE.match(line)
        if m and cur is not None:
            cur.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return out


def _branch_target(ins: Instr) -> Optional[int]:
    if not ins.op.startswith("BRA"):
        return None
    m = re.search(r"0x([0-9a-f]+)", ins.args)
    return int(m.group(1), 16) if m else None


def loops(instrs: list) -> list:
    """The innermost loops of a function, in address order.  A loop is a backward branch (its
    target at or before it); innermost: no other backward branch strictly inside its span.  The
    trailing ``BRA`` to itself that ends every kernel is not a loop."""
    back = []
    for ins in instrs:
        t = _branch_target(ins)
        if t is not None and t < ins.addr:
            back.append((t, ins.addr))
    inner = [(s, e) for s, e in back if not any(s <= s2 and e2 < e and (s2, e2) != (s, e) for s2, e2 in back)]
    return [Loop(s, e, [i for i in instrs if s <= i.addr <= e]) for s, e in sorted(set(inner))]


@functools.lru_cache(maxsize=None)
def cuobjdump_path() -> Optional[str]:
    """The ``cuobjdump`` the Triton wheel ships (None when it is missing)."""
    env = os.environ.get("PATCHC_CUOBJDUMP")
    if env:
        return env if Path(env).is_file() else None
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(p) if p.is_file() and os.access(p, os.X_OK) else None


class SassUnavailable(RuntimeError):
    """cuobjdump is missing (a Triton build without the NVIDIA tools)."""


def disassemble(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (``SassUnavailable`` when there is no cuobjdump)."""
    tool = cuobjdump_path()
    if tool is None:
        raise SassUnavailable("cuobjdump was not found in the Triton wheel (triton/backends/nvidia/bin)")
    with tempfile.TemporaryDirectory(prefix="patchc-sass-") as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        r = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed: {r.stderr.strip()[-2000:]}")
    return r.stdout


def kernel_loops(sass_text: str, name: Optional[str] = None) -> list:
    """The innermost loops of kernel ``name`` (the only function when None)."""
    funcs = parse(sass_text)
    if name is None:
        if len(funcs) != 1:
            raise ValueError(f"SASS holds {len(funcs)} functions; name one of {sorted(funcs)}")
        name = next(iter(funcs))
    return loops(funcs[name])
