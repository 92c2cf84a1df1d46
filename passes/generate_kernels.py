"""Pass: generate the Triton kernels of every ``hybrid`` site and attach their launcher.

For each hybrid site: take the cost model's ``DispatchPlan`` (``site.layout`` when a layout pass
set one, else ``codegen.layout.plan_dispatch``, memoised per mask), build a ``HybridRunner``
(one kernel per hybrid M range; BLOCK_N / BLOCK_K fixed per weight), render + cache its kernels
and list them on the runtime entry (``entry.kernels``), set ``entry.runner`` (what
``patchc::hybrid_linear`` launches on CUDA, or everywhere with ``kernel="triton"``), and record
the kernel for the example M in the site's decision ("dense" where the plan dispatches to dense).
Kernels are generated on machines without a GPU too, so they can be inspected there.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from patchc.codegen.launch import INTERPRET_MSG, interpreter_active
from patchc.codegen.runner import HybridRunner
from patchc.codegen.spec import UnsupportedSpec

from .state import CompileState, LinearSite

log = logging.getLogger("patchc")
_PLANS: dict = {}          # (mask fingerprint, dtype, device, m_max, fp32 precision) -> DispatchPlan


def _plan(site: LinearSite, cfg):
    """The site's DispatchPlan (None when the cost model is missing or fails: default blocks)."""
    if site.layout is not None and hasattr(site.layout, "dispatch"):
        return site.layout
    import torch
    key = (site.tile_mask.fingerprint(), str(site.dtype), cfg.device, cfg.m_max, torch.get_float32_matmul_precision())
    if key not in _PLANS:
        try:
            from patchc.codegen.layout import plan_dispatch
            _PLANS[key] = plan_dispatch(site.tile_mask, site.dtype, device=cfg.device, m_max=cfg.m_max)
        except Exception as exc:  # noqa: BLE001 -- the cost model is advisory: fall back to defaults
            log.warning("patchc: cost model failed for %s (%s); default kernel blocks", site.fqn, exc)
            _PLANS[key] = None
        if len(_PLANS) > 4096:
            _PLANS.clear()
    return _PLANS[key]


def _example_m(site: LinearSite) -> Optional[int]:
    xv = site.x.meta.get("example_value") if hasattr(site.x, "meta") else None
    if xv is None or not xv.dim() or not all(isinstance(d, int) for d in xv.shape):
        return None                  # symbolic sizes: never int() them (that would add a guard)
    return xv.numel() // max(1, xv.shape[-1])


def generate_kernels(state: CompileState) -> None:
    cfg = state.config
    for s in state.sites:
        d = s.decision
        if d is None or d.action != "hybrid" or s.entry is None:
            continue
        interpret = cfg.kernel == "triton" and s.weight.device.type != "cuda"
        if interpret and not interpreter_active():
            raise RuntimeError(INTERPRET_MSG)
        force = cfg.kernel == "triton"
        plan = _plan(s, cfg)
        if plan is not None and s.entry.packed is None and getattr(plan, "row_order", None) is not None:
            s.entry.row_order = plan.row_order          # packed (once) by rewrite_linears in this order
        params = (s.n, s.k, str(s.dtype), s.tile_mask.tile, cfg.cache_dir, id(plan))
        runner = getattr(s.entry, "runner", None)
        bias = s.bias_node is not None
        try:
            if not isinstance(runner, HybridRunner) or getattr(runner, "params", None) != params:
                kw = dict(cache_dir=cfg.cache_dir)
                runner = (HybridRunner.from_plan(s.n, s.k, s.dtype, s.tile_mask.tile, plan, **kw) if plan is not None
                          else HybridRunner(s.n, s.k, s.dtype, s.tile_mask.tile, **kw))
                runner.params = params
            kernels = runner.kernels(bias, interpret, force)
            if not kernels:          # dense at every M: still generate the kernel kernel="triton" would run
                kernels = runner.kernels(bias, interpret, force=True)
        except UnsupportedSpec as exc:   # e.g. a tile with no power-of-two block >= 16
            log.info("patchc: no generated kernel for %s: %s; the reference path runs it", s.fqn, exc)
            s.decision = dataclasses.replace(d, kernel=None, reason=f"{d.reason}; no Triton kernel ({exc})")
            continue
        s.entry.runner = runner
        s.entry.kernels = kernels
        m = _example_m(s)
        current = runner.kernel_for(m, bias, interpret, force) if m else kernels[0]
        layout = d.layout
        if layout is None and plan is not None and hasattr(plan, "to_dict"):
            layout = plan.to_dict()
        s.decision = dataclasses.replace(d, kernel=current.name if current is not None else "dense", layout=layout)
