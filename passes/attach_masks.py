"""Pass 3: attach each site's TileMask, check the plan fits the graph, decide whether each site can
be rewritten, and give each non-skipped site its runtime entry.

"Can this site be rewritten" (``can_rewrite``) is a pure check returning a reason code; every
"no" becomes a ``SiteDecision`` a user can read in ``patchc.explain``.  A plan entry whose shape
differs from its layer's weight, or a plan that matches none of a graph's linears, is an error
naming the plan, the layer and both shapes (``fallback="dense"`` turns mismatches into a warning
and leaves those layers untouched).
"""
from __future__ import annotations

import logging
import warnings
import weakref
from typing import Optional

import torch

from patchc import runtime
from patchc.caches import BoundedCache
from patchc.decisions import DENSE, FALLBACK_PREFIX, HYBRID, SKIPPED, Reason, SiteDecision
from patchc.plan import mask_from_zeros

from .state import CompileState, LinearSite, compile_pass, source_fqn

log = logging.getLogger("patchc")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# masks inferred from weights, per (weight, version, tile): a recompile must not re-infer
_INFERRED = BoundedCache("inferred masks", 4096)


class PlanMismatchError(ValueError):
    """A mask plan does not fit the model it is compiled with."""


def _inferred_mask(site: LinearSite, tile):
    w = site.weight
    key = (id(w), w._version, w.data_ptr(), tuple(tile), site.transposed)
    hit = _INFERRED.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1]
    tm = mask_from_zeros(w.t() if site.transposed else w, tile)
    _INFERRED.put(key, (weakref.ref(w), tm))
    return tm


def _lookup(plan, site: LinearSite):
    if site.fqn in plan:
        return plan[site.fqn]
    alt = source_fqn(site.weight_node)
    if alt and alt in plan:
        site.fqn, site.owner_via = alt, "grapharg"
        return plan[alt]
    return None


def can_rewrite(site: LinearSite) -> Optional[Reason]:
    """None when the site can run the hybrid op, else the reason it cannot."""
    if site.dtype not in SUPPORTED_DTYPES:
        return Reason("dtype", {"dtype": str(site.dtype).replace("torch.", "")})
    xv = site.x.meta.get("example_value") if hasattr(site.x, "meta") else None
    if xv is not None and xv.dtype != site.dtype:
        return Reason("input_dtype", {"x": str(xv.dtype), "w": str(site.dtype)})
    if torch.is_grad_enabled() and site.weight.requires_grad:
        return Reason("grad")
    return None


def _decision(site: LinearSite, action: str, why: Reason) -> SiteDecision:
    tm = site.tile_mask
    return SiteDecision(
        fqn=site.fqn, n=site.n, k=site.k, dtype=str(site.dtype).replace("torch.", ""), action=action, why=why,
        frac_sparse=tm.fraction_sparse_tiles() if tm is not None else 0.0,
        sparsity=tm.sparsity() if tm is not None else 0.0, dense_bytes=site.n * site.k * site.weight.element_size(),
        form=site.form, node=site.node.name)


def _plan_name(state: CompileState) -> str:
    src = state.config.plan if isinstance(state.config.plan, str) else getattr(state.plan, "source", None)
    return f"mask plan {src}" if src else "the mask plan"


def _check_fit(state: CompileState, mismatched: list[LinearSite]) -> None:
    """Raise (or warn, with an explicit ``fallback="dense"``) when the plan does not fit."""
    what = _plan_name(state)
    if mismatched:
        lines = [f"  {s.fqn}: plan {tuple(s.tile_mask.shape)} vs weight (out, in) {(s.n, s.k)}" for s in mismatched[:8]]
        more = f"\n  ... and {len(mismatched) - 8} more" if len(mismatched) > 8 else ""
        msg = (f"patchc: {what} does not fit this model: {len(mismatched)} layer(s) have another shape:\n"
               + "\n".join(lines) + more)
        if state.config.fallback != "dense":
            raise PlanMismatchError(msg + "\n(pass options={'fallback': 'dense'} to leave those layers dense instead)")
        warnings.warn(msg + "\nthose layers stay dense (fallback='dense')", stacklevel=2)
    planned = [s for s in state.sites if s.tile_mask is not None]
    if state.plan is not None and len(state.sites) >= 2 and not planned and not mismatched:
        have = ", ".join(sorted({s.fqn for s in state.sites})[:3])
        want = ", ".join(sorted(state.plan)[:3])
        raise PlanMismatchError(
            f"patchc: {what} matches none of the {len(state.sites)} linear layers of this graph (the graph has "
            f"{have}, ...; the plan has {want}, ...): was it made for another model?")


@compile_pass(reads=("sites", "plan", "config", "site.weight", "site.weight_node", "site.fqn", "site.x",
                     "site.transposed", "site.node", "site.form", "site.bias_node"),
              writes=("site.tile_mask", "site.decision", "site.entry", "site.fqn", "site.owner_via"))
def attach_masks(state: CompileState) -> None:
    cfg = state.config
    mismatched = []
    for s in state.sites:
        released = runtime.released_entry(s.weight)
        if released is not None:            # release_dense: the packed entry holds the weight now
            s.entry, s.tile_mask = released, released.tile_mask
        elif state.plan is not None:
            s.tile_mask = _lookup(state.plan, s)
            if s.tile_mask is None:
                s.decision = _decision(s, SKIPPED, Reason("not_in_plan"))
                continue
            if s.tile_mask.shape != (s.n, s.k):
                mismatched.append(s)
                s.decision = _decision(s, SKIPPED, Reason("mask_shape", {"mask": list(s.tile_mask.shape),
                                                                         "weight": [s.n, s.k]}))
                continue
            s.tile_mask.validate(s.fqn)
        else:
            s.tile_mask = _inferred_mask(s, cfg.tile)
        if s.tile_mask.pruned() == 0:
            s.decision = _decision(s, DENSE, Reason("keeps_all"))
            continue
        if s.entry is None:
            s.entry = runtime.entry_for([s.weight], [s.tile_mask], [s.transposed], [s.fqn], [s.bias_node is not None])
        s.entry.kernel = cfg.kernel
        why = can_rewrite(s)
        if why is not None:
            if cfg.fallback == "error":
                raise RuntimeError(f"patchc: cannot rewrite {s.fqn} ({s.n}x{s.k}, {s.dtype}): "
                                   f"{why.text().removeprefix(FALLBACK_PREFIX)} (fallback='error')")
            log.info("patchc: %s stays a masked dense linear: %s", s.fqn, why.text())
            s.decision = _decision(s, DENSE, why)
        elif s.tile_mask.num_sparse_tiles() == 0:
            s.decision = _decision(s, DENSE, Reason("no_24_tile"))
        else:
            s.decision = _decision(s, HYBRID, Reason("rewritten"))
    _check_fit(state, mismatched)
    rewritable = [s for s in state.sites if s.decision.action != SKIPPED and s.tile_mask.pruned()]
    if rewritable and all(s.decision.why.code == "grad" for s in rewritable):
        warnings.warn("patchc: every site was left dense because grad mode is on and the weights require "
                      "grad; run under torch.inference_mode() (or torch.no_grad()) or freeze the weights "
                      "(requires_grad_(False)) to get the hybrid kernels", stacklevel=2)
