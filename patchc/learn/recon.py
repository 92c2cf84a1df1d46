"""Weight reconstruction for a given plan: the kept weights of every planned linear are updated,
layer by layer, toward the minimum of ‖X·Wᵀ − X·(W′ ⊙ M)ᵀ‖² on the calibration activations —
SparseGPT's OBS update with the mask fixed (:func:`patchc.learn.sparsegpt.sparsegpt_prune` with
``mask=``), damped, and taken in part (:data:`RECON_STRENGTH` of it by default).

Calibration streams one decoder block at a time (one block's XᵀX matrices alive at once); with
``sequential`` (the default) each block is calibrated on the outputs of the blocks before it
already reconstructed, so later layers also compensate for the earlier ones.  The model is not
modified: the updated weights are returned (and written by :func:`patchc.weights.save_weights`).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import nn

from ..modules import oriented_weight
from ..plan import MaskPlan
from .calib import materialize
from .masking import masked_forward
from .pruners import _storage_layout
from .sparsegpt import SPARSEGPT_PERCDAMP, sparsegpt_prune
from .stream import calibrate

log = logging.getLogger("patchc")

#: Default damping of the reconstruction, in two parts: H + diagdamp·diag(H) (each input damped in
#: proportion to its own energy, :data:`RECON_DIAGDAMP`), then + percdamp · the mean diagonal
#: (isotropic, :data:`RECON_PERCDAMP`, SparseGPT's 0.01, for the numerics).  Isotropic damping
#: alone cannot make the update hold off the calibration domain: on SmolLM2-135M's learned 35 % plan
#: (32 calibration windows, sequential; 12 evaluation windows per text, Hamlet+Macbeth / GPL-3 /
#: Britannica; mask only 67.1 / 55.0 / 78.3) percdamp 0.01 gave 68.1 / 59.9 / 75.8, 0.3 66.6 / 56.8 /
#: 74.8, 1.0 66.6 / 56.3 / 75.6 (GPL-3 always worse than the mask alone), while diagdamp 0.3 gave
#: 65.9 / 54.9 / 73.4, 1.0 65.8 / 53.7 / 73.6, 3.0 66.1 / 53.4 / 74.6; diagdamp 1.0 on 128
#: windows: 65.5 / 53.5 / 73.3.  ``bench/results/quality/NOTES.md`` has the commands.
RECON_DIAGDAMP = 1.0
RECON_PERCDAMP = SPARSEGPT_PERCDAMP
#: Default fraction of each layer's update the reconstruction takes (``strength``): W ⊙ M +
#: 0.3 · (W′ − W ⊙ M), each block calibrated on its predecessors' weakened updates.  The full update
#: fits the calibration genres: on SmolLM2-135M's learned joint plans (2:4 prior gap 4; Hamlet+Macbeth /
#: GPL-3 / Britannica, 32 evaluation windows each, 128 calibration windows) it gained 1.6 / 2.4 / 1.7 %
#: in domain and lost 4.3 / 4.7 / 4.7 % on GPL-3 at 25 / 35 / 45 %; at 0.3 the 25 % plan went from
#: 59.27 / 37.28 / 62.02 (mask only) to 58.39 / 37.15 / 61.55 (0.5: 58.06 / 37.33 / 61.47, full:
#: 58.34 / 38.90 / 62.14), and every joint and tile plan of the quality bench gained on every text
#: (``bench/results/quality/NOTES.md``).
RECON_STRENGTH = 0.3


@torch.no_grad()
def reconstruct_weights(model: nn.Module, plan: MaskPlan, batches, sequential: bool = True, blocksize: int = 128,
                        percdamp: float = RECON_PERCDAMP, diagdamp: float = RECON_DIAGDAMP, device=None,
                        progress: bool = False, layers: Optional[Iterable[str]] = None,
                        strength: float = RECON_STRENGTH) -> dict[str, torch.Tensor]:
    """``{fqn: updated weight}`` for every linear of ``plan`` (or of ``layers``): the least-squares
    update of its kept weights on the calibration activations of ``batches``, its pruned positions
    exactly 0.

    Values have the module's own weight layout and dtype, on the CPU (as ``oneshot(...,
    return_weights=True)``); ``model.load_state_dict({f"{k}.weight": v for k, v in w.items()},
    strict=False)`` puts them into a model, :func:`patchc.weights.save_weights` into a file that
    ``patchc.compile(..., weights=)`` / ``backend="patch"`` (option ``weights``) load.
    ``sequential``: calibrate each decoder block on the outputs of the blocks before it already
    reconstructed (default) instead of the dense model's activations.  Damping: XᵀX + diagdamp ·
    diag(XᵀX) (``diagdamp`` >= 0, default :data:`RECON_DIAGDAMP`, 1.0: each input damped in
    proportion to its own energy), then + ``percdamp`` (> 0, default :data:`RECON_PERCDAMP`,
    SparseGPT's 0.01) times the mean diagonal; larger values keep the kept weights closer to
    W ⊙ M.  ``strength`` (in (0, 1], default :data:`RECON_STRENGTH`, 0.3; 1 is the least-squares
    solution): each layer takes that fraction of its update, W ⊙ M + strength · (W′ − W ⊙ M),
    before the blocks after it are calibrated on it.  ``layers``: the planned linears to reconstruct
    (default all of ``plan``); the plan's other linears keep W ⊙ M (they are masked, not updated, in
    the sequential stream too) and are not in the result.  ``device``: where each block is
    calibrated.  The model is not modified.
    """
    if not isinstance(plan, MaskPlan):
        raise TypeError(f"reconstruct_weights: plan must be a MaskPlan, got {type(plan).__name__}")
    plan.validate_against(model)
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 < percdamp < float("inf"):
        raise ValueError(f"reconstruct_weights: percdamp must be a finite number > 0, got {percdamp!r}")
    if isinstance(diagdamp, bool) or not isinstance(diagdamp, (int, float)) or not 0 <= diagdamp < float("inf"):
        raise ValueError(f"reconstruct_weights: diagdamp must be a finite number >= 0, got {diagdamp!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"reconstruct_weights: strength must be a number in (0, 1], got {strength!r}")
    if batches is None:
        raise ValueError("reconstruct_weights needs calibration batches (got batches=None)")
    chosen = set(plan) if layers is None else _chosen_layers(plan, layers)
    all_mods = dict(model.named_modules())
    mods = {name: all_mods[name] for name in plan if name in chosen}
    rest = MaskPlan({name: plan[name] for name in plan if name not in chosen})
    out: dict[str, torch.Tensor] = {}

    def on_layers(stats: dict) -> dict:
        new = {}
        for name, st in stats.items():
            w = oriented_weight(mods[name]).detach()
            hess = st.hess * (2.0 / max(1, st.rows))
            keep = plan[name].unpacked().to(hess.device)
            _, w2 = sparsegpt_prune(w.to(hess.device), hess, mask=keep, blocksize=blocksize, percdamp=percdamp,
                                    diagdamp=diagdamp)
            del hess
            if strength != 1:
                masked = w.to(w2.device, w2.dtype) * keep.to(w2.dtype)
                w2 = masked + strength * (w2 - masked)
            out[name] = _storage_layout(w2, mods[name])
            new[name] = w2.to(w.dtype)
        return new

    with masked_forward(model, rest):       # the linears not reconstructed compute with W ⊙ M throughout
        calibrate(model, mods, materialize(batches), on_layers, hessian=True, sequential=sequential, device=device,
                  progress=progress)
    log.info("patchc: reconstructed the kept weights of %d linears (%s calibration)", len(out),
             "sequential" if sequential else "one dense pass")
    return {n: out[n] for n in plan if n in out}


def _chosen_layers(plan: MaskPlan, layers) -> set:
    if isinstance(layers, str):
        raise TypeError("reconstruct_weights: layers must be an iterable of linear names, not a string")
    chosen = set(layers)
    unknown = sorted(chosen - set(plan))
    if unknown:
        raise ValueError(f"reconstruct_weights: layers not in the plan: {unknown[:5]}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    if not chosen:
        raise ValueError("reconstruct_weights: layers is empty (nothing to reconstruct)")
    return chosen


def reconstruction_error(model: nn.Module, plan: MaskPlan, weights: dict, batches,
                         names: Optional[list] = None) -> dict[str, tuple[float, float]]:
    """``{fqn: (error of W ⊙ M, error of the reconstructed weight)}``: ‖X·Wᵀ − X·W′ᵀ‖² summed over
    the calibration batches' inputs of each linear (dense model's activations).  For tests and
    reports."""
    all_mods = dict(model.named_modules())
    names = list(names or plan)
    errs = {n: [0.0, 0.0] for n in names}
    hooks = []

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            w = oriented_weight(mod).detach().float()
            ref = x @ w.t()
            masked = w * plan[name].unpacked().to(w.dtype)
            w2 = weights[name].float()
            w2 = w2.t() if w2.shape != w.shape else w2
            errs[name][0] += float(((ref - x @ masked.t()) ** 2).sum())
            errs[name][1] += float(((ref - x @ w2.t()) ** 2).sum())
        return fn
    for n in names:
        hooks.append(all_mods[n].register_forward_pre_hook(hook(n)))
    try:
        with torch.no_grad():
            for b in materialize(batches):
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return {n: (a, b) for n, (a, b) in errs.items()}
