"""What a plan buys at decode, by the cost model (``patchc.codegen.layout``, SASS-based, the same
one the backend plans kernels with): per linear the predicted µs of one M = 1 call, dense and as
planned, and the weights of latency-aware mask learning.

- :func:`plan_decode_speedup`: predicted decode (M = 1) time of a plan's linears, dense vs the
  dispatch the backend would choose (dense where the hybrid kernel does not win), per layer and
  for all of them together;
- :func:`density_weights`: per linear, the predicted µs a weight saves when its layer is all 2:4,
  normalised to a parameter-weighted mean of 1 — ``LearnConfig.density_weights`` for
  ``patchc learn --latency-aware``: the density penalty pushes tiles towards 2:4 in proportion to
  what they save, so the budget goes where 2:4 tiles pay (a small layer whose kernel is bound by
  fixed costs, or that the hybrid kernel never beats, saves ~nothing and gets weight ~0).

The default planning target is the H200 in bf16 (``device=``, ``dtype=`` change it).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Mapping, Optional

import torch

from .types import sparse_allowed

DEFAULT_DEVICE = "h200"
DEFAULT_DTYPE = "bf16"


def _us_at_1(tile_mask, dtype, device) -> tuple[float, float]:
    """(dense µs, planned µs) of one M = 1 call of a tile map (the dispatch the backend picks)."""
    from .codegen.layout import DENSE, candidate_us, plan_dispatch
    plan = plan_dispatch(tile_mask, dtype, device)
    chosen = plan.select(1)
    dense = candidate_us(tile_mask, 1, DENSE, dtype, device)
    return dense, (dense if chosen == DENSE else candidate_us(tile_mask, 1, chosen, dtype, device))


def plan_decode_speedup(plan, dtype=DEFAULT_DTYPE, device: Optional[str] = DEFAULT_DEVICE) -> dict:
    """``{"speedup", "dense_us", "planned_us", "per_layer": {fqn: {"dense_us", "planned_us",
    "speedup"}}}``: the cost model's time of one decode step (M = 1) through the plan's linears,
    dense vs as planned.  Only the planned linears count (not attention, norms, the LM head)."""
    per, d_tot, p_tot = {}, 0.0, 0.0
    for name in plan:
        d, p = _us_at_1(plan[name], dtype, device)
        per[name] = {"dense_us": d, "planned_us": p, "speedup": d / p}
        d_tot, p_tot = d_tot + d, p_tot + p
    return {"speedup": d_tot / p_tot if p_tot else 1.0, "dense_us": d_tot, "planned_us": p_tot, "per_layer": per,
            "device": device, "dtype": dtype}


def _all_sparse(shape, tile):
    kind = sparse_allowed(tile, shape).to(torch.uint8)
    return SimpleNamespace(tile_kind=kind, tile=tuple(tile), shape=tuple(shape))


def layer_savings(shapes: Mapping[str, tuple], tile=(128, 128), dtype=DEFAULT_DTYPE,
                  device: Optional[str] = DEFAULT_DEVICE) -> dict[str, float]:
    """``{fqn: predicted µs saved per weight}`` of each (out, in) shape when every tile that can be
    2:4 is, at M = 1 (0 where the backend would keep it dense)."""
    out = {}
    for name, shape in shapes.items():
        d, p = _us_at_1(_all_sparse(shape, tile), dtype, device)
        out[name] = max(0.0, d - p) / (shape[0] * shape[1])
    return out


def density_weights(shapes: Mapping[str, tuple], tile=(128, 128), dtype=DEFAULT_DTYPE,
                    device: Optional[str] = DEFAULT_DEVICE) -> dict[str, float]:
    """``LearnConfig.density_weights`` for latency-aware learning: :func:`layer_savings` scaled so
    that their mean over all weights is 1 (a plan with every weight counted once has the same
    penalty as by count).  ``shapes``: ``{fqn: (out, in)}`` of the linears learned."""
    save = layer_savings(shapes, tile, dtype, device)
    n = {k: s[0] * s[1] for k, s in shapes.items()}
    mean = sum(save[k] * n[k] for k in shapes) / max(1, sum(n.values()))
    if mean <= 0:
        raise ValueError(f"density_weights: the cost model predicts no decode saving for any layer on {device} "
                         f"({dtype}, tile {tuple(tile)}); latency-aware learning has nothing to weigh")
    return {k: save[k] / mean for k in shapes}


def check_device(name: Optional[str]) -> str:
    """The planning device's name; ``ValueError`` listing the known ones for an unknown name."""
    from .codegen.devices import get_device
    return get_device(name).name


def model_shapes(model, names) -> dict[str, tuple]:
    """``{fqn: (out, in)}`` of the named linears of ``model``."""
    from .modules import oriented_weight
    mods = dict(model.named_modules())
    return {n: tuple(oriented_weight(mods[n]).shape) for n in names}


__all__ = ["plan_decode_speedup", "layer_savings", "density_weights", "model_shapes", "check_device"]
