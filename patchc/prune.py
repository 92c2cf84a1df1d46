"""One-shot ways to get a plan without learning.

``magnitude_hybrid``: 2:4 by magnitude inside every tile; the tiles whose 2:4 pruning loses the
least (relative squared error) become sparse, across all layers, until the global target is met.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import nn

from .modules import fingerprint, oriented_weight, select_linears
from .plan import MaskPlan
from .tiles import check_tile, tile_sizes  # noqa: F401 (tile_sizes: imported from here by the pruners)
from .types import TileMask, grid_of, sparse_allowed

log = logging.getLogger("patchc")


def check_target(target_sparsity: float) -> float:
    t = float(target_sparsity)
    if not 0.0 <= t <= 0.5:
        raise ValueError(f"target_sparsity must be in [0, 0.5] (a 2:4 tile prunes 50 %), got {target_sparsity!r}")
    return t


def check_tile_fits(name: str, shape, tile) -> None:
    """``patchc.tiles.check_tile`` with the weight's shape: the tile must also fit the weight."""
    check_tile(tile, shape, name)


def mask24_from_scores(score: torch.Tensor) -> torch.Tensor:
    """bool [N, K]: in every group of 4 along K keep the 2 highest scores (a partial last group
    is kept whole; it can only lie in a dense tile)."""
    n, k = score.shape
    k4 = k // 4 * 4
    out = torch.ones(n, k, dtype=torch.bool, device=score.device)
    g = score[:, :k4].reshape(n, k4 // 4, 4)
    top = g.topk(2, dim=-1).indices
    out[:, :k4] = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True).reshape(n, k4)
    return out


def tile_errors(w: torch.Tensor, mask24: torch.Tensor, tile) -> torch.Tensor:
    """Relative squared error ‖W⊙(1−M)‖²/‖W‖² of pruning each tile 2:4 → float [nN, nK]."""
    tn, tk = tile
    nN, nK = grid_of(tuple(w.shape), tile)
    w2 = w.detach().float() ** 2
    lost = torch.zeros(nN * tn, nK * tk, device=w.device)
    tot = torch.zeros_like(lost)
    lost[: w.shape[0], : w.shape[1]] = w2 * (~mask24)
    tot[: w.shape[0], : w.shape[1]] = w2
    lost = lost.view(nN, tn, nK, tk).sum((1, 3))
    tot = tot.view(nN, tn, nK, tk).sum((1, 3))
    return (lost / tot.clamp_min(1e-30)).cpu()


def select_sparse_tiles(costs: dict[str, torch.Tensor], sizes: dict[str, torch.Tensor],
                        allowed: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
    """Globally rank tiles by cost (lowest first) and make tiles 2:4 until the pruned fraction
    reaches ``target`` (the fewest tiles that do, so a plan is never sparser than it must be nor
    below its target; all allowed tiles where the target is out of reach); ``sizes`` are the
    weights per tile (a 2:4 tile prunes half of them)."""
    names = list(costs)
    flat_cost = torch.cat([costs[n].flatten().double() for n in names])
    flat_size = torch.cat([sizes[n].flatten().double() for n in names])
    flat_ok = torch.cat([allowed[n].flatten() for n in names])
    total = float(flat_size.sum())
    flat_cost = torch.where(flat_ok, flat_cost, torch.full_like(flat_cost, float("inf")))
    order = torch.argsort(flat_cost, stable=True)
    order = order[flat_ok[order]]
    pruned = torch.cumsum(flat_size[order] / 2, 0)
    want = target * total
    # the fewest sparse tiles whose pruned count reaches the target (up to rounding)
    cand = torch.cat([torch.zeros(1, dtype=pruned.dtype), pruned])
    n_sel = min(int(torch.searchsorted(cand, want - 1e-9 * max(total, 1.0))), len(cand) - 1)
    if total and abs(float(cand[n_sel]) - want) / total > 0.005:
        log.warning("patchc: the tile grid is too coarse for target sparsity %.4f: the plan has %.4f",
                    target, float(cand[n_sel]) / total)
    chosen = torch.zeros_like(flat_ok)
    chosen[order[:n_sel]] = True
    out, i = {}, 0
    for n in names:
        c = costs[n].numel()
        out[n] = chosen[i:i + c].view_as(costs[n]).to(torch.uint8)
        i += c
    return out


@torch.no_grad()
def magnitude_hybrid(model: nn.Module, target_sparsity: float, tile=(128, 128),
                     include: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None) -> MaskPlan:
    """One-shot hybrid plan: 2:4 by |W| inside each tile; tiles with the smallest relative 2:4
    error become sparse until the global target sparsity is met."""
    target = check_target(target_sparsity)
    tile = check_tile(tile)
    mods = select_linears(model, include, exclude)
    if not mods:
        raise ValueError("magnitude_hybrid: the model has no linear layers to plan "
                         f"(include={include!r}, exclude={exclude!r})")
    m24, costs, sizes, allowed = {}, {}, {}, {}
    for name, m in mods.items():
        w = oriented_weight(m)
        check_tile_fits(name, w.shape, tile)
        m24[name] = mask24_from_scores(w.detach().abs().float()).cpu()
        costs[name] = tile_errors(w, m24[name].to(w.device), tile)
        sizes[name] = tile_sizes(tuple(w.shape), tile)
        allowed[name] = sparse_allowed(tile, tuple(w.shape))
    kinds = select_sparse_tiles(costs, sizes, allowed, target)
    masks = {n: TileMask.from_kinds(tile, kinds[n], m24[n], name=n) for n in mods}
    return MaskPlan(masks, {"tile": list(tile), "method": "magnitude-hybrid", "target_sparsity": target,
                            "fingerprint": fingerprint(model, mods)})

