"""Tile layout choice (codegen/layout.py): pack-time tile order, per-M choice, M dispatch.  CPU only."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patchc
from patchc.codegen.candidates import Candidate
from patchc.codegen.layout import (DENSE, MAX_HYBRID, DispatchPlan, HybridCandidate, TileLayout, candidate_us,
                                   choose_layout, plan_dispatch)
from patchc.packing import ROW, pack, unpack
from patchc.prune import mask24_from_scores
from patchc.types import TileMask


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch):
    monkeypatch.delenv("PATCHC_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def random_tile_mask(n_n, n_k, tile, f, seed):
    """A valid TileMask: a fraction ~f of 2:4 tiles, each group of 4 keeping 2 random weights."""
    g = torch.Generator().manual_seed(seed)
    kind = (torch.rand(n_n, n_k, generator=g) < f).to(torch.uint8)
    n, k = n_n * tile[0], n_k * tile[1]
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask24 = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    return TileMask.from_kinds(tile, kind, mask24).validate()


def all_24(n, k, tile=(128, 128)):
    nn_, nk = n // tile[0], k // tile[1]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    return TileMask(tile, torch.ones(nn_, nk, dtype=torch.uint8), mask.reshape(n, k))


# ---- tile order ----------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(st.integers(1, 12), st.integers(1, 8), st.sampled_from([(16, 32), (32, 32), (32, 64)]),
       st.floats(0, 1), st.integers(0, 2**31))
def test_row_order_is_a_balanced_permutation_and_packs_exactly(n_n, n_k, tile, f, seed):
    tm = random_tile_mask(n_n, n_k, tile, f, seed)
    lay = choose_layout(tm, 1, "fp16", "h200")
    order = lay.row_order
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(n_n))      # bijection
    inv = torch.empty_like(order)
    inv[order.long()] = torch.arange(n_n, dtype=torch.int32)
    assert torch.equal(order[inv.long()], torch.arange(n_n, dtype=torch.int32))          # inverse round trip
    assert torch.equal(plan_dispatch(tm, "fp16", "h200", m_max=256).row_order, order)
    dense_per_row = (tm.tile_kind[order.long()] == 0).sum(1)
    assert (dense_per_row[:-1] >= dense_per_row[1:]).all()                                 # most work first

    w = torch.randn(tm.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = pack(w, tm, row_order=order)
    assert torch.equal(unpack(p), w * tm.mask) and torch.equal(p.row_order, order)
    seen = torch.zeros(n_n, n_k, dtype=torch.int64)
    for i, r in enumerate(order.tolist()):
        n_s = int(p.rows[i, ROW["n_s"]])
        sk, dk = p.kidx[i, :n_s].long(), p.kidx[i, n_s:].long()
        assert (tm.tile_kind[r, sk] == 1).all() and (tm.tile_kind[r, dk] == 0).all()      # 2:4 first, then dense
        seen[r, sk] += 1
        seen[r, dk] += 1
    assert (seen == 1).all()                                                               # every tile once


# ---- choose_layout ---------------------------------------------------------------------------------
def test_choose_layout_fields_and_public_name():
    tm = all_24(4096, 4096)
    lay = patchc.choose_layout(tm, 1, torch.bfloat16)
    assert isinstance(lay, TileLayout) and lay.device == "h200" and lay.dtype == "bf16"
    assert lay.strategy == "hybrid" and lay.predicted_us < lay.dense_us
    assert isinstance(lay.candidate, Candidate) and lay.candidate.strategy in ("gemv", "mma")
    assert 1 < lay.speedup <= lay.bound < 1.78                   # never above the bandwidth bound
    assert lay.breakdown["programs"] >= 132 and lay.breakdown["bound_by"]
    assert lay.alternatives and all(t >= lay.predicted_us for _, t in lay.alternatives)
    assert any(p.get("strategy") == DENSE and t == lay.dense_us for p, t in lay.alternatives)
    same = choose_layout(tm, 1, "bf16", "h200")
    assert (same.predicted_us, same.candidate) == (lay.predicted_us, lay.candidate)
    json.dumps(lay.to_dict())
    big = choose_layout(tm, 2048, "bf16")
    assert big.strategy == "dense" and big.predicted_us == big.dense_us and "slower" in big.reason


def test_no_24_tiles_or_unservable_tile_stays_dense():
    tm = TileMask.dense((1024, 1024), (128, 128))
    plan = plan_dispatch(tm, "bf16", "h200", m_max=1024)
    assert plan.strategy == "dense" and "no 2:4 tiles" in plan.reason and plan.select(1) == DENSE
    odd = random_tile_mask(4, 4, (24, 24), 1.0, 0)         # no power-of-two tile width: no kernel
    lay = choose_layout(odd, 1, "fp16", "h200")
    assert lay.strategy == "dense" and "no generated kernel" in lay.reason


def test_few_24_tiles_fp32_highest_is_dense_everywhere():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        tm = random_tile_mask(8, 8, (128, 128), 0.1, 3)
        plan = plan_dispatch(tm, torch.float32, "h200", m_max=4096)
    finally:
        torch.set_float32_matmul_precision(old)
    assert plan.strategy == "dense" and "every M" in plan.reason and plan.ranges == ((1, 4096, DENSE),)


# ---- M dispatch ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["all24_4096", "mixed_2048x5632"])
def test_dispatch_thresholds_agree_with_per_m_costs(case):
    tm = all_24(4096, 4096) if case == "all24_4096" else random_tile_mask(16, 44, (128, 128), 0.6, 1)
    plan = plan_dispatch(tm, "bf16", "h200")
    assert isinstance(plan, DispatchPlan) and plan.strategy == "hybrid" and plan.m_max == 65536
    lo_hi = [(lo, hi) for lo, hi, _ in plan.ranges]
    assert lo_hi[0][0] == 1 and lo_hi[-1][1] == 65536
    assert all(b[0] == a[1] + 1 for a, b in zip(lo_hi, lo_hi[1:]))                      # sorted, contiguous
    assert all(a[2] != b[2] for a, b in zip(plan.ranges, plan.ranges[1:]))               # merged
    cands = plan.candidates
    assert DENSE in cands and 2 <= len(cands) <= MAX_HYBRID + 1
    assert isinstance(plan.select(1), HybridCandidate) and plan.select(65536) == DENSE
    grid = {1, 2, 7, 16, 17, 33, 64, 100, 128, 129, 256, 1000, 4096, 65536}
    grid |= {t + d for t in plan.thresholds for d in (-1, 0, 1)}
    for m in sorted(g for g in grid if 1 <= g <= 65536):
        costs = {c: candidate_us(tm, m, c, "bf16", "h200") for c in cands}
        assert costs[plan.select(m)] == min(costs.values()), (m, plan.select(m), costs)
    d = plan.to_dict()
    json.dumps(d)
    assert d["thresholds"] == plan.thresholds and len(d["ranges"]) == len(plan.ranges)
    assert plan.dispatch[-1][0] is None and plan.dispatch[0][0] == plan.ranges[0][1]


def test_dispatch_on_every_m_matches_brute_force():
    tm = random_tile_mask(8, 8, (128, 128), 0.8, 5)
    plan = plan_dispatch(tm, "fp16", "h100", m_max=2048)
    cands = plan.candidates
    ms = np.arange(1, 2049)
    cost = np.stack([candidate_us(tm, ms, c, "fp16", "h100") for c in cands], axis=1)
    picked = [cands.index(plan.select(m)) for m in ms]
    assert (cost[ms - 1, picked] == cost.min(1)).all()
    assert [candidate_us(tm, m, c, "fp16", "h100") for m in (1, 700) for c in cands] == cost[[0, 699]].ravel().tolist()


# ---- planning many weights -------------------------------------------------------------------------------
def test_maps_with_the_same_row_counts_share_one_plan():
    """The model reads a tile map through its per-row 2:4 counts (and which kind its last tile-column
    is): permuting the tiles within rows and the rows gives the same plan (its own row order)."""
    tm = random_tile_mask(16, 8, (128, 128), 0.6, 11)
    g = torch.Generator().manual_seed(0)
    kind = tm.tile_kind[torch.randperm(16, generator=g)][:, torch.randperm(8, generator=g)]
    other = TileMask.from_kinds((128, 128), kind, mask24_from_scores(torch.rand(tm.shape, generator=g)))
    a, b = plan_dispatch(tm, "bf16", "h200", m_max=8192), plan_dispatch(other, "bf16", "h200", m_max=8192)
    assert a.ranges == b.ranges
    assert torch.equal(b.row_order, patchc.packing.balanced_row_order(kind))


def test_planning_a_new_map_is_fast():
    """Planning runs once per weight at compile time: a new 11008x4096 tile map in well under 0.1 s
    (typically ~20 ms here)."""
    import time
    maps = [tile_map((torch.rand(86, 32, generator=torch.Generator().manual_seed(s)) < 0.7)) for s in range(4)]
    plan_dispatch(maps[0], "bf16", "h200")                                      # warm: counts, shape
    t = time.perf_counter()
    for tm in maps[1:]:
        plan_dispatch(tm, "bf16", "h200")
    assert (time.perf_counter() - t) / 3 < 0.1


def tile_map(kind, tile=(128, 128)):
    """A tile map without a mask (what the planner reads)."""
    from types import SimpleNamespace
    kind = torch.as_tensor(kind, dtype=torch.uint8)
    return SimpleNamespace(tile=tile, tile_kind=kind, shape=(kind.shape[0] * tile[0], kind.shape[1] * tile[1]))
