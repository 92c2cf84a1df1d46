"""M dispatch end to end: the plan's thresholds, the runner that follows them, one graph for every M.

The dynamic-batch test runs in a child process with ``TRITON_INTERPRET=1`` (Triton must be
imported with it set): a 4096 -> 2048 fp16 linear whose tile map is all 2:4 with 128x128 tiles,
planned for an H200 by the real cost model -- hybrid up to M = 32, dense beyond (asserted here
first, so a change of the model shows up as such; the interpreter runs its 16 x 32 tiles at M = 2
in seconds).  It is compiled once with a dynamic batch dimension (``mark_dynamic``) and
``kernel="auto"``, the child standing in for a GPU placement (``runtime.uses_kernels`` answers
yes, as it does for a CUDA weight; the interpreter runs the kernels).  M = 2 must run the
interpreted kernel and M = 512 the dense dispatch, through the same graph.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from patchc.codegen.layout import DENSE, HybridCandidate, candidate_us, plan_dispatch
from patchc.codegen.runner import HybridRunner

SHAPE, TILE, DTYPE = (2048, 4096), (128, 128), torch.float16


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch):
    monkeypatch.delenv("PATCHC_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def all_24(n, k, tile):
    from patchc.types import TileMask
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    mask[..., 1::2] = True
    return TileMask(tile, torch.ones(n // tile[0], k // tile[1], dtype=torch.uint8), mask.reshape(n, k))


def test_plan_of_the_dynamic_case_is_hybrid_then_dense():
    plan = plan_dispatch(all_24(*SHAPE, TILE), DTYPE, "h200")
    assert isinstance(plan.select(2), HybridCandidate) and plan.select(512) == DENSE
    assert 2 < plan.thresholds[0] <= 512


@pytest.mark.parametrize("dtype,m_max", [("bf16", 65536), ("fp16", 4096)])
def test_runner_dispatch_follows_the_thresholds(dtype, m_max):
    """The runner built from a plan picks, at every M of a grid, the plan's candidate -- which is
    the cheapest one there by the model's own per-M costs."""
    tm = all_24(4096, 4096, (128, 128))
    plan = plan_dispatch(tm, dtype, "h200", m_max=m_max)
    runner = HybridRunner.from_plan(4096, 4096, dtype, (128, 128), plan)
    cands = plan.candidates
    grid = {1, 2, 3, 16, 17, 100, 511, 512, 513, m_max} | {t + d for t in plan.thresholds for d in (-1, 0, 1)}
    ms = np.array(sorted(m for m in grid if 1 <= m <= m_max))
    costs = np.stack([candidate_us(tm, ms, c, dtype, "h200") for c in cands], axis=1)
    for m, row in zip(ms, costs):
        c = plan.select(int(m))
        assert row[cands.index(c)] == row.min(), (m, c)
        params = runner.ranges[runner.index(int(m))][1]
        assert (params == {"strategy": "dense"}) == (c == DENSE), (m, c, params)
        if c != DENSE:
            assert {k: params[k] for k in c.to_dict()} == c.to_dict()


CHILD = textwrap.dedent("""
    import json, os, sys, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    import patchc
    from patchc import runtime
    from patchc.plan import MaskPlan
    from patchc.types import TileMask
    torch.cuda.is_available = lambda: False
    runtime.uses_kernels = lambda entry, device: True     # a GPU placement; the interpreter runs the kernels
    (N, K), TILE, DTYPE = {shape}, {tile}, torch.{dtype}
    SHAPE = (N, K)
    keep = torch.zeros(N, K // 4, 4, dtype=torch.bool)
    keep[..., 1::2] = True
    tm = TileMask(TILE, torch.ones(N // TILE[0], K // TILE[1], dtype=torch.uint8), keep.reshape(N, K))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(K, N)).eval().to(DTYPE)
    plan = MaskPlan({{"0": tm}})
    ref = torch.nn.Linear(SHAPE[1], SHAPE[0]).double()
    with torch.no_grad():
        ref.weight.copy_(model[0].weight.double() * tm.mask)
        ref.bias.copy_(model[0].bias.double())
    compiled = torch.compile(model, backend="patch", options={{"plan": plan, "inner": "eager",
                                                               "device": "h200", "fusion": False}})
    out = {{"calls": []}}
    with torch.inference_mode():
        for m in (2, 512, 3):
            x = torch.randn(m, SHAPE[1], generator=torch.Generator().manual_seed(m)).to(DTYPE)
            torch._dynamo.mark_dynamic(x, 0)
            before = dict(patchc.counters)
            y = compiled(x)
            err = ((y.double() - ref(x.double())).abs().max() / ref(x.double()).abs().max()).item()
            after = dict(patchc.counters)
            out["calls"].append({{"m": m, "err": err, "delta": {{k: after.get(k, 0) - before.get(k, 0) for k in after}}}})
    from torch._dynamo.utils import counters as dyn
    from patchc.backend import records
    out["unique_graphs"] = dyn["stats"]["unique_graphs"]
    out["backend_calls"] = len(records())
    out["decisions"] = [(d.action, d.layout["summary"]) for d in patchc.explain(compiled).decisions]
    print("RESULT" + json.dumps(out))
""")


def test_dynamic_batch_one_graph_both_branches(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PATCHC_CACHE_DIR": str(tmp_path / "kernels")}
    env.pop("PATCHC_DEVICE", None)
    child = CHILD.format(shape=SHAPE, tile=TILE, dtype=str(DTYPE).replace("torch.", ""))
    r = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    assert out["unique_graphs"] == 1 and out["backend_calls"] == 1            # M = 2, 512, 3: no recompile
    (first, big, small) = out["calls"]
    assert all(c["err"] < 2e-2 for c in out["calls"]), out["calls"]
    assert first["delta"].get("triton_calls") == 1                           # M = 2: the generated kernel
    assert big["delta"].get("dense_dispatch_calls") == 1 and not big["delta"].get("triton_calls")
    assert small["delta"].get("triton_calls") == 1 and not small["delta"].get("dense_dispatch_calls")
    [(action, summary)] = out["decisions"]
    assert action == "hybrid" and summary.startswith("M<=32 hybrid") and summary.endswith("; else dense")


# ---- the choose_layouts pass ---------------------------------------------------------------------
def _mlp_compile(monkeypatch=None, **opts):
    import patchc
    from conftest import MLP
    from patchc.prune import magnitude_hybrid
    torch.manual_seed(0)
    model = MLP().eval()
    plan = magnitude_hybrid(model, 0.4, (16, 16))
    compiled = torch.compile(model, backend="patch", options={"plan": plan, "inner": "eager", **opts})
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y = compiled(x)
    from conftest import masked_reference
    want = masked_reference(model, plan)(x.double())
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-5
    return patchc.explain(compiled)


def test_which_calls_run_generated_kernels():
    """The rule the cost model's dense decision and every call's path follow: generated kernels run
    for kernel="triton" everywhere and for "auto" on CUDA (a torch.device needs no GPU)."""
    from types import SimpleNamespace
    from patchc import runtime
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for kernel, on_cuda, on_cpu in (("auto", True, False), ("triton", True, True), ("reference", False, False)):
        e = SimpleNamespace(kernel=kernel, released=False)
        assert runtime.uses_kernels(e, cuda) == on_cuda and runtime.uses_kernels(e, cpu) == on_cpu, kernel
        assert runtime.needs_packing(e, cuda) == on_cuda
    assert runtime.needs_packing(SimpleNamespace(kernel="reference", released=True), cpu)


def test_dense_everywhere_site_becomes_dense_only_where_kernels_run(monkeypatch):
    """A tiny weight: the planner (H200) finds dense faster at every M.  On CPU with kernel="auto"
    (no kernel runs) or a kernel the user forced, the site stays hybrid and says what the plan is;
    placed where kernels run (a CUDA weight: the placement is what this test simulates, no GPU
    here) it becomes dense and computes F.linear with W ⊙ M, no kernel generated for it."""
    import patchc
    from patchc import runtime
    rep = _mlp_compile()
    assert [d.action for d in rep.decisions] == ["hybrid", "hybrid"]
    assert all(d.layout["summary"] == "dense at every M" and d.layout["thresholds"] == [] for d in rep.decisions)
    assert "[dense at every M]" in str(rep)
    monkeypatch.setattr(runtime, "uses_kernels", lambda entry, device: entry.kernel in ("auto", "triton"))
    torch._dynamo.reset()
    patchc.counters.reset()
    rep = _mlp_compile()
    assert [d.action for d in rep.decisions] == ["dense", "dense"]
    assert all(d.reason == "cost model: dense is faster at every M <= m_max" for d in rep.decisions)
    # no kernel is generated for them: F.linear with W ⊙ M on every call
    assert patchc.counters["reference_calls"] == 2 and patchc.counters["triton_calls"] == 0
    torch._dynamo.reset()
    rep = _mlp_compile(kernel="reference")                  # the user asked for the kernel path
    assert [d.action for d in rep.decisions] == ["hybrid", "hybrid"]


def test_planning_device_precedence(monkeypatch):
    """device= option > the current CUDA device > $PATCHC_DEVICE > h200."""
    from types import SimpleNamespace
    from patchc.passes.plan_cache import plan_for
    tm = all_24(1024, 1024, (128, 128))
    assert plan_for(tm, torch.bfloat16, None, 4096).device == "h200"
    monkeypatch.setenv("PATCHC_DEVICE", "a100")
    assert plan_for(tm, torch.bfloat16, None, 4096).device == "a100"
    assert plan_for(tm, torch.bfloat16, "l40s", 4096).device == "l40s"
    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                            L2_cache_size=50 * 2**20)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    assert plan_for(tm, torch.bfloat16, None, 4096).device == "h100"          # the GPU beats the env var
    assert plan_for(tm, torch.bfloat16, "l40s", 4096).device == "l40s"        # the option beats the GPU


def test_plans_are_cached_on_disk_across_processes(tmp_path, monkeypatch):
    """A second process (simulated: the memo emptied) reads the plan from <cache_dir>/plans instead
    of running the cost model; the entry round-trips exactly; a corrupt entry is recomputed; a
    change of the cost model's sources (its hash) misses."""
    import patchc.codegen.layout as layout
    from patchc.passes import plan_cache
    tm = all_24(1024, 1024, (128, 128))
    plan_cache.PLANS.clear()                              # earlier tests may have planned it
    first = plan_cache.plan_for(tm, torch.bfloat16, "h200", 4096, tmp_path)
    files = list((tmp_path / "plans").glob("*.json"))
    assert len(files) == 1
    plan_cache.PLANS.clear()
    monkeypatch.setattr(layout, "plan_dispatch", lambda *a, **k: pytest.fail("ran the cost model on a cached plan"))
    again = plan_cache.plan_for(tm, torch.bfloat16, "h200", 4096, tmp_path)
    assert again.to_dict() == first.to_dict() and torch.equal(again.row_order, first.row_order)
    assert again.ranges == first.ranges and again.select(1) == first.select(1)
    monkeypatch.setattr(layout, "plan_dispatch", plan_dispatch)
    key = plan_cache.plan_key(tm, torch.bfloat16, "h200", 4096)
    name = plan_cache.disk_key(key)
    assert files[0].name == f"{name}.json"
    for bad in (b"{not json", json.dumps({"key": "someone else's", "value": {}}).encode(),
                json.dumps({"key": name, "value": {"plan": {"ranges": 3}}}).encode()):       # right key, bad body
        files[0].write_bytes(bad)
        plan_cache.PLANS.clear()
        assert plan_cache.plan_for(tm, torch.bfloat16, "h200", 4096, tmp_path).to_dict() == first.to_dict()
        assert json.loads(files[0].read_text())["value"]["plan"] == first.to_dict()       # rewritten
    plan_cache.model_hash.cache_clear()
    monkeypatch.setattr(plan_cache, "model_hash", lambda: "edited")
    assert plan_cache.disk_key(key) != name
    assert plan_cache.disk_key(plan_cache.plan_key(tm, torch.float16, "h200", 4096)) != name
