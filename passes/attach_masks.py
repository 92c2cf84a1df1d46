"""Pass 3: attach each site's TileMask and decide whether it can be rewritten.

"Can this site be rewritten" is a pure check returning a reason; every "no" becomes a
``SiteDecision`` a user can read in ``patchc.explain``.  Accepted sites are registered with the
runtime, which packs their weight once per (weight, mask) per process.
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch

from patchc import runtime
from patchc.plan import mask_from_zeros
from patchc.types import SiteDecision

from .state import CompileState, LinearSite

log = logging.getLogger("patchc")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GRAD_REASON = "weight will receive gradients (grad mode is on and the weight requires grad)"

# inferred masks, per (weight, version, tile): a recompile must not re-infer
_INFERRED: dict[int, tuple] = {}


def _inferred_mask(site: LinearSite, tile):
    w = site.weight
    key = (w._version, w.data_ptr(), tuple(tile), site.transposed)
    hit = _INFERRED.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == key:
        return hit[2]
    tm = mask_from_zeros(w.t() if site.transposed else w, tile)
    _INFERRED[id(w)] = (weakref.ref(w), key, tm)
    weakref.finalize(w, _INFERRED.pop, id(w), None)
    return tm


def _lookup(plan, site: LinearSite):
    if site.fqn in plan:
        return plan[site.fqn]
    from .map_owners import _from_source
    alt = _from_source(site.weight_node)
    if alt and alt in plan:
        site.fqn, site.owner_via = alt, "grapharg"
        return plan[alt]
    return None


def can_rewrite(site: LinearSite) -> Optional[str]:
    """None when the site can run the hybrid op, else the reason it cannot."""
    if site.dtype not in SUPPORTED_DTYPES:
        return f"dtype {str(site.dtype).replace('torch.', '')} is not supported (fp16, bf16, fp32)"
    if site.tile_mask.shape != (site.n, site.k):
        return f"mask shape {site.tile_mask.shape} differs from the weight's (out, in) {(site.n, site.k)}"
    xv = site.x.meta.get("example_value") if hasattr(site.x, "meta") else None
    if xv is not None and xv.dtype != site.dtype:
        return f"input dtype {xv.dtype} differs from weight dtype {site.dtype}"
    if torch.is_grad_enabled() and site.weight.requires_grad:
        return GRAD_REASON
    return None


def _decision(site: LinearSite, action: str, reason: str, **kw) -> SiteDecision:
    tm = site.tile_mask
    itemsize = site.weight.element_size()
    return SiteDecision(
        fqn=site.fqn, n=site.n, k=site.k, dtype=str(site.dtype).replace("torch.", ""), action=action,
        reason=reason, frac_sparse=tm.fraction_sparse_tiles() if tm is not None else 0.0,
        sparsity=tm.sparsity() if tm is not None else 0.0, dense_bytes=site.n * site.k * itemsize,
        form=site.form, node=site.node.name, **kw)


def attach_masks(state: CompileState) -> None:
    cfg = state.config
    for s in state.sites:
        released = getattr(s.weight, "_patchc_site", None)
        if released is not None:            # release_dense: the packed entry is the weight now
            s.entry = runtime.get_entry(released)
            s.tile_mask = s.entry.tile_mask
        elif state.plan is not None:
            s.tile_mask = _lookup(state.plan, s)
            if s.tile_mask is None:
                s.decision = _decision(s, "skipped", "not in the mask plan")
                continue
        else:
            s.tile_mask = _inferred_mask(s, cfg.tile)
        if s.tile_mask.num_sparse_tiles() == 0:
            reason = "no 2:4 tile in its mask" if s.tile_mask.pruned() == 0 else "no 2:4 tile; masked dense"
            s.decision = _decision(s, "dense", reason)
            if s.tile_mask.pruned():
                s.entry = runtime.register_site(s.weight, s.tile_mask, s.transposed, s.fqn)
            continue
        why = can_rewrite(s)
        if why is not None:
            if cfg.fallback == "error":
                raise RuntimeError(f"patchc: cannot rewrite {s.fqn} ({s.n}x{s.k}, {s.dtype}): {why} "
                                   "(fallback='error')")
            log.info("patchc: %s stays a masked dense linear: %s", s.fqn, why)
            s.entry = s.entry or runtime.register_site(s.weight, s.tile_mask, s.transposed, s.fqn)
            s.decision = _decision(s, "dense", f"fallback: {why}")
            continue
        if s.entry is None:
            s.entry = runtime.register_site(s.weight, s.tile_mask, s.transposed, s.fqn)
        s.entry.kernel = cfg.kernel
        s.decision = _decision(s, "hybrid", "rewritten to patchc::hybrid_linear")
    rewritable = [s for s in state.sites if s.decision.action != "skipped"]
    if rewritable and all(s.decision.reason == f"fallback: {GRAD_REASON}" for s in rewritable):
        import warnings
        warnings.warn("patchc: every site was left dense because grad mode is on and the weights require "
                      "grad; run under torch.inference_mode() (or torch.no_grad()) or freeze the weights "
                      "(requires_grad_(False)) to get the hybrid kernels", stacklevel=2)
