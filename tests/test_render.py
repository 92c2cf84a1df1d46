"""Golden checks on rendered kernel source, the spec, its key and the default block sizes (no Triton)."""
import ast
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from patchc.codegen.launch import default_blocks, make_spec
from patchc.codegen.render import arg_names, render, signature
from patchc.codegen.spec import KernelSpec, UnsupportedSpec

BASE = KernelSpec(n=4096, k=4096, dtype="bf16", tile=(128, 128), block_m=16, block_n=64, block_k=64)


def test_render_module_is_pure_and_imports_no_triton():
    code = ("import sys; from patchc.codegen.render import render; from patchc.codegen.spec import KernelSpec;"
            "s = render(KernelSpec(n=64, k=64, dtype='fp16', tile=(32, 32), block_m=16, block_n=32, block_k=32));"
            "assert 'triton' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert render(BASE) == render(BASE)


def test_name_header_and_valid_python():
    src = render(BASE)
    assert BASE.name == "hybrid_n4096_k4096_bf16_bm16_bn64_bk64"
    assert f"# kernel: {BASE.name}" in src
    assert f"# cache key: {BASE.key()}" in src
    spec_line = next(ln for ln in src.splitlines() if ln.startswith("# spec: "))
    assert KernelSpec.from_dict(json.loads(spec_line[len("# spec: "):])) == BASE
    tree = ast.parse(src)
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert [f.name for f in fns] == [BASE.name]
    assert ast.unparse(fns[0].decorator_list[0]) == "triton.jit"
    assert [a.arg for a in fns[0].args.args] == arg_names(BASE)


def test_golden_sparse_loop_dense_loop_and_epilogue():
    src = render(replace(BASE, bias=True))
    sparse, dense, store = src.index("# sparse loop"), src.index("# dense loop"), src.index("tl.store(")
    assert sparse < dense < store                         # 2:4 tiles first, then dense, then the epilogue
    for s in ["for it in range(s_lo * 2, s_hi * 2):  # sparse loop",   # 2 BLOCK_K steps per 128-wide tile
              "kt = tl.load(sparse_kidx_ptr + t)",
              "v0 = tl.load(vals + (2 * g)[None, :])", "v1 = tl.load(vals + (2 * g + 1)[None, :])",
              "word = tl.load(sparse_meta_ptr + t * 512 + sm_rows + (g // 8)[None, :])",   # 128 rows x 4 words
              "code = (word >> (4 * (g % 8))[None, :]) & 15",
              "w = tl.where((code & 3) == pos, v0, tl.where((code >> 2) == pos, v1, 0.0))",
              "for it in range(d_lo * 2, d_hi * 2):  # dense loop",
              "w = tl.load(dense_vals_ptr + t * 16384 + dv_rows + (kk + rk)[None, :])",
              "acc = tl.zeros((16, 64), dtype=tl.float32)",
              "mask=m_ok[:, None] & (cols < 4096)[None, :]",
              "orig = tl.load(row_order_ptr + row)", "rn_out = orig * 128 + rn",
              "bias = tl.load(b_ptr + rn_out, mask=n_ok, other=0.0).to(tl.float32)",
              "tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)"]:
        assert s in src, s
    assert src.count("acc = tl.dot(xb, tl.trans(w), acc=acc)") == 2      # bf16 straight to tensor cores
    for banned in ("make_block_ptr", "inline_asm", "libdevice", "autotune", "atomic_add", "tl.constexpr("):
        assert banned not in src


def test_split_k_uses_fp32_atomics_and_adds_bias_once():
    spec = replace(BASE, split_k=4, bias=True)
    src = render(spec)
    assert "pid_s = tl.program_id(2)" in src and "t0 = total * pid_s // 4" in src
    assert "mask=n_ok & (pid_s == 0)" in src
    assert "tl.atomic_add(y_ptr + y_offs, acc, mask=y_mask)" in src and "tl.store(" not in src
    assert signature(spec)["y_ptr"] == "*fp32" and signature(BASE)["y_ptr"] == "*bf16"
    assert "b_ptr" in signature(spec) and "b_ptr" not in signature(BASE)
    assert spec.name.endswith("_sk4_bias")


def test_precision_in_spec_and_source():
    interp = replace(BASE, interpret=True)
    assert interp.upcast and not BASE.upcast and interp.key() != BASE.key()
    assert render(interp).count("tl.dot(xb.to(tl.float32), tl.trans(w.to(tl.float32))") == 2
    fp16 = replace(BASE, dtype="fp16", interpret=True)            # the interpreter does fp16 dots itself
    assert not fp16.upcast and "xb.to(tl.float32)" not in render(fp16)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        s32 = make_spec(64, 64, torch.float32, (32, 32), 8, bias=False, interpret=False)
        torch.set_float32_matmul_precision("high")
        t32 = make_spec(64, 64, torch.float32, (32, 32), 8, bias=False, interpret=False)
    finally:
        torch.set_float32_matmul_precision(old)
    assert (s32.input_precision, t32.input_precision) == ("ieee", "tf32") and s32.key() != t32.key()
    assert 'input_precision="ieee"' in render(s32) and 'input_precision="tf32"' in render(t32)
    assert make_spec(64, 64, torch.float16, (32, 32), 8, bias=False, interpret=False).input_precision == ""


def test_key_covers_every_field_and_is_stable():
    assert BASE.key() == KernelSpec.from_dict(BASE.to_dict()).key()
    variants = [dict(n=4095), dict(k=4095), dict(dtype="fp16"), dict(tile=(128, 256)), dict(block_m=32),
                dict(block_n=128), dict(block_k=128), dict(split_k=2), dict(num_warps=8), dict(num_stages=3),
                dict(bias=True), dict(interpret=True)]
    keys = {replace(BASE, **v).key() for v in variants}
    assert len(keys) == len(variants) and BASE.key() not in keys


@pytest.mark.parametrize("bad", [dict(block_n=48), dict(block_k=256), dict(block_m=8), dict(dtype="int8"),
                                 dict(tile=(24, 24), block_n=16, block_k=16), dict(activation="silu")])
def test_unsupported_specs_are_rejected(bad):
    with pytest.raises(UnsupportedSpec):
        replace(BASE, **bad)


def test_default_blocks():
    llama = dict(n=4096, k=4096, tile=(128, 128), dtype=torch.bfloat16)
    d1, d100, d2048 = (default_blocks(m, **llama) for m in (1, 100, 2048))
    assert (d1["block_m"], d1["block_n"], d1["block_k"]) == (16, 64, 64)
    assert d100["block_m"] == 64 and d2048["block_m"] == 128 and d2048["split_k"] == 1
    assert d1["split_k"] > 1                                     # 64 output blocks only: split K at decode
    assert default_blocks(16, 32, 48, (16, 16), torch.float32)["block_k"] == 16
    interp = default_blocks(5, 64, 64, (32, 64), torch.float32, interpret=True)
    assert (interp["block_n"], interp["block_k"], interp["split_k"]) == (32, 64, 1)


def test_runner_dispatch_follows_the_cost_model_plan(tmp_path):
    """Ranges from codegen.layout.plan_dispatch: one kernel per hybrid range, dense elsewhere unless forced."""
    from patchc.codegen.runner import HybridRunner
    ranges = [(16, dict(block_m=16, split_k=4, num_warps=4, num_stages=5)),
              (64, dict(block_m=64, split_k=1, num_warps=8, num_stages=3)), (None, {"strategy": "dense"})]
    r = HybridRunner(4096, 4096, torch.bfloat16, (128, 128), ranges=ranges, block_n=32, block_k=128, cache_dir=tmp_path)
    k1, k16, k17, k64 = (r.kernel_for(m, False, False) for m in (1, 16, 17, 64))
    assert k1 is k16 and k17 is k64 and k1 is not k17
    assert (k1.spec.block_m, k1.spec.split_k, k1.spec.num_stages, k1.spec.block_n, k1.spec.block_k) == (16, 4, 5, 32, 128)
    assert (k64.spec.block_m, k64.spec.num_warps) == (64, 8)
    assert r.kernel_for(65, False, False) is None                       # dense dispatch
    forced = [r.kernel_for(m, False, False, force=True) for m in (65, 128, 129, 9000)]
    assert [k.spec.block_m for k in forced] == [64, 64, 128, 128] and forced[0] is forced[1]
    assert all(k.spec.block_n == 32 and k.spec.block_k == 128 for k in forced)
    assert len(r.kernels(False, False, force=True)) == 4
    assert [k.name for k in r.kernels(False, False)] == [k1.name, k17.name]
    interp = r.kernel_for(1, True, True)                                # the interpreter's own blocks
    assert interp.spec.interpret and interp.spec.num_stages == 1 and interp.spec.block_n == 32


def test_runner_from_a_real_plan(tmp_path):
    pytest.importorskip("patchc.codegen.layout")
    from patchc.codegen.layout import plan_dispatch
    from patchc.codegen.runner import HybridRunner
    from patchc.types import TileMask
    kinds = torch.ones(8, 8, dtype=torch.uint8)
    m24 = torch.tensor([1, 1, 0, 0], dtype=torch.bool).repeat(1024, 256)
    tm = TileMask.from_kinds((128, 128), kinds, m24)
    plan = plan_dispatch(tm, torch.float16, device="h200")
    r = HybridRunner.from_plan(1024, 1024, torch.float16, (128, 128), plan, cache_dir=tmp_path)
    for m in (1, 7, 100, 5000):
        c = plan.select(m)
        k = r.kernel_for(m, True, False)
        assert (k is None) == (c == "dense")
        if k is not None:
            assert (k.spec.block_m, k.spec.split_k, k.spec.block_n) == (c.block_m, c.split_k, plan.block_n)
