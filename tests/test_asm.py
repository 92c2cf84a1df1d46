"""AOT compilation of generated kernels for sm_80 / sm_90 without a GPU, from an interpreter process."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from patchc.codegen.asm import parse_target

CHILD = textwrap.dedent("""
    import json, os, sys, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from patchc.codegen.cache import get_kernel
    from patchc.codegen.launch import launch, make_spec
    from patchc.packing import pack
    from patchc.types import TileMask
    root = sys.argv[1]
    # this process really runs the interpreter: launch one kernel on CPU first
    small = get_kernel(make_spec(32, 32, torch.float32, (16, 16), 4, bias=False, interpret=True), root)
    packed = pack(torch.randn(32, 32), TileMask.dense((32, 32), (16, 16)))
    y = launch(small, torch.randn(4, 32), packed)
    assert type(small.fn).__name__ == "InterpretedFunction" and y.shape == (4, 32)
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        for m in (1, 2048):                                   # BLOCK_M 16 + split-K, and BLOCK_M 128
            gk = get_kernel(make_spec(4096, 4096, dtype, (128, 128), m, bias=True, interpret=False), root)
            for target in ("sm_80", "sm_90"):
                out.append({"name": gk.name, "dtype": str(dtype), "target": target, "path": str(gk.path),
                            "ptx": gk.asm(target, "ptx"), "ttir": gk.asm(target, "ttir"),
                            "ttgir": gk.asm(target, "ttgir"), "resources": gk.resources(target)})
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("asm")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT"))
    return root, json.loads(line[len("RESULT"):])


def test_every_kernel_compiles_for_both_targets(compiled):
    _, res = compiled
    assert len(res) == 8 and {r["target"] for r in res} == {"sm_80", "sm_90"}
    for r in res:
        assert r["name"] in r["ptx"] and "tt.dot" in r["ttir"] and "ttg." in r["ttgir"]
        assert re.search(r"^\s*\.target\s+sm_%s" % r["target"][3:], r["ptx"], re.M)


def test_tensor_cores_on_16_bit_operands(compiled):
    _, res = compiled
    for r in res:
        t = "bf16" if "bfloat16" in r["dtype"] else "f16"
        mma = re.findall(r"mma\.sync\.aligned\.\S+", r["ptx"])
        wgmma = re.findall(r"wgmma\.mma_async\.\S+", r["ptx"])
        if r["target"] == "sm_80":
            assert mma and all(f".{t}.{t}." in i for i in mma), (r["name"], mma[:2])
        else:
            assert mma or wgmma, r["name"]
            assert all(f".{t}.{t}" in i or f".{t}" in i for i in mma + wgmma), (r["name"], (mma + wgmma)[:2])
            if "_bm128_" in r["name"]:
                assert wgmma, "a 128-row block on sm_90 should use wgmma"
        assert "mma.sync.aligned.m16n8k8.row.col.f32.tf32" not in r["ptx"]


def test_no_spills_and_resource_summary(compiled):
    _, res = compiled
    for r in res:
        info = r["resources"]
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (r["name"], info)
        assert not info["local_memory"], r["name"]
        assert 0 < info["registers"] <= 255 and info["shared_bytes"] > 0
        assert info["num_warps"] in (4, 8)


def test_asm_is_cached_next_to_the_kernel(compiled, monkeypatch):
    root, res = compiled
    from patchc.codegen import asm as asm_mod
    from patchc.codegen.cache import clear_memo, get_kernel
    from patchc.codegen.spec import KernelSpec
    meta = json.load(open(os.path.join(os.path.dirname(res[0]["path"]), "spec.json")))
    clear_memo()
    gk = get_kernel(KernelSpec.from_dict(meta["spec"]), root)
    assert gk.cache_hit
    monkeypatch.setattr(asm_mod.subprocess, "run", lambda *a, **k: pytest.fail("recompiled a cached asm entry"))
    assert gk.asm("sm_80", "ptx") == res[0]["ptx"] and (gk.path.parent / "asm" / "sm_80" / "cubin").is_file()
    with pytest.raises(ValueError):
        gk.asm("sm_80", "sass")


def test_parse_target():
    assert parse_target("sm_90") == parse_target("sm_90a") == parse_target("90") == 90
    assert parse_target("SM_80") == 80
    with pytest.raises(ValueError):
        parse_target("gfx942")


def test_gpu_check_dry_run_renders_and_compiles(tmp_path):
    """bench/gpu_check.py --dry-run: the CPU side of the GPU check (pack, render, AOT sm_90)."""
    import csv
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "bench", "gpu_check.py"), "--dry-run", "--quick",
                        "--shapes", "256x512", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "k")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "gpu_check.csv")))
    assert len(rows) == 4 and all(row["spill_stores"] == "0" and row["pack_roundtrip"] == "True" for row in rows)
    assert {row["plan"] for row in rows} <= {"hybrid", "dense", "default"}
    assert (tmp_path / "out" / "gpu_check.md").read_text().startswith("# patchc GPU check (dry run")
