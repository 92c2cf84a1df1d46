"""The cost model's ``DispatchPlan`` of a tile map, computed once: memoised in this process and on
disk (``<cache root>/plans/<key>.json``, ``patchc.jsoncache``), so a second process planning the
same model reads its plans instead of running the cost model again (0.7 B Llama, 168 linears:
~3.8 s -> ~0.1 s).

The disk key is a sha256 of everything a plan depends on (the tile map, dtype, the planning
device's full spec, ``m_max``, fp32 matmul precision) plus the cost model's sources, so editing the
model invalidates every entry; an unreadable or mismatching entry is recomputed and rewritten.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

from patchc import jsoncache
from patchc.caches import BoundedCache
from patchc.stats import counters

log = logging.getLogger("patchc")

PLANS = BoundedCache("dispatch plans", 4096)            # plan_key -> DispatchPlan
PREDICTIONS = BoundedCache("fusion predictions", 4096)  # fusion key -> predictions


def plan_key(tile_mask, dtype, device, m_max: int, cache_dir=None) -> tuple:
    """What a plan depends on: the tile map (not the 2:4 patterns), dtype, the planning device
    (resolved: ``None`` is the current GPU / $PATCHC_DEVICE / h200, with calibrated constants
    from ``cache_dir``'s cache root), m_max, fp32 precision."""
    from patchc.codegen.devices import dtype_key, get_device
    kind = tile_mask.tile_kind
    return (tuple(tile_mask.tile), tuple(tile_mask.shape), kind.numpy().tobytes(), dtype_key(dtype),
            get_device(device, cache_dir), int(m_max), torch.get_float32_matmul_precision())


@functools.lru_cache(maxsize=1)
def model_hash() -> str:
    """sha256 of the cost model's sources and data (the shipped SASS counts): a disk plan is valid
    only for the code that made it."""
    import patchc.codegen.layout as layout
    import patchc.packing as packing
    here = Path(layout.__file__).resolve().parent
    h = hashlib.sha256()
    core = Path(packing.__file__).resolve().parent
    for path in sorted(here.glob("*.py")) + sorted(here.glob("*.json")) + sorted(core.glob("pack*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def disk_key(key: tuple) -> str:
    """The file name of a plan on disk: sha256 of ``plan_key`` (the device as its full spec)."""
    h = hashlib.sha256(model_hash().encode())
    for part in key:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def cached_json(kind: str, key: tuple, compute, cache_dir=None):
    """``compute()`` memoised on disk under ``<cache root>/<kind>/`` by the sha256 of ``key`` and
    the cost model's sources (``cache_dir=False``: not on disk)."""
    return jsoncache.cached(kind, disk_key(key), compute, cache_dir)


def plan_for(tile_mask, dtype, device, m_max: int, cache_dir=None):
    """The ``DispatchPlan`` of a tile map: from this process's memo, else from the disk cache
    under ``cache_dir`` (``False`` = no disk), else the cost model."""
    from patchc.codegen.devices import get_device
    from patchc.codegen.layout import DispatchPlan, plan_dispatch
    key = plan_key(tile_mask, dtype, device, m_max, cache_dir)
    plan = PLANS.get(key)
    if plan is not None:
        return plan
    dev = get_device(device, cache_dir)
    fresh = []

    def compute():
        with counters.timed("cost_model_seconds"):
            fresh.append(plan_dispatch(tile_mask, dtype, device=dev, m_max=m_max))
        return {"plan": fresh[0].to_dict(), "row_order": fresh[0].row_order.tolist()}

    value = cached_json("plans", key, compute, cache_dir)
    if fresh:
        plan = fresh[0]
    else:
        try:
            plan = DispatchPlan.from_dict(value["plan"], value["row_order"])
        except (KeyError, TypeError, ValueError) as exc:       # a well-formed JSON of the wrong shape
            log.info("patchc: recomputing a malformed cost-model cache entry (%s)", exc)
            with counters.timed("cost_model_seconds"):
                plan = plan_dispatch(tile_mask, dtype, device=dev, m_max=m_max)
            name = disk_key(key)
            jsoncache.write(jsoncache.entry_path(cache_dir, "plans", name), name,
                            {"plan": plan.to_dict(), "row_order": plan.row_order.tolist()})
    return PLANS.put(key, plan)


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
