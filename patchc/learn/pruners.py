"""One-shot pruners (magnitude, Wanda, SparseGPT): all-2:4 plans, unstructured masks, hybrid
plans, and the priors mask learning starts from.

Calibration streams: one decoder block's statistics (SparseGPT: its XᵀX matrices) are alive at a
time, and each layer's result is reduced to what the caller keeps before the next is computed.
By default every block sees the dense model's activations; ``sequential=True`` feeds each block
the outputs of the already-pruned blocks before it.  The user's model is only changed when asked
(``oneshot(update_weights=True)``).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..modules import fingerprint, is_transposed, oriented_weight
from ..plan import MaskPlan
from ..prune import check_target, check_tile_fits, mask24_from_scores, select_sparse_tiles, tile_errors, tile_sizes
from ..types import TileMask, _check_tile, grid_of, sparse_allowed
from .calib import default_linears, materialize
from .sparsegpt import SPARSEGPT_PERCDAMP, sparsegpt_prune
from .stream import calibrate

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


def prune_layers(model: nn.Module, mods: dict[str, nn.Module], batches, method: str, patterns: Iterable[str],
                 sparsity: float = 0.5, blocksize: int = 128, percdamp: float = SPARSEGPT_PERCDAMP, sequential: bool = False,
                 device=None, keep: Optional[Callable[[str, dict], object]] = None, progress: bool = False) -> dict:
    """Prune every linear of ``mods`` with ``method``, one layer at a time, for each of ``patterns``.

    A layer's result is ``{"score": importance, "2:4": keep-mask, "unstructured": keep-mask,
    "weight:<pattern>": SparseGPT's updated float32 weight}`` (masks on the CPU, (out, in));
    ``keep(name, result)`` reduces it to what the caller holds on to (default: all of it), so
    only one layer's full result is alive at a time.  Wanda and SparseGPT calibrate one decoder
    block at a time (:func:`patchc.learn.stream.calibrate`); with ``sequential`` each block sees
    the outputs of the blocks before it pruned with the first of ``patterns`` (SparseGPT: with
    its updated weights).  The model is not modified.  Returns ``{name: kept}`` in ``mods`` order."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if blocksize % 4:
        raise ValueError(f"blocksize must be a multiple of 4 (2:4 groups), got {blocksize}")
    patterns = list(patterns)
    keep = keep or (lambda name, res: res)
    out = {}

    def layer(name: str, st) -> torch.Tensor:
        w = oriented_weight(mods[name]).detach()
        if device is not None:        # magnitude: score each layer there (calibrated blocks already are)
            w = w.to(device)
        res = {"score": _importance(method, w, st)}
        for pat in patterns:
            if method == "sparsegpt":
                hess = st.hess * (2.0 / max(1, st.rows))
                keep_mask, new_w = sparsegpt_prune(w, hess, sparsity, pat, blocksize, percdamp)
                del hess
                res[pat], res[f"weight:{pat}"] = keep_mask.cpu(), new_w
            elif pat == "2:4":
                res[pat] = mask24_from_scores(res["score"]).cpu()
            else:
                res[pat] = _keep_top(res["score"], sparsity, per_row=(method == "wanda")).cpu()
        first = patterns[0]
        pruned = (res[f"weight:{first}"].to(w.dtype) if method == "sparsegpt"
                  else w * res[first].to(w.device, w.dtype)) if sequential else None
        out[name] = keep(name, res)
        return pruned

    if method == "magnitude":
        for name in mods:
            layer(name, None)
    else:
        if batches is None:
            raise ValueError(f"oneshot(method={method!r}) needs calibration batches (got batches=None)")
        data = materialize(batches)
        calibrate(model, mods, data, lambda stats: {n: layer(n, st) for n, st in stats.items()},
                  hessian=(method == "sparsegpt"), sequential=sequential, device=device, progress=progress)
    return {n: out[n] for n in mods}


def _storage_layout(new_w: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """An updated (out, in) weight in the module's own layout and dtype, on the CPU."""
    w = module.weight
    new_w = new_w.t() if is_transposed(module) else new_w
    return new_w.to("cpu", w.dtype).contiguous()


@torch.no_grad()
def oneshot(model: nn.Module, batches=None, method: str = "magnitude", pattern: str = "2:4",
            sparsity: float = 0.5, tile=(128, 128), include: Optional[Iterable[str]] = None,
            exclude: Optional[Iterable[str]] = None, update_weights: bool = False,
            blocksize: int = 128, percdamp: float = SPARSEGPT_PERCDAMP, sequential: bool = False, return_weights: bool = False,
            device=None, progress: bool = False):
    """One-shot pruning of the decoder-block linears (see ``LearnConfig.include`` for the default).

    ``pattern="2:4"`` → a :class:`MaskPlan` in which every tile is 2:4 (an edge tile whose width is
    not a multiple of 4 stays dense).  ``pattern="unstructured"`` → ``{fqn: bool keep-mask (out,
    in)}`` pruning ``sparsity`` of each layer (per output row for Wanda, per block for SparseGPT);
    ``sparsity`` applies to this pattern only.  ``batches`` (input_ids tensors or dicts) are
    needed by ``wanda`` and ``sparsegpt``, which calibrate one decoder block at a time;
    ``sequential=True`` calibrates each block on the outputs of the blocks before it already
    pruned (SparseGPT: with their updated weights), the reference SparseGPT protocol (SmolLM2-135M,
    SparseGPT 2:4: perplexity 95.84 in domain vs 102.57 with one dense calibration pass).
    ``device``: where the blocks are calibrated (each moved there for its turn), e.g. ``"cuda"``
    for a model held on the CPU.

    SparseGPT changes the kept weights (that is its point).  The model is left untouched unless
    ``update_weights=True`` (then its planned weights are overwritten in place, recorded in
    ``plan.meta["weights_updated"]``).  ``return_weights=True`` returns ``(result, weights)``
    with ``weights = {fqn: updated weight}`` — keys are the plan's module names, values have the
    module's own weight layout and dtype (``module.weight.shape``; transformers' ``Conv1D``
    stores (in, out)), on the CPU, pruned positions exactly 0; ``{}`` for magnitude and Wanda,
    which change no weight.  ``model.load_state_dict({f"{k}.weight": v for k, v in weights.items()},
    strict=False)`` puts them into a model.
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
    with_w = method == "sparsegpt" and (update_weights or return_weights)

    def keep(name, res):
        kept = {"mask": res[pattern]}
        if with_w:
            kept["weight"] = _storage_layout(res[f"weight:{pattern}"], mods[name])
        return kept
    res = prune_layers(model, mods, batches, method, [pattern], sparsity if pattern != "2:4" else 0.5,
                       blocksize, percdamp, sequential=sequential, device=device, keep=keep, progress=progress)
    weights = {n: r["weight"] for n, r in res.items() if "weight" in r}
    if update_weights:
        for name, m in mods.items():
            m.weight.copy_(weights[name])
        log.info("patchc: sparsegpt updated the weights of %d linears in place", len(mods))
    if pattern == "unstructured":
        result = {name: r["mask"] for name, r in res.items()}
    else:
        masks = {}
        for name, m in mods.items():
            shape = tuple(oriented_weight(m).shape)
            masks[name] = TileMask.from_kinds(tile, sparse_allowed(tile, shape).to(torch.uint8), res[name]["mask"])
        result = MaskPlan(masks, {"tile": list(tile), "method": f"{method}-2:4", "weights_updated": bool(update_weights),
                                  **_calib_meta(method, sequential), "fingerprint": fingerprint(model, mods)})
    return (result, weights) if return_weights else result


def _calib_meta(method: str, sequential: bool) -> dict:
    return {} if method == "magnitude" else {"calibration": "sequential" if sequential else "dense"}


@torch.no_grad()
def oneshot_hybrid(model: nn.Module, batches=None, method: str = "magnitude", target_sparsity: float = 0.35,
                   tile=(128, 128), include=None, exclude=None, sequential: bool = False, device=None,
                   progress: bool = False) -> MaskPlan:
    """A hybrid plan without learning: the method's 2:4 mask in every tile, and the tiles whose
    2:4 pruning loses the least importance-weighted mass become 2:4, ranked across all layers,
    until ``target_sparsity`` is met (``patchc.prune.magnitude_hybrid`` generalised to Wanda and
    SparseGPT scores).  ``sequential``, ``device``: as for :func:`oneshot` (blocks are calibrated
    on the outputs of blocks pruned all-2:4).  No weight is changed (SparseGPT's masks are used
    with the original weights)."""
    target = check_target(target_sparsity)
    tile = _check_tile(tile)
    mods = default_linears(model, include, exclude, what="oneshot_hybrid")
    for name, m in mods.items():
        check_tile_fits(name, tuple(oriented_weight(m).shape), tile)

    def keep(name, r):            # the per-tile cost and the 2:4 mask; the [N, K] score is dropped
        return {"cost": tile_errors(r["score"], r["2:4"].to(r["score"].device), tile).cpu(), "mask": r["2:4"]}
    res = prune_layers(model, mods, batches, method, ["2:4"], sequential=sequential, device=device, keep=keep,
                       progress=progress)
    costs, sizes, allowed = {}, {}, {}
    for name, m in mods.items():
        shape = tuple(oriented_weight(m).shape)
        costs[name] = res[name]["cost"]
        sizes[name], allowed[name] = tile_sizes(shape, tile), sparse_allowed(tile, shape)
    kinds = select_sparse_tiles(costs, sizes, allowed, target)
    masks = {n: TileMask.from_kinds(tile, kinds[n], res[n]["mask"]) for n in mods}
    return MaskPlan(masks, {"tile": list(tile), "method": f"{method}-hybrid", "target_sparsity": target,
                            **_calib_meta(method, sequential), "fingerprint": fingerprint(model, mods)})


def tile_density(keep: torch.Tensor, tile) -> torch.Tensor:
    """Fraction of kept weights in each tile of a bool (out, in) mask → float64 [nN, nK]."""
    n, k = keep.shape
    nN, nK = grid_of((n, k), tile)
    pad = torch.zeros(nN * tile[0], nK * tile[1], dtype=torch.float64)
    pad[:n, :k] = keep.double()
    kept = pad.view(nN, tile[0], nK, tile[1]).sum((1, 3))
    return kept / tile_sizes((n, k), tile)
