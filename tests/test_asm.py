"""AOT compilation of generated kernels for sm_80 / sm_90 without a GPU, as a launch builds them."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from patchc.codegen.asm import parse_target, pipeline_depth

CHILD = textwrap.dedent("""
    import json, os, sys, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from patchc.codegen.cache import get_kernel
    from patchc.codegen.launch import launch
    from patchc.codegen.spec import KernelSpec
    from patchc.packing import pack
    from patchc.types import TileMask
    root = sys.argv[1]
    # this process really runs the interpreter: launch one kernel on CPU first
    small = get_kernel(KernelSpec(n=32, k=32, dtype="fp32", tile=(16, 16), strategy="gemv", block_m=1, block_n=16,
                                  interpret=True), root)
    y = launch(small, torch.randn(4, 32), pack(torch.randn(32, 32), TileMask.dense((32, 32), (16, 16))))
    assert y.shape == (4, 32)
    out = []
    for dtype, strategy, bm, bn, bt, targets in (("bf16", "gemv", 1, 16, 4, ("sm_80", "sm_90")),
                                                 ("bf16", "mma", 16, 32, 2, ("sm_90",)),
                                                 ("fp16", "mma", 16, 32, 2, ("sm_80",)),
                                                 ("fp16", "mma", 64, 64, 1, ("sm_90",))):
        spec = KernelSpec(n=4096, k=4096, dtype=dtype, tile=(128, 128), strategy=strategy, block_m=bm,
                          block_n=bn, block_t=bt, block_k=64 if bm == 64 else 0, bias=True)
        gk = get_kernel(spec, root)
        from patchc.codegen.asm import compile_many
        compile_many([gk], list(targets))
        for target in targets:
            out.append({"name": gk.name, "dtype": dtype, "strategy": strategy, "target": target,
                        "path": str(gk.path), "ptx": gk.asm(target, "ptx"), "ttgir": gk.asm(target, "ttgir"),
                        "resources": gk.resources(target), "loops": gk.loops(target)})
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("asm")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(root)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT"))
    return root, json.loads(line[len("RESULT"):])


def test_every_kernel_compiles_for_both_targets(compiled):
    _, res = compiled
    assert len(res) == 5 and {r["target"] for r in res} == {"sm_80", "sm_90"}
    for r in res:
        assert r["name"] in r["ptx"] and "ttg." in r["ttgir"]
        assert re.search(r"^\s*\.target\s+sm_%s" % r["target"][3:], r["ptx"], re.M)
        assert "prmt.b32" in r["ptx"]                       # the byte-permute selectors and picks


def test_tensor_cores_for_the_mma_strategy_only(compiled):
    _, res = compiled
    for r in res:
        t = "bf16" if r["dtype"] == "bf16" else "f16"
        mma = re.findall(r"mma\.sync\.aligned\.\S+", r["ptx"]) + re.findall(r"wgmma\.mma_async\.\S+", r["ptx"])
        if r["strategy"] == "mma":
            assert mma and all(f".{t}" in i for i in mma), (r["name"], mma[:2])
            assert all(re.search(r"\.m\d+n\d+k16\.", i) for i in mma), mma[:2]   # 16-bit operands, K 16 per op
        else:
            assert not mma, r["name"]


def test_no_spills_pipelined_loads_and_two_inner_loops(compiled):
    _, res = compiled
    for r in res:
        info = r["resources"]
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (r["name"], info)
        assert not info["local_memory"], r["name"]
        assert 0 < info["registers"] <= 255 and info["shared_bytes"] > 0
        assert info["pipeline_depth"] >= 2, r["name"]        # multi-buffered loads
        assert info["constants"] == {} and "M" not in info["divisible"]   # M: do_not_specialize
        assert len(r["loops"]) == 2 and all(lp["instructions"] > 0 for lp in r["loops"])
        assert any(op.startswith("LDGSTS") for lp in r["loops"] for op in lp["loads"]), r["name"]   # cp.async


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
    assert "Function :" in gk.asm("sm_80", "sass")
    with pytest.raises(ValueError):
        gk.asm("sm_80", "cubin")


SAME = textwrap.dedent("""
    import json, sys, torch
    from patchc.codegen.args import launch_args, sample_args
    from patchc.codegen.asm import specialise
    from patchc.codegen.cache import get_kernel
    from patchc.codegen.launch import kernel_fn
    from patchc.codegen.spec import KernelSpec
    from patchc.packing import pack
    from patchc.prune import magnitude_hybrid
    from patchc.types import TileMask
    out = []
    for d in json.loads(sys.argv[2]):
        spec = KernelSpec.from_dict(d)
        gk = get_kernel(spec, sys.argv[1])
        fn = kernel_fn(gk)
        w = torch.randn(spec.n, spec.k).to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[spec.dtype]))
        kind = torch.ones(spec.n // spec.tile[0], spec.k // spec.tile[1], dtype=torch.uint8)
        m24 = torch.tensor([1, 0, 1, 0], dtype=torch.bool).repeat(spec.n, spec.k // 4)
        packed = pack(w, TileMask.from_kinds(spec.tile, kind, m24))
        for m in (1, 3, 16):
            x = torch.randn(m, spec.k).to(w.dtype)
            y = torch.empty(m, spec.n, dtype=w.dtype)
            real = launch_args(spec, x, y, packed, torch.zeros(spec.n, dtype=w.dtype) if spec.bias else None)
            a, _ = specialise(fn, real, 90, spec.num_warps, spec.num_stages)
            b, _ = specialise(fn, sample_args(spec, m), 90, spec.num_warps, spec.num_stages)
            out.append([a.signature == b.signature, a.constants == b.constants, a.attrs == b.attrs,
                        sorted(fn.arg_names[i[0]] for i in a.attrs)])
    print("RESULT" + json.dumps(out))
""")


def test_asm_and_a_launch_specialise_alike(tmp_path):
    """Triton's launch binder on the arguments ``launch`` passes (real CPU tensors) gives the same
    signature, constants and divisibility hints as the stand-ins ``asm()`` compiles with, at any M."""
    from patchc.codegen.spec import KernelSpec
    specs = [KernelSpec(n=256, k=512, dtype="bf16", tile=(128, 128), strategy="gemv", block_m=1, block_n=16,
                        block_t=4, bias=True),
             KernelSpec(n=256, k=512, dtype="fp16", tile=(128, 128), strategy="mma", block_m=16, block_n=32)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SAME, str(tmp_path), json.dumps([s.to_dict() for s in specs])],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    assert len(rows) == 6 and all(row[:3] == [True, True, True] for row in rows), rows
    assert all("x_ptr" in row[3] and "M" not in row[3] for row in rows)


def test_parse_target_and_pipeline_depth():
    assert parse_target("sm_90") == parse_target("sm_90a") == parse_target("90") == 90
    assert parse_target("SM_80") == 80
    with pytest.raises(ValueError):
        parse_target("gfx942")
    ttgir = ("%a = ttg.local_alloc : () -> !ttg.memdesc<3x16x128xbf16, #shared, #smem, mutable>\n"
             "%b = ttg.local_alloc %w : (tensor<64x128xbf16>) -> !ttg.memdesc<64x128xbf16, #shared2, #smem>")
    assert pipeline_depth(ttgir) == 3 and pipeline_depth("") == 1


def test_gpu_check_dry_run_plans_packs_and_compiles(tmp_path):
    """bench/gpu_check.py --dry-run: the CPU side of the GPU check (plan, pack, AOT sm_90), 128 x 128
    tiles and a finer one."""
    import csv
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "bench", "gpu_check.py"), "--dry-run", "--quick",
                        "--shapes", "4096x4096", "--tiles", "128x128,64x64", "--top", "1", "--jobs", "1",
                        "--out", str(tmp_path / "out"),
                        "--cache-dir", str(tmp_path / "k")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "gpu_check.csv")))
    assert rows and all(row["spill_stores"] == "0" and row["pack_roundtrip"] == "True" for row in rows)
    assert any(row["plan_pick"] == "True" for row in rows)
    assert {row["tile"] for row in rows} == {"128x128", "64x64"}      # the finer tile's kernels compile too
    assert (tmp_path / "out" / "gpu_check.md").read_text().startswith("# patchc GPU check (dry run")
