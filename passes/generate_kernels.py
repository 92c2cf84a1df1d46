"""Pass: generate the Triton kernels of every ``hybrid`` site and attach their launcher.

For each hybrid site: take the cost model's ``DispatchPlan`` (``site.layout``, set by
``choose_layouts``; computed through its memo when that pass did not run), build a
``HybridRunner`` (one kernel per hybrid M range; BLOCK_N / BLOCK_K fixed per weight), render +
cache its kernels and list them on the runtime entry (``entry.kernels``), set ``entry.runner``
(what ``patchc::hybrid_linear`` launches on CUDA, or everywhere with ``kernel="triton"``), and
record the kernel for the example M in the site's decision ("dense" where the plan dispatches to
dense).  Kernels are generated on machines without a GPU too, so they can be inspected there.
Errors of the cost model are not caught: they are bugs, not a reason to run default blocks.
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


def _plan(site: LinearSite, cfg):
    """The site's DispatchPlan (``choose_layouts`` sets it; else the same memoised plan)."""
    if site.layout is not None and hasattr(site.layout, "dispatch"):
        return site.layout
    from .choose_layouts import plan_for
    return plan_for(site.tile_mask, site.dtype, cfg.device, cfg.m_max, cfg.cache_dir)


def _example_m(site: LinearSite) -> Optional[int]:
    xv = site.x.meta.get("example_value") if hasattr(site.x, "meta") else None
    if xv is None or not xv.dim() or not all(isinstance(d, int) for d in xv.shape):
        return None                  # symbolic sizes: never int() them (that would add a guard)
    return xv.numel() // max(1, xv.shape[-1])


def _attach(entry, n, k, dtype, tile, plan, bias: bool, cfg, interpret: bool, force: bool):
    """Build (or reuse) the entry's runner for ``plan`` and generate its kernels; returns them."""
    params = (n, k, str(dtype), tuple(tile), cfg.cache_dir, id(plan))
    runner = getattr(entry, "runner", None)
    if not isinstance(runner, HybridRunner) or getattr(runner, "params", None) != params:
        runner = HybridRunner.from_plan(n, k, dtype, tile, plan, cache_dir=cfg.cache_dir)
        runner.params = params
    kernels = runner.kernels(bias, interpret, force)
    if not kernels:          # dense at every M: still generate the kernel kernel="triton" would run
        kernels = runner.kernels(bias, interpret, force=True)
    entry.runner, entry.kernels = runner, kernels
    return runner, kernels


def generate_kernels(state: CompileState) -> None:
    cfg = state.config
    groups: dict = {}                  # fused group -> (runner, kernels) or the UnsupportedSpec
    for s in state.sites:
        d = s.decision
        if d is None or d.action != "hybrid" or s.entry is None:
            continue
        interpret = cfg.kernel == "triton" and s.weight.device.type != "cuda"
        if interpret and not interpreter_active():
            raise RuntimeError(INTERPRET_MSG)
        force = cfg.kernel == "triton"
        grp = getattr(s, "group", None)          # fused by fuse_siblings: the group's kernels run it
        try:
            if grp is not None:
                if grp not in groups:
                    try:
                        groups[grp] = _attach(grp.entry, grp.n, s.k, s.dtype, s.tile_mask.tile, grp.plan,
                                              any(m.bias_node is not None for m in grp.members), cfg, interpret, force)
                    except UnsupportedSpec as exc:
                        groups[grp] = exc
                if isinstance(groups[grp], UnsupportedSpec):
                    raise groups[grp]
                runner, kernels = groups[grp]
                bias = any(m.bias_node is not None for m in grp.members)
            else:
                plan = _plan(s, cfg)
                if s.entry.packed is None:
                    s.entry.row_order = plan.row_order          # packed (once) by rewrite_linears in this order
                bias = s.bias_node is not None
                runner, kernels = _attach(s.entry, s.n, s.k, s.dtype, s.tile_mask.tile, plan, bias, cfg, interpret,
                                          force)
        except UnsupportedSpec as exc:   # e.g. a tile with no power-of-two block >= 16
            log.info("patchc: no generated kernel for %s: %s; the reference path runs it", s.fqn, exc)
            s.decision = dataclasses.replace(d, kernel=None, reason=f"{d.reason}; no Triton kernel ({exc})")
            continue
        m = _example_m(s)
        current = runner.kernel_for(m, bias, interpret, force) if m else kernels[0]
        layout = d.layout
        if layout is None:
            from .choose_layouts import layout_record
            layout = layout_record(_plan(s, cfg))
        s.decision = dataclasses.replace(d, kernel=current.name if current is not None else "dense", layout=layout)
