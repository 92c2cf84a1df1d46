"""SparseGPT (Frantar & Alistarh, 2023): the OBS-style column sweep.

Columns are pruned left to right; the error of each pruned weight is pushed onto the columns
still to come through the inverse Hessian (its upper Cholesky factor), so the remaining weights
compensate.  The mask is chosen per block of ``blocksize`` columns (adaptive mask selection) by
the OBS saliency w² / [H⁻¹]ᵢᵢ².  The column loop *is* the algorithm (each column depends on the
updates of the previous ones); work inside a column is vectorised over all rows.
"""
from __future__ import annotations

from typing import Optional

import torch


#: SparseGPT's damping: this fraction of the mean diagonal of XᵀX is added to it before inverting.
SPARSEGPT_PERCDAMP = 0.01


def _inverse_hessian_factor(hess: torch.Tensor, w: torch.Tensor, percdamp: float, diagdamp: float = 0.0):
    """Upper Cholesky factor of H⁻¹ after dampening (H + diagdamp·diag(H), then + percdamp · its mean
    diagonal); dead inputs (zero diagonal) are zeroed."""
    h = hess.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    idx = torch.arange(h.shape[0], device=h.device)
    if diagdamp:
        h[idx, idx] *= 1.0 + diagdamp
    damp = percdamp * torch.mean(torch.diag(h))
    for attempt in range(6):        # escalate the damping when H is numerically singular
        hd = h.clone()
        hd[idx, idx] += damp * (10 ** attempt)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            break
    else:
        raise ValueError("sparsegpt: the calibration Hessian is not positive definite even after "
                         "dampening; use more calibration batches")
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True).float()


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hess: torch.Tensor, sparsity: float = 0.5, pattern: str = "2:4",
                    blocksize: int = 128, percdamp: float = SPARSEGPT_PERCDAMP,
                    mask: Optional[torch.Tensor] = None, diagdamp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one (out, in) weight with its calibration Hessian ``hess`` = 2·XᵀX/n [in, in].

    ``pattern="2:4"`` keeps 2 of every 4 consecutive weights along K (a partial last group is
    kept); ``"unstructured"`` prunes ``sparsity`` of each block's weights.  ``mask``: a given bool
    keep-mask [N, K] instead of choosing one (the OBS update of the kept weights with the mask
    fixed, e.g. a learned plan's).  ``percdamp``: a fraction of the mean diagonal of H added to every
    diagonal entry (isotropic damping); ``diagdamp``: a fraction of each diagonal entry added to
    itself first (H + diagdamp·diag(H): damping in proportion to each input's energy, which leaves
    the update invariant to the scale of an input channel).  Returns ``(keep_mask bool [N, K], updated weight float32
    [N, K])``; ``weight`` itself is not modified.
    """
    w = weight.detach().float().clone()
    n, k = w.shape
    hinv = _inverse_hessian_factor(hess.to(w.device), w, percdamp, diagdamp)
    pruned = torch.zeros(n, k, dtype=torch.bool, device=w.device)
    k4 = k // 4 * 4
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(h1)
        if mask is not None:
            m1 = ~mask[:, i1:i2].to(w.device, torch.bool)
        elif pattern == "unstructured":
            sal = w1 ** 2 / d1[None, :] ** 2
            n_prune = int(sal.numel() * sparsity)
            m1 = torch.zeros_like(w1, dtype=torch.bool)
            if n_prune:
                m1.view(-1)[torch.topk(sal.view(-1), n_prune, largest=False).indices] = True
        else:
            m1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            col = i1 + i
            if mask is None and pattern != "unstructured" and col % 4 == 0 and col + 4 <= k4:
                # choose the group's 2 pruned weights with the *updated* values (OBS saliency)
                sal = w1[:, i:i + 4] ** 2 / d1[i:i + 4][None, :] ** 2
                m1.scatter_(1, i + torch.topk(sal, 2, dim=1, largest=False).indices, True)
            wcol = w1[:, i]
            q = wcol.masked_fill(m1[:, i], 0.0)
            q1[:, i] = q
            e = (wcol - q) / d1[i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = m1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return ~pruned, w
