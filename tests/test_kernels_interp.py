"""Generated kernels under ``TRITON_INTERPRET=1`` against the float64 masked reference.

The interpreter must be switched on before Triton is imported, and the rest of the suite needs
real ``triton.compile``: so in a normal run this file has one test that re-runs this same file
with ``python -m pytest`` in a child process with ``TRITON_INTERPRET=1``; there the interpreter
tests below are defined.  Shapes are small and blocks large so the whole child stays fast.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_mask(n, k, tile, mode, gen):
    """A valid TileMask: mode "dense" (no 2:4 tile), "sparse" (every allowed tile) or "mixed"."""
    from patchc.types import TileMask, grid_of, sparse_allowed
    nN, nK = grid_of((n, k), tile)
    p = {"dense": 0.0, "sparse": 1.0, "mixed": 0.5}[mode]
    kinds = (torch.rand(nN, nK, generator=gen) < p) & sparse_allowed(tile, (n, k))
    g = k // 4
    keep = torch.rand(n, g, 4, generator=gen).argsort(-1)[..., :2]       # 2 of 4, any of the 6 patterns
    m24 = torch.ones(n, k, dtype=torch.bool)
    m24[:, : 4 * g] = torch.zeros(n, g, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, 4 * g)
    return TileMask.from_kinds(tile, kinds.to(torch.uint8), m24).validate()


def check_case(n, k, m, tile, mode, dtype, bias, reorder, split_k, strategy="mma", bm=16, bn=16, bt=1, bk=0,
               lead=(), strided=False, seed=0):
    """Pack a random weight, run the generated kernel, compare with F.linear in float64."""
    from patchc.codegen.cache import get_kernel
    from patchc.codegen.launch import launch
    from patchc.codegen.spec import KernelSpec
    from patchc.packing import pack
    gen = torch.Generator().manual_seed(seed)
    tm = random_mask(n, k, tile, mode, gen)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    order = torch.randperm(tm.grid[0], generator=gen) if reorder else None
    packed = pack(w, tm, order)
    spec = KernelSpec(n=n, k=k, dtype=dtype, tile=tile, strategy=strategy, block_m=bm, block_n=bn, block_k=bk,
                      block_t=bt, split_k=split_k, bias=bias, interpret=True, input_precision="ieee", num_stages=2)
    gk = get_kernel(spec)
    x = torch.randn(*lead, m, 2 * k if strided else k, generator=gen).to(dtype)
    if strided:
        x = x[..., ::2]                                   # non-contiguous along K: the launcher copies it
    y = launch(gk, x, packed, b)
    ref = F.linear(x.double(), (w.double() * tm.mask), None if b is None else b.double())
    assert y.dtype == dtype and y.shape == ref.shape
    err = ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item() if ref.numel() else 0.0
    assert err < TOL[dtype], f"{gk.name}: relative error {err:.2e}"
    return gk


if not INTERP:
    def test_interpreter_suite(tmp_path):
        """Run the interpreter tests of this file in a child process with TRITON_INTERPRET=1."""
        env = {**os.environ, "TRITON_INTERPRET": "1", "PATCHC_CACHE_DIR": str(tmp_path / "kernels")}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                           env=env, capture_output=True, text=True, timeout=900,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        assert " passed" in r.stdout and "failed" not in r.stdout

    def test_triton_kernel_on_cpu_without_interpreter_says_so(tmp_path):
        from patchc import runtime
        from patchc.codegen.runner import HybridRunner
        tm = random_mask(32, 32, (16, 16), "mixed", torch.Generator().manual_seed(0))
        w = torch.randn(32, 32)
        e = runtime.entry_for([w], [tm], [False], ["x"], [False])
        e.kernel, e.runner = "triton", HybridRunner(32, 32, torch.float32, (16, 16), cache_dir=tmp_path)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*kernel='reference'"):
            e.run(torch.randn(3, 32), [w], [])

    def test_backend_kernel_triton_on_cpu_without_interpreter_says_so(tmp_path):
        from patchc.prune import magnitude_hybrid
        from conftest import MLP
        model = MLP().eval()
        plan = magnitude_hybrid(model, 0.4, (16, 16))
        compiled = torch.compile(model, backend="patch", options={"plan": plan, "kernel": "triton", "inner": "eager",
                                                                   "cache_dir": str(tmp_path)})
        with torch.inference_mode(), pytest.raises(Exception, match="TRITON_INTERPRET=1"):
            compiled(torch.randn(2, 64))

else:
    import triton
    import triton.language as tl
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    SETTINGS = settings(max_examples=14, deadline=None, database=None, derandomize=True,
                        suppress_health_check=list(HealthCheck))

    @st.composite
    def cases(draw, strategy):
        tn, tk = draw(st.sampled_from([(16, 16), (16, 32), (32, 16), (32, 64), (8, 32)]))
        if strategy == "mma":
            tn = max(tn, 16)
            bm, bn = draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32]))
            bk = draw(st.sampled_from([b for b in (0, 32) if tk % max(b, 1) == 0 and (b == 0 or b < tk)]))
        else:
            bm, bn, bk = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([4, 8, 16])), 0
        k = draw(st.integers(1, 3 * tk))
        if strategy == "gemv":
            k += k % 2                                    # 16-bit gemv reads X in pairs
        return dict(n=draw(st.integers(1, 3 * tn)), k=k, m=draw(st.integers(1, 40 if strategy == "mma" else 9)),
                    tile=(tn, tk), mode=draw(st.sampled_from(["dense", "sparse", "mixed"])),
                    bias=draw(st.booleans()), reorder=draw(st.booleans()), split_k=draw(st.sampled_from([1, 1, 2, 3])),
                    strategy=strategy, bm=bm, bn=bn, bk=bk, bt=draw(st.sampled_from([1, 2, 4])),
                    strided=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))

    @SETTINGS
    @given(cases("gemv"), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    def test_gemv_cases_match_reference(case, dtype):
        check_case(dtype=dtype, **case)

    @SETTINGS
    @given(cases("mma"), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    def test_mma_cases_match_reference(case, dtype):
        check_case(dtype=dtype, **case)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("strategy,mode,split_k", [("mma", "dense", 1), ("mma", "sparse", 2), ("gemv", "mixed", 1),
                                                       ("gemv", "sparse", 3)])
    def test_fixed_cases(dtype, strategy, mode, split_k):
        """Ragged N/K/M (K % 4 == 0 so the ragged column can be 2:4), reordered rows, bias, a 3-D input,
        BLOCK_T > 1: every kernel feature at once."""
        bm = 16 if strategy == "mma" else 4
        gk = check_case(70, 100, 13, (32, 32), mode, dtype, True, True, split_k, strategy, bm, 16, bt=2, lead=(2,))
        assert gk.spec.upcast == (dtype == torch.bfloat16 and strategy == "mma")

    @triton.jit
    def _prmt_kernel(a_ptr, s_ptr, c_ptr, o_ptr):
        r = tl.arange(0, 256)
        tl.store(o_ptr + r, _prmt_under_test(tl.load(a_ptr + r), tl.load(s_ptr + r), tl.load(c_ptr + r)))  # noqa: F821

    def test_prmt_emulation_matches_the_cpu_model():
        """The interpreter's prmt (plain Triton) against tables.prmt (a numpy model of the instruction)
        on random words and every selector the kernels use."""
        import numpy as np

        from patchc.codegen import tables
        from patchc.codegen.cache import get_kernel
        from patchc.codegen.load import load_module
        from patchc.codegen.spec import KernelSpec
        globals()["_prmt_under_test"] = load_module(get_kernel(KernelSpec(
            n=16, k=32, dtype="bf16", tile=(16, 32), block_n=16, interpret=True)).path)._prmt

        rng = np.random.default_rng(0)
        a, c = (rng.integers(-2**31, 2**31, 256).astype(np.int32) for _ in range(2))
        sel = rng.integers(0, 8, (256, 4))                            # nibbles without the sign bit
        s = (sel[:, 0] | sel[:, 1] << 4 | sel[:, 2] << 8 | sel[:, 3] << 12).astype(np.int32)
        out = torch.empty(256, dtype=torch.int32)
        _prmt_kernel[(1,)](torch.from_numpy(a), torch.from_numpy(s), torch.from_numpy(c), out)
        assert np.array_equal(out.numpy(), tables.prmt(a, s, c))

    def test_entry_dispatches_by_m_and_to_dense(tmp_path, monkeypatch):
        """An entry whose kernels run (kernel "auto" on CUDA; the device check is what this test
        replaces, the interpreter stands in for the GPU): hybrid range -> the kernel, dense range
        -> F.linear with W ⊙ M; kernel "triton" forces the kernel at every M."""
        import patchc
        from patchc import runtime
        from patchc.codegen.runner import HybridRunner
        tm = random_mask(48, 64, (16, 32), "mixed", torch.Generator().manual_seed(3))
        w, b = torch.randn(48, 64), torch.randn(48)
        from patchc.codegen.candidates import Candidate
        ranges = [(8, Candidate("mma", 16, 16, 1, 4, 2, split_k=2).to_dict()), (None, {"strategy": "dense"})]
        e = runtime.entry_for([w], [tm], [False], ["x"], [True])
        e.runner = HybridRunner(48, 64, torch.float32, (16, 32), ranges=ranges, cache_dir=tmp_path,
                                input_precision="ieee")
        monkeypatch.setattr(runtime, "uses_kernels", lambda entry, device: True)
        ref = lambda x: F.linear(x.double(), w.double() * tm.mask, b.double())  # noqa: E731
        patchc.counters.reset()
        for m, path in ((5, "triton_calls"), (20, "dense_dispatch_calls")):
            x = torch.randn(m, 64)
            before = patchc.counters[path]
            assert torch.allclose(e.run(x, [w], [b]).double(), ref(x), atol=1e-4)
            assert patchc.counters[path] == before + 1
        e.kernel = "triton"                                            # forced: Triton at every M
        before = patchc.counters["triton_calls"]
        x = torch.randn(20, 64)
        assert torch.allclose(e.run(x, [w], [b]).double(), ref(x), atol=1e-4)
        assert patchc.counters["triton_calls"] == before + 1

    @pytest.mark.parametrize("strategy", ["gemv", "mma"])
    def test_empty_input(strategy):
        check_case(32, 32, 0, (16, 16), "mixed", torch.float32, True, False, 1, strategy, 16 if strategy == "mma" else 1)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_backend_kernel_triton_tiny_llama(dtype, tmp_path):
        """torch.compile(kernel="triton") on CPU: every site rewritten, run by the generated kernels."""
        import patchc
        from patchc.prune import magnitude_hybrid
        from conftest import masked_reference, tiny_llama
        model = tiny_llama().to(dtype)
        plan = magnitude_hybrid(model, 0.35, (16, 32))
        compiled = torch.compile(model, backend="patch",
                                 options={"plan": plan, "kernel": "triton", "inner": "eager", "cache_dir": str(tmp_path)})
        ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            y = compiled(ids).logits
            ref = masked_reference(model, plan)(ids).logits
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype], err
        assert patchc.counters["sites_rewritten"] == len(plan) == 14
        assert patchc.counters["triton_calls"] == patchc.counters["linear_calls"] == 14
        assert patchc.counters["reference_calls"] == 0
        ks = patchc.kernels(compiled)
        assert ks and all(k.path.is_file() and "@triton.jit" in k.source for k in ks)
        assert all(str(k.path).startswith(str(tmp_path)) and k.spec.interpret for k in ks)
        decisions = [d for d in patchc.explain(compiled).decisions if d.action == "hybrid"]
        assert len(decisions) == 14 and all(d.kernel in {k.name for k in ks} for d in decisions)
