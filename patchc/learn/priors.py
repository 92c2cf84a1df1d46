"""Where the logits start: a one-shot pruning of the frozen weights.

Tile logits: each tile's density in an unstructured one-shot pruning of its layer (at
``prior_sparsity``), centred so that the step-0 ranking already meets the target and scaled to
``prior_strength`` noise units per standard deviation.  2:4 logits (joint mode): one-hot on the
pattern of the one-shot 2:4 mask, ``pattern_prior_strength`` noise units above the other five.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..modules import oriented_weight
from ..prune import tile_sizes
from ..types import grid_of, sparse_allowed
from .masking import pattern_index
from .pruners import prune_layers, tile_density
from .state import MaskState


def compute_priors(model: nn.Module, mods: dict[str, nn.Module], batches, cfg, device=None,
                   progress: bool = False) -> dict[str, dict]:
    """Per linear: ``{"pattern24": uint8 [N, K//4], "density": float64 [nN, nK]}`` from ``cfg.prior``:
    the 2:4 pattern index of every group of the one-shot 2:4 mask, and each tile's density in
    the unstructured one (``prior_sparsity``).  Streams: one layer's masks are alive at a time."""
    calib = batches[: cfg.calib_batches] if cfg.prior != "magnitude" else None

    def keep(name, r):
        return {"pattern24": pattern_index(r["2:4"]).to(torch.uint8),
                "density": tile_density(r["unstructured"], cfg.tile)}
    return prune_layers(model, mods, calib, cfg.prior, ["2:4", "unstructured"], cfg.prior_sparsity,
                        sequential=cfg.prior_sequential, device=device, keep=keep, progress=progress)


def plan_patterns(path: str, shapes: dict[str, tuple]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{linear: (pattern index uint8 [N, K//4], taken bool [N, K//4])}`` from the plan file at
    ``path`` (:attr:`LearnConfig.pattern_plan`): ``taken`` marks the groups where the plan keeps
    exactly 2 of 4 (its 2:4 tiles), whose pattern is then used.  Raises ``ValueError`` naming the
    file and the layer when the plan lacks a learned linear or has another shape for it."""
    from ..plan import MaskPlan
    plan = MaskPlan.load(path)
    out = {}
    for name, shape in shapes.items():
        if name not in plan:
            raise ValueError(f"LearnConfig.pattern_plan {path}: no mask for the learned linear {name} "
                             f"(the plan covers {len(plan)} layers, e.g. {sorted(plan)[:2]})")
        if tuple(plan[name].shape) != tuple(shape):
            raise ValueError(f"LearnConfig.pattern_plan {path}: {name} is {tuple(plan[name].shape)} in the plan, "
                             f"{tuple(shape)} in the model")
        n, k = shape
        g = plan[name].mask[:, : k // 4 * 4].reshape(n, k // 4, 4)
        taken = g.sum(-1) == 2
        idx = torch.zeros(n, k // 4, dtype=torch.uint8)
        if taken.any():
            idx[taken] = pattern_index(g[taken].reshape(-1, 4)).reshape(-1).to(torch.uint8)
        out[name] = (idx, taken)
    return out


def centred_tile_logits(density: dict[str, torch.Tensor], sizes: dict[str, torch.Tensor],
                        allowed: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
    """(d − c)/σ per tile, c chosen so that the tiles below it (parameter-weighted, 2:4 prunes
    half of a tile) prune ``target`` of all planned weights, σ the weighted std of d."""
    names = list(density)
    d = torch.cat([density[n].flatten() for n in names]).double()
    s = torch.cat([sizes[n].flatten() for n in names]).double()
    ok = torch.cat([allowed[n].flatten() for n in names])
    total = float(s.sum())
    da, sa = d[ok], s[ok]
    if da.numel() == 0:
        return {n: torch.zeros_like(density[n], dtype=torch.float32) for n in names}
    mean = float((da * sa).sum() / sa.sum())
    sigma = math.sqrt(float(((da - mean) ** 2 * sa).sum() / sa.sum())) or 1.0
    order = torch.argsort(da, stable=True)
    cum = torch.cumsum(sa[order] / 2, 0)
    n_sel = int((cum <= target * total + 1e-9).sum())
    sd = da[order]
    if n_sel == 0:
        c = float(sd[0]) - sigma
    elif n_sel == sd.numel():
        c = float(sd[-1]) + sigma
    else:
        c = 0.5 * float(sd[n_sel - 1] + sd[n_sel])
    return {n: ((density[n].double() - c) / sigma).float() for n in names}


def build_states(mods: dict[str, nn.Module], priors: dict[str, dict], cfg) -> dict[str, MaskState]:
    """The learnable state of every planned linear, initialised from the priors."""
    shapes = {n: tuple(oriented_weight(m).shape) for n, m in mods.items()}
    sizes = {n: tile_sizes(shapes[n], cfg.tile) for n in mods}
    allowed = {n: sparse_allowed(cfg.tile, shapes[n]) for n in mods}
    centred = centred_tile_logits({n: priors[n]["density"] for n in mods}, sizes, allowed, cfg.target_sparsity)
    states = {}
    for name, mod in mods.items():
        # logits live in "s" units; the forward multiplies by κ, so divide by κ at step 0
        tile_logits = cfg.prior_strength * centred[name] / cfg.tile_kappa[0]
        pattern_logits = None
        idx = priors[name]["pattern24"]
        if cfg.mode == "joint":
            onehot = torch.nn.functional.one_hot(idx.long(), 6).permute(2, 0, 1).float()     # [6, N, K/4]
            pattern_logits = onehot * (cfg.pattern_prior_strength / cfg.kappa_24[0])
            del onehot
        states[name] = MaskState(name, mod, cfg.tile, cfg.mode, tile_logits, pattern_logits, idx, cfg.state_dtype,
                                 keep_w24=not cfg.recompute_masks)
    return states


def broadcast_priors(priors: dict[str, dict], shapes: dict[str, tuple], tile, dist) -> dict[str, dict]:
    """Every rank takes rank 0's priors (ranks that computed them agree already; this makes sure)."""
    if not dist.group:
        return priors
    out = {}
    for name, shape in shapes.items():
        n, k = shape
        mine = priors.get(name) if priors else None
        idx = mine["pattern24"] if mine else torch.zeros(n, k // 4, dtype=torch.uint8)
        den = mine["density"] if mine else torch.zeros(grid_of(shape, tile), dtype=torch.float64)
        dist.broadcast_([idx, den])
        out[name] = {"pattern24": idx, "density": den}
    return out
