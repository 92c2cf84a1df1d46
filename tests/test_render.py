"""Golden checks on rendered kernel source, the spec, its key and the runner's choice (no Triton)."""
import ast
import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from patchc.codegen.args import arg_names, sample_args, views
from patchc.codegen.candidates import Candidate
from patchc.codegen.render import render
from patchc.codegen.spec import KernelSpec, UnsupportedSpec

MMA = KernelSpec(n=4096, k=4096, dtype="bf16", tile=(128, 128), strategy="mma", block_m=16, block_n=32, block_t=2)
GEMV = KernelSpec(n=4096, k=4096, dtype="bf16", tile=(128, 128), strategy="gemv", block_m=1, block_n=16, block_t=4,
                  num_stages=4)


def test_render_module_is_pure_and_imports_no_triton():
    code = ("import sys; from patchc.codegen.render import render; from patchc.codegen.spec import KernelSpec;"
            "s = render(KernelSpec(n=64, k=64, dtype='fp16', tile=(32, 32), block_m=16, block_n=32));"
            "assert 'triton' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert render(MMA) == render(MMA)


@pytest.mark.parametrize("spec", [MMA, GEMV])
def test_name_header_and_valid_python(spec):
    src = render(spec)
    assert f"# kernel: {spec.name}" in src and f"# cache key: {spec.key()}" in src
    spec_line = next(ln for ln in src.splitlines() if ln.startswith("# spec: "))
    assert KernelSpec.from_dict(json.loads(spec_line[len("# spec: "):])) == spec
    tree = ast.parse(src)
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    kernel = next(f for f in fns if f.name == spec.name)
    assert ast.unparse(kernel.decorator_list[0]) == "triton.jit(do_not_specialize=['M'])"
    assert [a.arg for a in kernel.args.args] == arg_names(spec)
    assert all(ast.unparse(f.decorator_list[0]) == "triton.jit" for f in fns if f is not kernel)


def test_names():
    assert MMA.name == "mma_n4096_k4096_bf16_bm16_bn32_bk128_bt2_w4s3"
    assert GEMV.name == "gemv_n4096_k4096_bf16_bm1_bn16_bk128_bt4_w4s4"
    assert replace(MMA, split_k=2, bias=True, interpret=True).name.endswith("_sk2_bias_interp")


@pytest.mark.parametrize("spec", [MMA, GEMV, replace(MMA, block_t=1), replace(GEMV, dtype="fp16"),
                                  replace(MMA, dtype="fp32", block_n=16)])
def test_walk_is_affine_and_pipelined(spec):
    """The loops' addresses come from the loop index and values loaded before the loop: no load
    inside a loop feeds an address (it would collapse the software pipeline to one stage); both
    walks are ``tl.range(..., num_stages=)`` loops; kidx and the row record are loaded once."""
    src = render(spec)
    body = src[src.index(f"def {spec.name}("):]
    loops = re.findall(r"^    for j in tl\.range\([^)]*num_stages=(\d+)\):", body, re.M)
    assert loops == [str(spec.num_stages)] * 2
    for block in re.split(r"^    for j in ", body, flags=re.M)[1:]:
        inner = "\n".join(ln for ln in block.splitlines()[1:] if ln.startswith("        ") or not ln.strip())
        inner = inner.split("\n    #")[0]
        assert "kidx_ptr" not in inner and "rows_ptr" not in inner and "rec +" not in inner
    assert body.count("tl.load(kidx_ptr") == 1 and body.count("tl.load(rec +") == 8
    for banned in ("make_block_ptr", "libdevice", "autotune", "tl.constexpr("):
        assert banned not in src


def test_16_bit_kernels_permute_bytes_and_the_interpreter_variant_does_not_need_asm():
    for spec in (MMA, GEMV):
        gpu, interp = render(spec), render(replace(spec, interpret=True))
        assert "prmt.b32 $0, $1, $2, $3;" in gpu and "inline_asm" not in interp
        assert interp.count("_prmt(") == gpu.count("_prmt(")            # the same data flow
    assert 'mov.b32 $0, $1;' in render(MMA)                             # 16-bit MMA operands (see _opaque)
    fp32 = render(replace(MMA, dtype="fp32", block_n=16))
    assert "inline_asm" not in fp32 and "_i0(t & 15)" in fp32


def test_gemv_computes_from_the_compressed_form_and_mma_expands():
    g, m = render(GEMV), render(MMA)
    assert "xp = _prmt(" in g and "acc += _lo(vp)" in g and "tl.dot" not in g
    assert "lo = _prmt(vp, sel_lo, 0)" in m and "tl.dot(xb, tl.trans(w, 0, 2, 1), acc=acc)" in m
    assert "tl.dot(xb, tl.trans(w), acc=acc)" in render(replace(MMA, block_t=1))


def test_ragged_k_is_one_masked_step_after_the_loops():
    src = render(replace(MMA, k=4096 + 64))
    assert "if edge_s:" in src and "if edge_d:" in src and "# WR      = 64" in src
    assert "if edge_s:" not in render(MMA)
    assert "if edge_s:" not in render(replace(MMA, k=4096 + 2)) and "if edge_d:" in render(replace(MMA, k=4096 + 2))


def test_split_k_uses_fp32_atomics_and_adds_bias_once():
    spec = replace(MMA, split_k=4, bias=True)
    src = render(spec)
    assert "pid_s = tl.program_id(2)" in src and "t0 = total * pid_s // 4" in src
    assert "mask=n_ok & (pid_s == 0)" in src
    assert "tl.atomic_add(y_ptr + y_offs, out, mask=y_mask)" in src and "tl.store(" not in src
    assert views(spec)["y"] == "fp32" and views(MMA)["y"] == "bf16"
    assert "b_ptr" in arg_names(spec) and "b_ptr" not in arg_names(MMA)


def test_argument_views_and_samples():
    assert views(GEMV)["x"] == views(GEMV)["dense_vals"] == views(GEMV)["sparse_vals"] == "i32"
    assert views(MMA)["x"] == "bf16" and views(MMA)["sparse_vals"] == "i32" and views(MMA)["dense_vals"] == "bf16"
    fp32 = replace(MMA, dtype="fp32", block_n=16)
    assert set(views(fp32).values()) <= {"fp32", "i32"} and views(fp32)["sparse_vals"] == "fp32"
    assert sample_args(MMA, 7)[-1] == 7 and len(sample_args(MMA)) == len(arg_names(MMA))


def test_precision_in_spec_and_source():
    interp = replace(MMA, interpret=True)
    assert interp.upcast and not MMA.upcast and interp.key() != MMA.key()
    assert "tl.dot(xb.to(tl.float32), tl.trans(w, 0, 2, 1).to(tl.float32)" in render(interp)
    fp16 = replace(MMA, dtype="fp16", interpret=True)            # the interpreter does fp16 dots itself
    assert not fp16.upcast and "xb.to(tl.float32)" not in render(fp16)
    s32 = replace(MMA, dtype="fp32", input_precision="ieee")
    t32 = replace(MMA, dtype="fp32", input_precision="tf32")
    assert s32.key() != t32.key()
    assert 'input_precision="ieee"' in render(s32) and 'input_precision="tf32"' in render(t32)
    assert replace(MMA, input_precision="tf32").input_precision == ""
    assert replace(GEMV, dtype="fp32").input_precision == ""


def test_key_covers_every_field_and_is_stable():
    assert MMA.key() == KernelSpec.from_dict(MMA.to_dict()).key()
    variants = [dict(n=4095), dict(k=4095), dict(dtype="fp16"), dict(tile=(128, 256)), dict(block_m=32),
                dict(block_n=64), dict(block_k=64), dict(block_t=4), dict(split_k=2), dict(num_warps=8),
                dict(num_stages=4), dict(bias=True), dict(interpret=True), dict(strategy="gemv", block_m=1)]
    keys = {replace(MMA, **v).key() for v in variants}
    assert len(keys) == len(variants) and MMA.key() not in keys


@pytest.mark.parametrize("bad", [dict(block_n=48), dict(block_k=256), dict(block_m=8), dict(dtype="int8"),
                                 dict(block_t=3), dict(block_k=16), dict(activation="silu"), dict(strategy="sparse"),
                                 dict(strategy="gemv", block_k=64), dict(strategy="gemv", block_m=1, k=4095)])
def test_unsupported_specs_are_rejected(bad):
    with pytest.raises(UnsupportedSpec):
        replace(MMA, **bad)


def test_gemv_allows_narrow_blocks_and_odd_k_in_fp32():
    assert replace(GEMV, block_m=1, block_n=4).block_n == 4
    assert replace(GEMV, dtype="fp32", k=4095).k == 4095


def test_runner_dispatch_follows_the_ranges(tmp_path):
    """Ranges from codegen.layout.plan_dispatch: one kernel per hybrid range, dense elsewhere unless forced."""
    from patchc.codegen.runner import HybridRunner, default_candidate
    a = Candidate("gemv", 1, 16, 4, 4, 4)
    b = Candidate("mma", 16, 32, 2, 4, 3, split_k=2)
    ranges = [(1, a.to_dict()), (64, b.to_dict()), (None, {"strategy": "dense"})]
    r = HybridRunner(4096, 4096, torch.bfloat16, (128, 128), ranges=ranges, cache_dir=tmp_path)
    k1, k2, k64 = (r.kernel_for(m, False, False) for m in (1, 2, 64))
    assert k2 is k64 and k1 is not k2
    assert (k1.spec.strategy, k1.spec.block_m, k1.spec.block_t) == ("gemv", 1, 4)
    assert (k2.spec.strategy, k2.spec.block_n, k2.spec.split_k) == ("mma", 32, 2)
    assert r.kernel_for(65, False, False) is None                       # dense dispatch
    forced = r.kernel_for(5000, False, False, force=True)
    assert forced.spec == default_candidate(65).spec(4096, 4096, "bf16", (128, 128))
    assert r.kernel_for(65, False, False, force=True) is forced
    assert [k.name for k in r.kernels(False, False)] == [k1.name, k2.name]
    assert len(r.kernels(False, False, force=True)) == 3
    interp = r.kernel_for(1, True, True)                    # the interpreter: the tile height per program
    assert interp.spec.interpret and interp.spec.bias and interp.spec.strategy == "gemv"
    assert (interp.spec.block_n, interp.spec.block_t) == (128, 4)


def test_runner_falls_back_when_a_candidate_does_not_fit_the_shape(tmp_path):
    from patchc.codegen.runner import HybridRunner
    r = HybridRunner(64, 99, torch.float16, (32, 32), cache_dir=tmp_path)   # odd K: no 16-bit gemv
    assert r.kernel_for(1, False, False).spec.strategy == "mma"


def test_runner_from_a_real_plan(tmp_path):
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
            assert k.spec == c.spec(1024, 1024, "fp16", (128, 128), bias=True)
