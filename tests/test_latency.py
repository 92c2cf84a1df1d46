"""Latency-aware learning: the cost model's decode savings per layer, and a density penalty
weighted by them moves the budget to the layers that pay."""
from types import SimpleNamespace

import pytest
import torch

from patchc.latency import density_weights, layer_savings, plan_decode_speedup
from patchc.learn import LearnConfig, learn_masks
from test_learn_helpers import TILE, calib_batches, single_thread, trained_llama  # noqa: F401

BIG, SMALL = (4096, 4096), (576, 576)


def _map(shape, frac):
    nN, nK = shape[0] // 128, -(-shape[1] // 128)
    kind = torch.zeros(nN, nK, dtype=torch.uint8)
    kind.view(-1)[: round(frac * kind.numel())] = 1
    return SimpleNamespace(tile_kind=kind, tile=(128, 128), shape=shape)


def test_decode_speedup_per_layer_and_whole():
    plan = {"big": _map(BIG, 1.0), "half": _map(BIG, 0.5), "small": _map(SMALL, 1.0), "dense": _map(BIG, 0.0)}
    r = plan_decode_speedup(plan)
    per = r["per_layer"]
    assert 1.3 < per["big"]["speedup"] <= 1 / (1 - 0.4375) and per["dense"]["speedup"] == 1.0
    assert 1.0 < per["half"]["speedup"] < per["big"]["speedup"]
    # a 576 x 576 weight is bound by fixed costs on the H200: the backend keeps it dense at M = 1
    assert per["small"]["speedup"] == 1.0
    assert r["speedup"] == pytest.approx(r["dense_us"] / r["planned_us"]) and 1.0 < r["speedup"] < per["big"]["speedup"]


def test_density_weights_follow_the_savings():
    shapes = {"big": BIG, "small": SMALL}
    save = layer_savings(shapes)
    assert save["big"] > 0 and save["small"] == 0
    w = density_weights(shapes)
    n = {k: s[0] * s[1] for k, s in shapes.items()}
    assert sum(w[k] * n[k] for k in w) / sum(n.values()) == pytest.approx(1.0) and w["small"] == 0
    with pytest.raises(ValueError, match="no decode saving for any layer"):
        density_weights({"small": SMALL})
    with pytest.raises(ValueError, match="unknown device"):
        density_weights(shapes, device="h900")


def test_weighted_penalty_moves_the_budget():
    data = calib_batches(n=16)
    kw = dict(mode="tile", target_sparsity=0.25, tile=TILE, steps=40, lr=0.02, progress=False, calib_batches=4)
    model = trained_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    attn = {n: (4.0 if "self_attn" in n else 0.0) for n in names}
    by_count = learn_masks(model, data, LearnConfig(**kw))
    weighted = learn_masks(model, data, LearnConfig(density_weights=attn, **kw))

    def attn_share(plan):
        pruned = {n: plan[n].pruned() for n in plan}
        return sum(v for n, v in pruned.items() if "self_attn" in n) / sum(pruned.values())
    assert weighted.meta["budget"] == "weighted" and by_count.meta["budget"] == "count"
    assert abs(weighted.sparsity() - 0.25) <= 0.01
    assert attn_share(weighted) > attn_share(by_count) + 0.05, (attn_share(weighted), attn_share(by_count))


def test_density_weights_checked():
    with pytest.raises(ValueError, match="finite and >= 0"):
        LearnConfig(density_weights={"a": -1.0})
    with pytest.raises(ValueError, match="all 0"):
        LearnConfig(density_weights={"a": 0.0})
    model = trained_llama()
    with pytest.raises(ValueError, match="name exactly the learned linears"):
        learn_masks(model, calib_batches(n=4), LearnConfig(density_weights={"x": 1.0}, tile=TILE, steps=1,
                                                           progress=False))
