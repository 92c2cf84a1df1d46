"""SASS reading (codegen/sass.py): loop detection, pipe classes, and the audit of the first kernel."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from patchc.codegen import sass
from patchc.codegen.devices import load_device

SASS_TEXT = textwrap.dedent("""
        Function : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   IMAD.WIDE R2, R0, 0x4, R2 ;
        /*0040*/                   PRMT R8, R4, 0x40, R5 ;
        /*0050*/                   FFMA R9, R8, R8, R9 ;
        /*0060*/               @P0 BRA 0x20 ;
        /*0070*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*0080*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0090*/                   LDGDEPBAR ;
        /*00a0*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*00b0*/              @!P1 BRA 0x70 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0;
""")


def test_parse_loops_and_pipes():
    fns = sass.parse(SASS_TEXT)
    assert list(fns) == ["k"] and len(fns["k"]) == 14
    loops = sass.loops(fns["k"])
    assert [(lp.start, lp.end, lp.count) for lp in loops] == [(0x20, 0x60, 5), (0x70, 0xb0, 5)]
    assert loops[0].pipes() == {"int": 2, "fp": 1, "lsu": 1, "tensor": 0, "xu": 0, "uniform": 0, "other": 1}
    assert loops[1].pipes()["tensor"] == 1 and loops[1].pipes()["uniform"] == 1
    assert loops[0].loads() == {"LDG.E.128": 1} and loops[1].loads() == {"LDGSTS.E.BYPASS.128": 1}


def test_pipe_classes():
    assert [sass.pipe_of(op) for op in ("IMAD.U32", "LOP3.LUT", "SHF.R.S32.HI", "FFMA", "LDS.128", "LDSM.16.M88.4",
                                        "HGMMA.64x64x16.F32.BF16", "F2F.F32.F16", "ULDC.64", "BAR.SYNC", "NOP")] == \
        ["int", "int", "int", "fp", "lsu", "lsu", "tensor", "xu", "uniform", "other", "other"]


def test_nested_loop_counts_only_the_inner_one():
    text = SASS_TEXT.replace("/*00b0*/              @!P1 BRA 0x70 ;", "/*00b0*/              @!P1 BRA 0x10 ;")
    loops = sass.loops(sass.parse(text)["k"])
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0x60)]


def test_h200_demand_arithmetic():
    h200 = load_device("h200")
    d = h200.demand({"issue": 8384, "int": 309 * 16, "lsu": 186 * 16}, 18432)
    assert (round(d["issue"], 2), round(d["int"], 2), round(d["lsu"], 2)) == (2.09, 2.46, 2.97)


AUDIT = Path(__file__).parent / "data" / "audit_hybrid_bm32_bn64_bk128.py"
# the launch the audit compiled: x, y, 8 packed buffers, M = 1, stride_xm = K, stride_xk = 1, stride_ym = N
AUDIT_ARGS = [{"ptr": "bf16"}, {"ptr": "bf16"}] + [{"ptr": "i32"}] * 5 + [{"ptr": "bf16"}, {"ptr": "i32"},
                                                                          {"ptr": "bf16"}, 1, 4096, 1, 4096]
# per triton version: (instructions of the 2:4 loop, of the dense loop, int and lsu of the 2:4 loop)
AUDIT_COUNTS = {"3.6": (524, 85, 309, 186), "3.7": (393, 94, 273, 86)}


@pytest.mark.skipif(sass.cuobjdump_path() is None, reason="cuobjdump is not in the Triton wheel")
def test_audit_of_the_first_kernel_is_reproduced(tmp_path):
    """The first kernel as launched at M = 1 (bf16 4096x4096, 32x64x128 blocks, 8 warps, 4 stages):
    on triton 3.6 its 2:4 loop is 524 warp-instructions for 128x64 weights per warp; 16 warps'
    worth per 128x128 tile is 2.09x the H200's issue rate at 4.8 TB/s, 2.46x its integer pipe and
    2.97x its load/store pipe."""
    import triton
    job = {"path": str(AUDIT), "arch": 90, "args": AUDIT_ARGS, "num_warps": 8, "num_stages": 4,
           "out": str(tmp_path / "asm")}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "patchc.codegen.asm", json.dumps([job])], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "asm" / "resources.json").read_text())
    assert res["constants"] == {"M": 1, "stride_xk": 1} and {"stride_xm", "stride_ym", "x_ptr"} <= set(res["divisible"])
    assert res["shared_bytes"] == 57348
    loops = json.loads((tmp_path / "asm" / "loops.json").read_text())
    assert len(loops) == 2
    version = ".".join(triton.__version__.split(".")[:2])
    if version not in AUDIT_COUNTS:
        pytest.skip(f"no recorded audit counts for triton {triton.__version__}")
    n24, nd, n_int, n_lsu = AUDIT_COUNTS[version]
    assert (loops[0]["instructions"], loops[1]["instructions"]) == (n24, nd)
    assert (loops[0]["pipes"]["int"], loops[0]["pipes"]["lsu"]) == (n_int, n_lsu)
    assert loops[0]["loads"].get("LDG.E.U16") == (64 if version == "3.6" else 16)   # scalar 2-byte loads
    per_tile = 2 * 8          # two 64-row programs of 8 warps per 128x128 tile
    d = load_device("h200").demand({p: loops[0]["pipes"][p] * per_tile for p in ("int", "lsu")}
                                   | {"issue": n24 * per_tile}, 128 * 128 * (0.5 * 2 + 1 / 8))
    assert d["issue"] > 1.5 and d["int"] > 2.0      # instruction-bound: 2:4 tiles could not save time
    if version == "3.6":
        assert (round(d["issue"], 2), round(d["int"], 2), round(d["lsu"], 2)) == (2.09, 2.46, 2.97)


# ---- budgets of today's decode kernels (bf16 4096x4096 and 11008x4096, sm_90, as launched) -----------
DECODE = [("gemv", 1, 16, 4, 4, 4), ("mma", 16, 16, 4, 4, 3), ("mma", 16, 32, 2, 4, 3)]
LIMITS = {"issue": 0.7, "int": 1.0, "lsu": 1.0}          # of the H200's rates, at 4.8 TB/s


@pytest.fixture(scope="module")
def decode_loops(tmp_path_factory):
    from patchc.codegen.asm import compile_many
    from patchc.codegen.cache import get_kernel
    from patchc.codegen.candidates import Candidate
    root = tmp_path_factory.mktemp("decode")
    gks = [get_kernel(Candidate(*c).spec(n, 4096, "bf16", (128, 128)), root) for c in DECODE for n in (4096, 11008)]
    compile_many(gks, ["sm_90"])
    return [(gk, gk.loops("sm_90"), gk.resources("sm_90")) for gk in gks]


@pytest.mark.skipif(sass.cuobjdump_path() is None, reason="cuobjdump is not in the Triton wheel")
def test_decode_kernels_stream_at_the_memory_limit(decode_loops):
    """The 2:4 loop of each decode kernel, per 128x128 tile, at 4.8 TB/s: <= 0.7 of the issue rate,
    <= 1.0 of the integer and load/store pipes; the dense loop is lighter still; loads pipelined
    (cp.async, >= 2-deep buffers), no scalar 2-byte loads; counts equal the shipped table's."""
    from patchc.codegen import counts
    h200 = load_device("h200")
    for gk, loops, res in decode_loops:
        s = gk.spec
        assert len(loops) == 2 and res["pipeline_depth"] >= 2 and res["spill_stores"] == 0, gk.name
        per_iter = s.num_warps * (128 // s.block_n) / s.block_t          # warp-iterations per tile
        for lp, tile_bytes in zip(loops, (128 * 128 * 1.125, 128 * 128 * 2)):
            per_tile = {p: lp["pipes"][p] * per_iter for p in ("int", "lsu")} | {"issue": lp["instructions"] * per_iter}
            d = h200.demand(per_tile, tile_bytes)
            assert all(d[p] <= LIMITS[p] for p in LIMITS), (gk.name, d)
            assert not any(op.startswith("LDG.E.U16") for op in lp["loads"]), (gk.name, lp["loads"])
            assert any(op.startswith("LDGSTS") for op in lp["loads"]), gk.name
        shipped = counts.shipped().get(counts.key(s, 90))
        if shipped is not None:   # this Triton's counts are shipped (for a representative N, K: within 2 %)
            assert loops[0]["instructions"] == pytest.approx(shipped["s"]["instructions"], rel=0.02), gk.name
            assert loops[1]["instructions"] == pytest.approx(shipped["d"]["instructions"], rel=0.02), gk.name


@pytest.mark.skipif(sass.cuobjdump_path() is None, reason="cuobjdump is not in the Triton wheel")
def test_decode_grids_fill_the_sms(decode_loops):
    from patchc.codegen.launch import grid
    for gk, _, _ in decode_loops:
        if gk.spec.strategy == "gemv" or gk.spec.block_n == 16:
            g = grid(gk.spec, 1)
            assert g[0] * g[1] * g[2] >= 132, gk.name
