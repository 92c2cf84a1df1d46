"""Pass: the cost model's M dispatch (``DispatchPlan``) for every ``hybrid`` site, before packing.

For each hybrid site: the plan of its tile map (``plan_cache.plan_for``: memoised per tile map,
dtype, planning device, ``m_max`` and fp32 matmul precision, and on disk), set as ``site.layout``;
its balanced tile-row order becomes the entry's packing order; the decision's ``layout`` records
the thresholds and a one-line summary that ``patchc.explain`` prints, e.g.
``M<=32 hybrid bm32; M<=64 hybrid bm64 sk2; else dense``.

A site whose hybrid kernels win at no M in 1..m_max becomes dense (reason ``cost_model_dense``)
when its generated kernels would run (``kernel="auto"`` on a CUDA weight).  It stays ``hybrid``
when the user forced ``kernel="triton"`` or ``"reference"``, and on CPU with ``kernel="auto"``,
where the op runs the reference path whatever the plan (the summary still says
``dense at every M``).

Planning device: the ``device=`` option when given, else the current CUDA device, else
``$PATCHC_DEVICE``, else h200.  Errors of the cost model propagate: they are bugs.
"""
from __future__ import annotations

import dataclasses
import logging

from patchc import runtime
from patchc.decisions import DENSE, HYBRID, Reason

from .plan_cache import layout_record, plan_for
from .state import CompileState, compile_pass

log = logging.getLogger("patchc")


@compile_pass(reads=("sites", "config", "site.decision", "site.entry", "site.tile_mask", "site.weight", "site.fqn"),
              writes=("site.layout", "site.decision"))
def choose_layouts(state: CompileState) -> None:
    cfg = state.config
    for s in state.sites:
        d = s.decision
        if d is None or d.action != HYBRID:
            continue
        plan = plan_for(s.tile_mask, s.dtype, cfg.device, cfg.m_max, cfg.cache_dir)
        s.layout = plan
        if s.entry.packed is None:           # packed (once) by rewrite_linears in this order
            s.entry.row_order = plan.row_order
        layout = layout_record(plan)
        if plan.strategy == "dense" and cfg.kernel == "auto" and runtime.uses_kernels(s.entry, s.weight.device):
            log.info("patchc: %s stays a masked dense linear: %s", s.fqn, plan.reason)
            s.decision = dataclasses.replace(d, action=DENSE, why=Reason("cost_model_dense"), layout=layout)
            continue
        s.decision = dataclasses.replace(d, layout=layout)
