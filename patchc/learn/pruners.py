"""One-shot pruners (magnitude, Wanda, SparseGPT): all-2:4 plans, unstructured masks, hybrid
plans, and the priors mask learning starts from.

Calibration statistics come from one pass of the dense model over the batches (every layer sees
the dense model's activations), so the priors are computed on the original, frozen weights.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import nn

from ..modules import fingerprint, oriented_weight
from ..plan import MaskPlan
from ..prune import check_target, check_tile_fits, mask24_from_scores, select_sparse_tiles, tile_errors, tile_sizes
from ..types import TileMask, _check_tile, grid_of, sparse_allowed
from .calib import collect_stats, default_linears, materialize
from .sparsegpt import sparsegpt_prune

log = logging.getLogger("patchc")

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("2:4", "unstructured")


def _keep_top(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """bool keep-mask pruning the ``sparsity`` lowest scores (per row, or over the whole layer).
    A k-th value threshold (ties pruned together) is 3× faster than a topk of half the layer."""
    flat = score if per_row else score.reshape(1, -1)
    n_prune = int(flat.shape[1] * sparsity)
    if not n_prune:
        return torch.ones_like(score, dtype=torch.bool)
    thr = flat.kthvalue(n_prune, dim=1, keepdim=True).values
    return (flat > thr).view_as(score)


def _importance(method: str, w: torch.Tensor, st) -> torch.Tensor:
    """Per-weight importance: |W| (magnitude), |W|·‖X_col‖₂ (Wanda and, only to rank tiles in a
    hybrid plan, SparseGPT: ‖X_col‖₂² is diag(XᵀX); SparseGPT's masks come from its sweep)."""
    a = w.detach().abs().float()
    if method == "magnitude":
        return a
    return a * st.sq.to(a.device).clamp_min(0).sqrt()[None, :]


def method_masks(model: nn.Module, mods: dict[str, nn.Module], batches, method: str, patterns: Iterable[str],
                 sparsity: float = 0.5, blocksize: int = 128, percdamp: float = 0.01) -> dict[str, dict]:
    """Per linear: ``{"score": importance, "2:4": keep-mask, "unstructured": keep-mask,
    "weight:<pattern>": SparseGPT's updated weight}`` for the requested ``patterns``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    patterns = list(patterns)
    stats = {}
    if method != "magnitude":
        if batches is None:
            raise ValueError(f"oneshot(method={method!r}) needs calibration batches (got batches=None)")
        stats = collect_stats(model, mods, materialize(batches), hessian=(method == "sparsegpt"))
    if blocksize % 4:
        raise ValueError(f"blocksize must be a multiple of 4 (2:4 groups), got {blocksize}")
    out = {}
    for name, m in mods.items():
        w = oriented_weight(m).detach()
        st = stats.get(name)
        res = {"score": _importance(method, w, st)}
        for pat in patterns:
            if method == "sparsegpt":
                hess = st.hess * (2.0 / max(1, st.rows))
                keep, new_w = sparsegpt_prune(w, hess, sparsity, pat, blocksize, percdamp)
                res[pat], res[f"weight:{pat}"] = keep.cpu(), new_w
            elif pat == "2:4":
                res[pat] = mask24_from_scores(res["score"]).cpu()
            else:
                res[pat] = _keep_top(res["score"], sparsity, per_row=(method == "wanda")).cpu()
        out[name] = res
    return out


@torch.no_grad()
def oneshot(model: nn.Module, batches=None, method: str = "magnitude", pattern: str = "2:4",
            sparsity: float = 0.5, tile=(128, 128), include: Optional[Iterable[str]] = None,
            exclude: Optional[Iterable[str]] = None, update_weights: bool = False,
            blocksize: int = 128, percdamp: float = 0.01):
    """One-shot pruning of the decoder-block linears (see ``LearnConfig.include`` for the default).

    ``pattern="2:4"`` → a :class:`MaskPlan` in which every tile is 2:4 (an edge tile whose width is
    not a multiple of 4 stays dense).  ``pattern="unstructured"`` → ``{fqn: bool keep-mask (out,
    in)}`` pruning ``sparsity`` of each layer (per output row for Wanda, per block for SparseGPT);
    ``sparsity`` applies to this pattern only.  ``batches`` (input_ids tensors or dicts) are
    needed by ``wanda`` and ``sparsegpt``.  SparseGPT edits the weights in place only with
    ``update_weights=True`` (recorded in ``plan.meta["weights_updated"]``).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    sparsity = float(sparsity)
    if pattern == "unstructured" and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) for the unstructured pattern, got {sparsity!r}")
    if update_weights and method != "sparsegpt":
        raise ValueError(f"update_weights=True needs method='sparsegpt' (got method={method!r})")
    tile = _check_tile(tile)
    mods = default_linears(model, include, exclude, what="oneshot")
    if pattern == "2:4":
        for name, m in mods.items():
            check_tile_fits(name, tuple(oriented_weight(m).shape), tile)
    res = method_masks(model, mods, batches, method, [pattern], sparsity if pattern != "2:4" else 0.5,
                       blocksize, percdamp)
    if update_weights:
        for name, m in mods.items():
            w = oriented_weight(m)
            w.copy_(res[name][f"weight:{pattern}"].to(w.dtype))
        log.info("patchc: sparsegpt updated the weights of %d linears in place", len(mods))
    if pattern == "unstructured":
        return {name: r[pattern] for name, r in res.items()}
    masks = {}
    for name, m in mods.items():
        shape = tuple(oriented_weight(m).shape)
        masks[name] = TileMask.from_kinds(tile, sparse_allowed(tile, shape).to(torch.uint8), res[name]["2:4"])
    return MaskPlan(masks, {"tile": list(tile), "method": f"{method}-2:4", "weights_updated": bool(update_weights),
                            "fingerprint": fingerprint(model, mods)})


@torch.no_grad()
def oneshot_hybrid(model: nn.Module, batches=None, method: str = "magnitude", target_sparsity: float = 0.35,
                   tile=(128, 128), include=None, exclude=None) -> MaskPlan:
    """A hybrid plan without learning: the method's 2:4 mask in every tile, and the tiles whose
    2:4 pruning loses the least importance-weighted mass become 2:4, ranked across all layers,
    until ``target_sparsity`` is met (``patchc.prune.magnitude_hybrid`` generalised to Wanda and
    SparseGPT scores)."""
    target = check_target(target_sparsity)
    tile = _check_tile(tile)
    mods = default_linears(model, include, exclude, what="oneshot_hybrid")
    for name, m in mods.items():
        check_tile_fits(name, tuple(oriented_weight(m).shape), tile)
    res = method_masks(model, mods, batches, method, ["2:4"])
    costs, sizes, allowed = {}, {}, {}
    for name, m in mods.items():
        shape = tuple(oriented_weight(m).shape)
        costs[name] = tile_errors(res[name]["score"], res[name]["2:4"].to(res[name]["score"].device), tile)
        sizes[name], allowed[name] = tile_sizes(shape, tile), sparse_allowed(tile, shape)
    kinds = select_sparse_tiles(costs, sizes, allowed, target)
    masks = {n: TileMask.from_kinds(tile, kinds[n], res[n]["2:4"]) for n in mods}
    return MaskPlan(masks, {"tile": list(tile), "method": f"{method}-hybrid", "target_sparsity": target,
                            "fingerprint": fingerprint(model, mods)})


def tile_density(keep: torch.Tensor, tile) -> torch.Tensor:
    """Fraction of kept weights in each tile of a bool (out, in) mask → float64 [nN, nK]."""
    n, k = keep.shape
    nN, nK = grid_of((n, k), tile)
    pad = torch.zeros(nN * tile[0], nK * tile[1], dtype=torch.float64)
    pad[:n, :k] = keep.double()
    kept = pad.view(nN, tile[0], nK, tile[1]).sum((1, 3))
    return kept / tile_sizes((n, k), tile)
