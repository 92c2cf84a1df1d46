"""``MaskPlan``: {module FQN: TileMask} plus how it was made, stored as one safetensors file."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Iterator, Optional

import torch
from torch import nn

from .files import atomic_path
from .modules import fingerprint, is_linear, oriented_weight, select_linears
from .planfile import FORMAT, FORMAT_VERSION, READ_VERSIONS, MaskPlanError  # noqa: F401 (public here)
from .types import DENSE, SPARSE24, TileMask, check_tile, expand_tiles, grid_of, sparse_allowed

log = logging.getLogger("patchc")

class MaskPlan(Mapping):
    """A read-only mapping ``module FQN -> TileMask`` with ``.meta`` (tile, method, fingerprint…).

    Every entry is validated when the plan is built (``MaskPlanError`` naming the layer, the tile
    and the group at fault), again before ``save`` (a mask edited in place since is caught), and
    when a file is loaded."""

    def __init__(self, masks: Mapping[str, TileMask], meta: Optional[dict] = None):
        self._masks = dict(masks)
        for k, v in self._masks.items():
            if not isinstance(v, TileMask):
                raise TypeError(f"plan entry {k!r} is a {type(v).__name__}, expected TileMask")
        self.validate()
        self.meta = dict(meta or {})
        if self._masks and "tile" not in self.meta:
            self.meta["tile"] = list(next(iter(self._masks.values())).tile)

    # Mapping protocol
    def __getitem__(self, key: str) -> TileMask:
        return self._masks[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return (f"MaskPlan({len(self)} layers, sparsity={self.sparsity():.4f}, "
                f"method={self.meta.get('method', '?')!r})")

    # ---- statistics ----------------------------------------------------------------------
    def sparsity(self) -> float:
        """Pruned weights / weights of the planned linears (biases excluded)."""
        tot = sum(m.mask.numel() for m in self._masks.values())
        return sum(m.pruned() for m in self._masks.values()) / max(1, tot)

    def per_layer(self) -> dict[str, dict]:
        return {name: {"shape": list(m.shape), "tile": list(m.tile), "tiles": m.tile_kind.numel(),
                       "sparse_tiles": m.num_sparse_tiles(), "frac_sparse": m.fraction_sparse_tiles(),
                       "sparsity": m.sparsity()}
                for name, m in self._masks.items()}

    def validate(self) -> "MaskPlan":
        """Check every mask (``patchc.tiles.check_mask``, cached per mask until it is edited);
        ``MaskPlanError`` names the layer, the tile and the group at fault."""
        for name, m in self._masks.items():
            try:
                m.validate(name)
            except MaskPlanError:
                raise
            except ValueError as exc:
                raise MaskPlanError(str(exc)) from None
        return self

    def validate_against(self, model: nn.Module) -> "MaskPlan":
        """Raise listing every FQN the model lacks, that is not a linear, or whose shape differs."""
        mods = dict(model.named_modules())
        problems = []
        for name, m in self._masks.items():
            mod = mods.get(name)
            if mod is None:
                problems.append(f"{name}: no such module in the model")
            elif not is_linear(mod):
                problems.append(f"{name}: is a {type(mod).__name__}, not a linear layer")
            elif tuple(oriented_weight(mod).shape) != m.shape:
                problems.append(f"{name}: plan shape {m.shape} (out, in) but the model's weight is "
                                f"{tuple(oriented_weight(mod).shape)}")
        if problems:
            raise MaskPlanError(f"mask plan does not fit the model ({len(problems)} mismatch"
                                f"{'es' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems))
        return self

    # ---- files -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, encoding: str = "codes") -> str:
        """Write one ``.safetensors`` file (no pickle): per layer ``<fqn>.tile_kind`` (uint8) and
        ``<fqn>.codes`` (``encoding="codes"``, format version 2: dense tiles cost nothing, each
        group of a 2:4 tile one 4-bit code, see ``patchc.maskcodes``) or ``<fqn>.mask`` (``"bits"``,
        version 1: one bit per weight, what patchc before version 2 reads); JSON metadata in the
        header.  The plan is validated first; the write is atomic (temp file + rename), mode 0644."""
        from safetensors.torch import save_file

        from . import maskcodes

        if encoding not in ("codes", "bits"):
            raise ValueError(f"encoding must be 'codes' or 'bits', got {encoding!r}")
        self.validate()
        path = os.fspath(path)
        tensors, entries = {}, {}
        for name, m in self._masks.items():
            tensors[f"{name}.tile_kind"] = m.tile_kind.contiguous()
            entries[name] = {"shape": list(m.shape), "tile": list(m.tile)}
            if encoding == "codes":
                tensors[f"{name}.codes"], entries[name]["groups"] = maskcodes.encode(m)
            else:
                tensors[f"{name}.mask"] = m.bits.contiguous()
        header = {"format": FORMAT, "version": 2 if encoding == "codes" else 1, "meta": self.meta,
                  "entries": entries}
        if encoding == "codes":
            header["encoding"] = maskcodes.DESCRIPTION
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"patchc": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MaskPlan":
        """Read a plan written by ``save`` (either format version); every mask is validated and
        errors name the file, the layer and what is wrong."""
        from .planfile import read_plan
        return read_plan(cls, path)


# ---- building plans from weights -------------------------------------------------------------
def mask_from_zeros(w: torch.Tensor, tile=(128, 128), name: Optional[str] = None) -> TileMask:
    """A TileMask from the zeros already in ``w`` (out, in).

    A tile is 2:4 iff every group of 4 along K has <= 2 non-zeros; its mask keeps exactly 2 per
    group, preferring the non-zeros (then the lowest positions).
    """
    tile = check_tile(tile, name=name)
    w = w.detach()
    n, k = w.shape
    nz = w != 0
    k4 = k // 4 * 4
    g = nz[:, :k4].reshape(n, k4 // 4, 4)
    group_ok = g.sum(-1) <= 2                                         # [n, k4/4]
    tn, tk = tile
    nN, nK = grid_of((n, k), tile)
    # per-tile "all groups ok": pad groups to the tile grid, reduce
    ok = torch.ones(nN * tn, nK * tk // 4, dtype=torch.bool)
    ok[:n, : k4 // 4] = group_ok
    if k4 < k:                                                        # a partial group is never 2:4
        ok[:n, k4 // 4:] = False
    tile_ok = ok.view(nN, tn, nK, tk // 4).all(3).all(1) & sparse_allowed(tile, (n, k))
    # keep exactly 2 per group: rank positions by (non-zero first, then position)
    score = g.to(torch.int8) * 8 + torch.arange(3, -1, -1, dtype=torch.int8)
    top2 = score.topk(2, dim=-1).indices
    keep = torch.zeros_like(g).scatter_(-1, top2, True).reshape(n, k4)
    mask24 = torch.ones(n, k, dtype=torch.bool)
    mask24[:, :k4] = keep
    return TileMask.from_kinds(tile, tile_ok.to(torch.uint8), mask24, name=name)


def infer_plan(model: nn.Module, tile=(128, 128), include=None, exclude=None) -> MaskPlan:
    """Build a plan from the zeros already in the weights of the model's linears."""
    tile = check_tile(tile)
    mods = select_linears(model, include, exclude)
    masks = {name: mask_from_zeros(oriented_weight(m), tile, name) for name, m in mods.items()}
    return MaskPlan(masks, {"tile": list(tile), "method": "inferred", "fingerprint": fingerprint(model, mods)})


@torch.no_grad()
def apply_plan(model: nn.Module, plan: MaskPlan) -> nn.Module:
    """Zero the pruned weights in place, so the model itself is a valid sparse checkpoint."""
    plan.validate_against(model)
    mods = dict(model.named_modules())
    for name, m in plan.items():
        w = oriented_weight(mods[name])
        w.mul_(m.mask.to(device=w.device, dtype=w.dtype))
    log.info("patchc: applied a %d-layer plan (sparsity %.4f) to the weights in place", len(plan), plan.sparsity())
    return model


__all__ = ["MaskPlan", "MaskPlanError", "infer_plan", "apply_plan", "mask_from_zeros",
           "DENSE", "SPARSE24", "expand_tiles"]
