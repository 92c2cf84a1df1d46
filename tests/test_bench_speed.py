"""Smoke tests of the speed / memory benchmarks (``patchc bench``) on tiny configs, and of the fast
paths they made (numpy packing and unpacking, ``holds_masked``, ``TileMask`` statistics)."""
import json
import random

import pytest
import torch

from patchc import packing
from patchc.cli import main as patchc_main
from patchc.cliutil import packed_bytes_table
from patchc.packing import balanced_row_order, pack, unpack
from patchc.prune import mask24_from_scores
from patchc.runtime import holds_masked
from patchc.types import TileMask, expand_tiles, sparse_allowed


def _random_case(g, rng):
    tn, tk = rng.choice([1, 3, 8, 16]), rng.choice([4, 8, 12, 32, 36])
    n, k = rng.randint(1, 3 * tn + 2), rng.randint(1, 3 * tk + 5)
    allowed = sparse_allowed((tn, tk), (n, k))
    kind = ((torch.rand(allowed.shape, generator=g) < rng.random()) & allowed).to(torch.uint8)
    tm = TileMask.from_kinds((tn, tk), kind, mask24_from_scores(torch.rand(n, k, generator=g)))
    return torch.randn(n, k, generator=g), tm


def _torch_path(fn, *a):
    """Run ``fn`` with the numpy fast paths off (the torch code that GPUs use)."""
    saved, packing.SAME_SIZE_INT = packing.SAME_SIZE_INT, {}
    try:
        return fn(*a)
    finally:
        packing.SAME_SIZE_INT = saved


def test_numpy_pack_and_unpack_match_the_torch_path():
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    for _ in range(60):
        w, tm = _random_case(g, rng)
        w = w.to(rng.choice([torch.float32, torch.bfloat16, torch.float16]))
        order = balanced_row_order(tm.tile_kind) if rng.random() < 0.5 else None
        a, b = pack(w, tm, order), _torch_path(pack, w, tm, order)
        for key, t in a.buffers().items():
            u = b.buffers()[key]
            assert t.dtype == u.dtype and t.shape == u.shape and torch.equal(t, u), key
        assert torch.equal(unpack(a), _torch_path(unpack, a))
        assert torch.equal(unpack(a), w * tm.mask.to(w.dtype))


def test_holds_masked():
    torch.manual_seed(0)
    w = torch.randn(300, 64)
    m = mask24_from_scores(w.abs())
    assert not holds_masked(w, m)
    assert holds_masked(w * m, m)
    assert holds_masked(-(w.abs()) * m, m)                 # -0.0 counts as zero
    assert holds_masked((w * m).bfloat16(), m)
    bad = w * m
    bad[299, int((~m[299]).nonzero()[0])] = 1e-30          # one survivor in the last block
    assert not holds_masked(bad, m)
    assert not holds_masked(torch.where(m, w, float("nan")), m)
    wt = (w * m).t().contiguous()                           # (in, out) storage seen as (out, in)
    assert holds_masked(wt.t(), m)


def test_tilemask_statistics_match_the_bool_mask():
    g, rng = torch.Generator().manual_seed(1), random.Random(1)
    for _ in range(150):
        _, t = _random_case(g, rng)
        per = expand_tiles(t.tile_kind, t.tile, t.shape)
        assert t.fraction_sparse_tiles() == pytest.approx(float(per.double().mean()) if per.numel() else 0.0)
        assert t.pruned() == int(t.mask.numel() - t.mask.sum())


def test_release_dense_reference_path_keeps_no_dense_copy():
    import patchc
    from conftest import masked_reference, tiny_llama
    from patchc.prune import magnitude_hybrid
    model = tiny_llama()
    plan = magnitude_hybrid(model, 0.35, (32, 32))
    ref = masked_reference(model, plan)
    compiled = patchc.compile(model, plan, inner="eager", release_dense=True)
    ids = torch.randint(0, 256, (1, 5))
    with torch.inference_mode():
        y = compiled(ids).logits
    torch.testing.assert_close(y.double(), ref(ids).logits, atol=1e-4, rtol=1e-4)
    rows = patchc.memory_report(compiled)["entries"]
    released = [r for r in rows if r["released"]]
    assert released and all(r["masked_copy_bytes"] == 0 and r["packed_bytes"] for r in released)


# ---- the benchmarks --------------------------------------------------------------------------
def test_bench_cli_help(capsys):
    for argv in (["bench", "--help"], ["bench", "compile-time", "--help"], ["bench", "memory", "--help"],
                 ["bench", "e2e-decode", "--help"]):
        with pytest.raises(SystemExit) as ei:
            patchc_main(argv)
        assert ei.value.code == 0
    out = capsys.readouterr().out
    for name in ("compile-time", "memory", "e2e-decode", "--quick", "--layers", "--tiny", "--budget"):
        assert name in out


def test_compile_time_measure_and_report(tmp_path, monkeypatch):
    from bench import compile_time as ct
    from bench import memory
    from patchc.passes.plan_cache import PLANS
    monkeypatch.setenv("PATCHC_CACHE_DIR", str(tmp_path / "cache"))       # cold: no cost-model plans on disk
    PLANS.clear()
    model = ct.build_model(ct.TINY, "fp32")
    plan_path = str(tmp_path / "plan.safetensors")
    memory.plans_at(model, [0.35], (32, 32))[0.35].save(plan_path)
    base = {"model": ct.TINY, "dtype": "fp32", "seq": 8, "plan": plan_path, "inner": "eager"}
    runs = []
    for backend in ("eager", "patch"):
        torch._dynamo.reset()
        for phase in ("cold", "warm"):
            runs.append(ct.measure({**base, "backend": backend, "phase": phase}))
    torch._dynamo.reset()
    p = runs[2]
    assert p["decisions"]["hybrid"] == 14 and p["finite"]
    assert p["split"]["cost model"] > 0
    # on CPU the compile packs nothing (the reference path reads the weights); the bench packs after:
    # 4 fused groups (q/k/v, gate/up x 2 layers) + o_proj, down_proj x 2
    assert p["split"]["packing"] == 0 and p["pack_dense_bytes"] == 0
    assert p["pack_all"]["weights"] == 4 + 4 and p["pack_all"]["packed_bytes"] < p["pack_all"]["dense_bytes"]
    assert p["split"]["reference weight"] > 0                # eager inner on CPU: the reference path ran
    assert list((tmp_path / "cache" / "plans").glob("*.json"))   # the next process reads its plans
    assert p["split"]["total"] == pytest.approx(sum(v for k, v in p["split"].items() if k not in ("total", "render")))
    result = {"env": ct.env_info(), "model": ct.TINY, "dtype": "fp32", "seq": 8, "sparsity": 0.35, "tile": [32, 32],
              "inner": "eager", "baseline": "eager", "runs": runs, "wall_s": 1.0, "command": "x",
              "plan": {"params": 1, "planned_params": 1, "linears": 14, "sparsity": 0.35, "frac_sparse_min": 0.5,
                       "frac_sparse_max": 0.9, "without_24_tiles": 0}}
    from bench.compile_time_report import render_markdown, summarize
    result["summary"] = summarize(result)
    md = render_markdown(result)
    line = next(ln for ln in md.splitlines() if ln.startswith("overhead: "))
    assert line == f"overhead: {round(result['summary']['overhead_pct']) + 0} %"
    assert "packing" in md and "cost model" in md and "GB/s" in md


def test_memory_bytes_formula_matches_packing():
    from bench import compile_time as ct
    from bench import memory
    out = memory.measure_bytes({"model": ct.TINY, "dtype": "fp32", "tile": [32, 32], "targets": [0.25, 0.45]})
    assert len(out["rows"]) == 4
    for r in out["rows"]:
        # `patchc inspect`'s formula is the packed buffers minus the index arrays, exactly
        assert r["linear_packed_formula"] + r["index_bytes"] == r["linear_packed_actual"]
        saved = 0.4375 if r["dtype"] == "bf16" else 0.46875
        assert r["linear_packed_formula"] == pytest.approx(r["linear_dense"] * (1 - saved * r["frac_sparse"]))
        assert r["model_packed"] < r["model_dense"]
    md = memory.render_markdown({"env": ct.env_info(), "model": ct.TINY, "dtype": "fp32", "tile": [32, 32],
                                 "seq": 8, "inner": "eager", "bytes": out, "rss": [], "wall_s": 1.0})
    assert "| 25% |" in md and "| 45% |" in md


def test_packed_bytes_table_counts_ragged_tiles_as_packed():
    torch.manual_seed(0)
    w = torch.randn(70, 100)
    kind = sparse_allowed((32, 32), (70, 100)).to(torch.uint8)
    tm = TileMask.from_kinds((32, 32), kind, mask24_from_scores(w.abs()))
    p = pack(w, tm)
    formula, dense = packed_bytes_table({"x": tm}, torch.float32)
    assert formula == p.nbytes() and dense == 70 * 100 * 4


def test_memory_rss_release_frees_parameters():
    from bench import compile_time as ct
    from bench import memory
    import tempfile
    model = ct.build_model(ct.TINY, "fp32")
    with tempfile.TemporaryDirectory() as d:
        path = memory.plans_at(model, [0.35], (32, 32))[0.35].save(f"{d}/p.safetensors")
        torch._dynamo.reset()
        r = memory.measure_rss({"model": ct.TINY, "dtype": "fp32", "seq": 8, "mode": "release", "plan": path,
                                "inner": "eager"})
    torch._dynamo.reset()
    assert r["param_bytes_after"] < r["param_bytes_before"] and r["packed"] > 0
    assert r["reference_copies"] == 0 and r["steps"]["first forward"] > 0


def test_e2e_step_bytes_bound():
    from bench.e2e_decode import LLAMA7B, step_bytes
    lin = [(4096 * 4096, 0.0)] * 4 + [(11008 * 4096, 0.0)] * 3
    dense = step_bytes(LLAMA7B | {"layers": 1}, 1, 256, lin)
    sparse = step_bytes(LLAMA7B | {"layers": 1}, 1, 256, [(n, 1.0) for n, _ in lin])
    assert dense["linears"] == sum(n for n, _ in lin) * 2
    assert sparse["linears"] == pytest.approx(dense["linears"] * 0.5625)
    assert dense["kv_cache"] == 2 * 4096 * 257 * 2 and sparse["frac24"] == 1.0


@pytest.mark.parametrize("impl,batches,variants", [
    ("native", "1,2", "inductor-cg,patch-cg@,patch@0.45"),
    ("hf", "2", "inductor-cg,patch-cg@0.35"),
])
def test_e2e_decode_cpu_tiny(tmp_path, impl, batches, variants):
    from bench import e2e_decode
    rc = e2e_decode.main(["--device", "cpu", "--tiny", "--compiler", "eager", "--impl", impl, "--batches", batches,
                          "--variants", variants, "--sparsities", "0.25,0.45", "--gen", "3", "--repeats", "1",
                          "--warmup", "1", "--out", str(tmp_path)])
    torch._dynamo.reset()
    assert rc == 0
    res = json.loads((tmp_path / "e2e_decode.json").read_text())
    assert res["impl"] == impl and not res["stopped"]
    rows = res["rows"]
    assert all(not r.get("error") for r in rows), [r.get("error") for r in rows]
    assert all(r["tokens_per_s"] > 0 and r["bound_tokens_per_s"] > 0 for r in rows)
    patch = [r for r in rows if r["variant"].startswith("patch")]
    assert patch and all(r["hybrid_sites"] == 14 and r["frac24"] > 0 for r in patch)
    assert res["memory"]["released_packed_mb"] < res["memory"]["released_dense_mb"]
    assert "tokens/s" in (tmp_path / "e2e_decode.md").read_text()
