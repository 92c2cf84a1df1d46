"""Pass: the cost model's M dispatch (``DispatchPlan``) for every ``hybrid`` site, before packing.

For each hybrid site: the plan of its tile map (memoised per tile map, dtype, planning device,
``m_max`` and fp32 matmul precision), set as ``site.layout``; its balanced tile-row order goes to
``entry.row_order`` (``rewrite_linears`` packs the weight once, in that order); the decision's
``layout`` records the thresholds and a one-line summary that ``patchc.explain`` prints, e.g.
``M<=32 hybrid bm32; M<=64 hybrid bm64 sk2; else dense``.

A site whose hybrid kernels win at no M in 1..m_max becomes a masked dense linear (action
``dense``, reason ``cost model: dense is faster at every M <= m_max``) when its generated kernels
would run, i.e. ``kernel="auto"`` on a CUDA weight.  It stays ``hybrid`` when the user forced
``kernel="triton"`` or ``"reference"`` (the user asked for that path), and on CPU with
``kernel="auto"``, where the op runs the reference path whatever the plan (the summary still
says ``dense at every M``).

Planning device: the ``device=`` option when given, else the current CUDA device, else
``$PATCHC_DEVICE``, else h200 (``codegen.devices.get_device``, also behind
``PatchConfig.planning_device()``).  Errors of the cost model propagate: they are bugs.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from .state import CompileState, LinearSite

log = logging.getLogger("patchc")

DENSE_REASON = "cost model: dense is faster at every M <= m_max"
PLANS: dict = {}           # plan_key(...) -> DispatchPlan (tests may put a plan here)
_PLANS_MAX = 4096


def plan_key(tile_mask, dtype, device, m_max: int) -> tuple:
    """What a plan depends on: the tile map (not the 2:4 patterns), dtype, the planning device
    (resolved: ``None`` is the current GPU / $PATCHC_DEVICE / h200), m_max, fp32 precision."""
    from patchc.codegen.devices import dtype_key, get_device
    kind = tile_mask.tile_kind
    return (tuple(tile_mask.tile), tuple(tile_mask.shape), kind.numpy().tobytes(), dtype_key(dtype),
            get_device(device), int(m_max), torch.get_float32_matmul_precision())


def plan_for(tile_mask, dtype, device, m_max: int):
    """The (memoised) ``DispatchPlan`` of a tile map."""
    key = plan_key(tile_mask, dtype, device, m_max)
    plan = PLANS.get(key)
    if plan is None:
        from patchc.codegen.layout import plan_dispatch
        plan = plan_dispatch(tile_mask, dtype, device=device, m_max=m_max)
        if len(PLANS) >= _PLANS_MAX:
            PLANS.clear()
        PLANS[key] = plan
    return plan


def _label(c) -> str:
    if c == "dense":
        return "dense"
    return f"hybrid bm{c.block_m}" + (f" sk{c.split_k}" if c.split_k > 1 else "")


def summary(plan) -> str:
    """``"M<=32 hybrid bm32; M<=64 hybrid bm64; else dense"`` (``"dense at every M"``, ...)."""
    ranges = plan.ranges
    if len(ranges) == 1:
        return f"{_label(ranges[0][2])} at every M"
    return "; ".join([f"M<={hi} {_label(c)}" for _, hi, c in ranges[:-1]] + [f"else {_label(ranges[-1][2])}"])


def layout_record(plan) -> dict:
    """The decision's ``layout``: the plan as JSON-able data plus its ``summary`` line."""
    d = plan.to_dict()
    d["summary"] = summary(plan)
    return d


def runs_kernels(site: LinearSite, cfg) -> bool:
    """Whether the cost model's choice decides what runs: ``kernel="auto"`` on a CUDA weight."""
    return cfg.kernel == "auto" and site.weight.device.type == "cuda"


def choose_layouts(state: CompileState) -> None:
    cfg = state.config
    for s in state.sites:
        d = s.decision
        if d is None or d.action != "hybrid" or s.entry is None:
            continue
        plan = plan_for(s.tile_mask, s.dtype, cfg.device, cfg.m_max)
        s.layout = plan
        if s.entry.packed is None:           # packed (once) by rewrite_linears in this order
            s.entry.row_order = plan.row_order
        layout = layout_record(plan)
        if plan.strategy == "dense" and runs_kernels(s, cfg):
            log.info("patchc: %s stays a masked dense linear: %s", s.fqn, plan.reason)
            s.decision = dataclasses.replace(d, action="dense", reason=DENSE_REASON, layout=layout)
            continue
        s.decision = dataclasses.replace(d, layout=layout)
