"""Pass: generate the Triton kernels of every ``hybrid`` site and attach their launcher.

For each hybrid site: build a ``HybridRunner`` (one spec per M bucket; BLOCK_N / BLOCK_K fixed
per weight), render + cache + list its kernels on the runtime entry (``entry.kernels``), set
``entry.runner`` (what ``patchc::hybrid_linear`` launches on CUDA, or everywhere with
``kernel="triton"``), and record the kernel name for the example M in the site's decision.
Kernels are generated on machines without a GPU too, so they can be inspected there.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from patchc.codegen.launch import INTERPRET_MSG, M_BUCKETS, HybridRunner, interpreter_active
from patchc.codegen.spec import UnsupportedSpec

from .state import CompileState, LinearSite

log = logging.getLogger("patchc")
_LAUNCH_FIELDS = ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages")


def _field(obj, name):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _plans(layout) -> dict:
    """Per-M-bucket launch parameters from the cost model's layout, when it gives them.

    Reads ``layout.dispatch``: a list of ``(m_max or None, {block_m, split_k, num_warps,
    num_stages})``, plus ``layout.block_n`` / ``layout.block_k`` (fixed per weight).  Anything
    missing falls back to ``codegen.launch.default_blocks``.
    """
    if layout is None:
        return {}
    fixed = {f: _field(layout, f) for f in ("block_n", "block_k") if _field(layout, f)}
    plans = {b: dict(fixed) for b in M_BUCKETS}
    for m_max, plan in (_field(layout, "dispatch") or []):
        bucket = next(b for b in M_BUCKETS if b is None or (m_max is not None and m_max <= b))
        plans[bucket].update({f: _field(plan, f) for f in _LAUNCH_FIELDS if _field(plan, f) is not None})
        plans[bucket].update(fixed)
    return plans


def _example_m(site: LinearSite) -> Optional[int]:
    xv = site.x.meta.get("example_value") if hasattr(site.x, "meta") else None
    try:
        return int(xv.numel() // max(1, xv.shape[-1])) if xv is not None else None
    except Exception:  # noqa: BLE001 -- symbolic sizes
        return None


def generate_kernels(state: CompileState) -> None:
    cfg = state.config
    for s in state.sites:
        d = s.decision
        if d is None or d.action != "hybrid" or s.entry is None:
            continue
        interpret = cfg.kernel == "triton" and s.weight.device.type != "cuda"
        if interpret and not interpreter_active():
            raise RuntimeError(INTERPRET_MSG)
        tm = s.tile_mask
        runner = getattr(s.entry, "runner", None)
        params = (s.n, s.k, str(s.dtype), tm.tile, cfg.cache_dir, repr(_plans(s.layout)))
        try:
            if not isinstance(runner, HybridRunner) or getattr(runner, "params", None) != params:
                runner = HybridRunner(s.n, s.k, s.dtype, tm.tile, cache_dir=cfg.cache_dir, plans=_plans(s.layout))
                runner.params = params
            bias = s.bias_node is not None
            kernels = runner.kernels(bias, interpret)
        except UnsupportedSpec as exc:   # e.g. a tile with no power-of-two block >= 16
            log.info("patchc: no generated kernel for %s: %s; the reference path runs it", s.fqn, exc)
            s.decision = dataclasses.replace(d, kernel=None, reason=f"{d.reason}; reference kernel ({exc})")
            continue
        s.entry.runner = runner
        s.entry.kernels = kernels
        m = _example_m(s)
        current = runner.kernel_for(m, bias, interpret) if m else kernels[0]
        s.decision = dataclasses.replace(d, kernel=current.name)
