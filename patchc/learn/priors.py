"""Where the logits start: a one-shot pruning of the frozen weights.

Tile logits: each tile's density in an unstructured one-shot pruning of its layer (at
``prior_sparsity``), centred so that the step-0 ranking already meets the target and scaled to
``prior_strength`` noise units per standard deviation.  2:4 logits (joint mode): one-hot on the
pattern of the one-shot 2:4 mask, ``prior_strength`` noise units above the other five.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..modules import oriented_weight
from ..prune import tile_sizes
from ..types import sparse_allowed
from .masking import LayerMask, pattern_index
from .pruners import method_masks, tile_density


def compute_priors(model: nn.Module, mods: dict[str, nn.Module], batches, cfg) -> dict[str, dict]:
    """Per linear: ``{"mask24": bool [N, K], "density": float64 [nN, nK]}`` from ``cfg.prior``."""
    calib = batches[: cfg.calib_batches] if cfg.prior != "magnitude" else None
    res = method_masks(model, mods, calib, cfg.prior, ["2:4", "unstructured"], cfg.prior_sparsity)
    return {name: {"mask24": r["2:4"], "density": tile_density(r["unstructured"], cfg.tile)}
            for name, r in res.items()}


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


def build_layers(mods: dict[str, nn.Module], priors: dict[str, dict], cfg) -> list[LayerMask]:
    """The learnable state of every planned linear, initialised from the priors."""
    shapes = {n: tuple(oriented_weight(m).shape) for n, m in mods.items()}
    sizes = {n: tile_sizes(shapes[n], cfg.tile) for n in mods}
    allowed = {n: sparse_allowed(cfg.tile, shapes[n]) for n in mods}
    centred = centred_tile_logits({n: priors[n]["density"] for n in mods}, sizes, allowed, cfg.target_sparsity)
    layers = []
    for name, mod in mods.items():
        # logits live in "s" units; the forward multiplies by κ, so divide by κ at step 0
        tile_logits = cfg.prior_strength * centred[name] / cfg.tile_kappa[0]
        pattern_logits = None
        if cfg.mode == "joint":
            idx = pattern_index(priors[name]["mask24"])
            onehot = torch.nn.functional.one_hot(idx, 6).permute(2, 0, 1).float()     # [6, N, K/4]
            pattern_logits = onehot * (cfg.prior_strength / cfg.kappa_24[0])
        layers.append(LayerMask(name, mod, cfg.tile, cfg.mode, priors[name]["mask24"], tile_logits, pattern_logits))
    return layers
