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

Plans are cached twice: in this process (``PLANS``) and on disk next to the generated kernels
(``<cache_dir>/plans/<key>.json``, one small JSON per tile map), so a second process planning the
same model reads its plans instead of running the cost model again (0.7 B Llama, 168 linears:
~3.8 s -> ~0.1 s).  The disk key is a sha256 of everything a plan depends on plus the source of
the cost model (``codegen/cost.py``, ``layout.py``, ``devices.py``, ``patchc/packing.py``), so
editing the model invalidates every entry; an unreadable or mismatching entry is recomputed and
rewritten atomically.

Planning device: the ``device=`` option when given, else the current CUDA device, else
``$PATCHC_DEVICE``, else h200 (``codegen.devices.get_device``, also behind
``PatchConfig.planning_device()``).  Errors of the cost model propagate: they are bugs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

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


@functools.lru_cache(maxsize=1)
def model_hash() -> str:
    """sha256 of the cost model's sources: a disk plan is valid only for the code that made it."""
    import patchc.codegen.layout as layout
    import patchc.packing as packing
    here = Path(layout.__file__).resolve().parent
    h = hashlib.sha256()
    for path in (here / "cost.py", here / "layout.py", here / "devices.py", Path(packing.__file__).resolve()):
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


def _disk_path(cache_dir, kind: str, name: str) -> Path:
    from patchc.files import cache_root
    return cache_root(cache_dir) / kind / f"{name}.json"


def disk_get(path: Path, name: str):
    """The ``value`` stored under ``path`` for ``name``, or None (missing, unreadable, foreign)."""
    try:
        with open(path) as f:
            d = json.load(f)
        return d["value"] if isinstance(d, dict) and d.get("key") == name else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("patchc: ignoring unreadable cost-model cache entry %s (%s)", path, exc)
        return None


def disk_put(path: Path, name: str, value) -> None:
    from patchc.files import atomic_write
    try:
        atomic_write(path, json.dumps({"key": name, "value": value}))
    except OSError as exc:                      # a read-only cache costs time, not correctness
        log.info("patchc: could not write the cost-model cache entry %s (%s)", path, exc)


def cached_json(kind: str, key: tuple, compute, cache_dir=None):
    """``compute()`` (a JSON-able value) memoised on disk under ``<cache_dir>/<kind>/`` by the
    sha256 of ``key`` and the cost model's sources (``cache_dir=False``: not on disk)."""
    if cache_dir is False:
        return compute()
    name = disk_key(key)
    path = _disk_path(cache_dir, kind, name)
    value = disk_get(path, name)
    if value is None:
        value = compute()
        disk_put(path, name, value)
    return value


def plan_for(tile_mask, dtype, device, m_max: int, cache_dir=None):
    """The ``DispatchPlan`` of a tile map: from this process's memo, else from the disk cache
    under ``cache_dir`` (the kernel cache dir; ``False`` = no disk), else the cost model."""
    from patchc.codegen.layout import DispatchPlan, plan_dispatch
    key = plan_key(tile_mask, dtype, device, m_max)
    plan = PLANS.get(key)
    if plan is not None:
        return plan
    fresh = []

    def compute():
        fresh.append(plan_dispatch(tile_mask, dtype, device=device, m_max=m_max))
        return {"plan": fresh[0].to_dict(), "row_order": fresh[0].row_order.tolist()}

    value = cached_json("plans", key, compute, cache_dir)
    if fresh:
        plan = fresh[0]
    else:
        try:
            plan = DispatchPlan.from_dict(value["plan"], value["row_order"])
        except (KeyError, TypeError, ValueError) as exc:       # a well-formed JSON of the wrong shape
            log.info("patchc: recomputing a malformed cost-model cache entry (%s)", exc)
            plan = plan_dispatch(tile_mask, dtype, device=device, m_max=m_max)
            disk_put(_disk_path(cache_dir, "plans", disk_key(key)), disk_key(key),
                     {"plan": plan.to_dict(), "row_order": plan.row_order.tolist()})
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
        plan = plan_for(s.tile_mask, s.dtype, cfg.device, cfg.m_max, cfg.cache_dir)
        s.layout = plan
        if s.entry.packed is None:           # packed (once) by rewrite_linears in this order
            s.entry.row_order = plan.row_order
        layout = layout_record(plan)
        if plan.strategy == "dense" and runs_kernels(s, cfg):
            log.info("patchc: %s stays a masked dense linear: %s", s.fqn, plan.reason)
            s.decision = dataclasses.replace(d, action="dense", reason=DENSE_REASON, layout=layout)
            continue
        s.decision = dataclasses.replace(d, layout=layout)
