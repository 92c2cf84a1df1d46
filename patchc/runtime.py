"""Runtime: one entry type for what a rewritten call computes with, and the one function that
decides how a call runs.

An ``Entry`` serves one call of the ``patchc::hybrid_linear`` op: a single linear, or n sibling
linears (q/k/v, gate/up) fused into one kernel over their row-concatenated weights.  It knows its
members' masks and orientation, holds the packed form (packed once per weights' state, re-packed
when a weight changes: ``_version`` / data pointer), the masked dense weight the reference and
dense paths use, and the generated kernels.  ``choose_path`` is the one place that decides
whether a call runs a Triton kernel, the reference path (``F.linear`` with W ⊙ M: kernel
``"reference"``, or ``"auto"`` off CUDA), or dense (the cost model's choice at this M, or a
dtype the kernels are not built for).  Every path computes with the masked weight.

Ownership: an entry is owned by the compiled graphs that call it (``GraphRecord.entries``) and, once
its dense weight is released, by that weight.  The process-wide registry maps site ids to entries
weakly, so deleting a compiled model frees its entries and packed buffers.
"""
from __future__ import annotations

import functools
import itertools
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .codegen.launch import launch
from .stats import counters
from .maskops import apply_mask, cat_rows, holds_masked
from .packing import PackedWeight, pack, unpack
from .types import TileMask

log = logging.getLogger("patchc")

KERNEL_CHOICES = ("auto", "triton", "reference")
TRITON, REFERENCE, DENSE, DTYPE = "triton", "reference", "dense", "dtype"
_PATH_COUNTER = {TRITON: "triton_calls", REFERENCE: "reference_calls", DENSE: "dense_dispatch_calls",
                 DTYPE: "dtype_fallback_calls"}


@dataclass(eq=False)
class Member:
    """One linear of an entry: its mask, how its weight is stored, its weight (weakly)."""

    fqn: str
    tile_mask: TileMask
    transposed: bool                      # weight stored (in, out); the mask is (out, in)
    has_bias: bool
    weight_ref: weakref.ref

    @property
    def n(self) -> int:
        return self.tile_mask.shape[0]

    def oriented(self, w: Tensor) -> Tensor:
        return w.t() if self.transposed else w


def _stamp(weights) -> tuple:
    return tuple((w._version, w.data_ptr()) for w in weights)


class Entry:
    """The runtime state of one rewritten call site (1..n fused linears); see the module docstring."""

    def __init__(self, site_id: int, members: list[Member], tile_mask: TileMask):
        self.site_id = site_id
        self.members = members
        self.tile_mask = tile_mask                 # row-concatenation of the members' masks
        self.fqn = " + ".join(m.fqn for m in members)
        self.kernel = "auto"                       # KERNEL_CHOICES, set by the compile
        self.runner = None                         # codegen.runner.HybridRunner, set by generate_kernels
        self.kernels: list = []
        self.packed: Optional[PackedWeight] = None
        self.row_order = None
        self.released = False                      # dense weight freed: the packed form is the only copy
        self._packed_stamp = None
        self._dense = None                         # (stamp, device, dtype, W ⊙ M or None: the weights hold it)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Entry({self.site_id}, {self.fqn}, kernel={self.kernel}, released={self.released})"

    @property
    def n_sites(self) -> int:
        return len(self.members)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        w = self.members[0].weight_ref()
        return self.packed.dtype if self.packed is not None else (w.dtype if w is not None else None)

    def live_weights(self) -> Optional[list]:
        """The members' weights, or None when one is gone."""
        ws = [m.weight_ref() for m in self.members]
        return None if any(w is None for w in ws) else ws

    # ---- the packed form ---------------------------------------------------------------------
    def repack(self, weights, row_order=None) -> PackedWeight:
        """Pack the weights now (in ``row_order`` when given).  When the tile map is unchanged the
        new values are written into the existing buffers, so a CUDA graph captured on them reads
        the new weights (and no freed memory)."""
        if row_order is not None:
            self.row_order = row_order
        with torch.no_grad(), counters.timed("pack_seconds"):
            w = cat_rows([m.oriented(x) for m, x in zip(self.members, weights)]) if len(weights) > 1 \
                else self.members[0].oriented(weights[0])
            try:        # same tile map and row order: in place (packing.pack(out=))
                self.packed = pack(w, self.tile_mask, self.row_order, out=self.packed)
            except ValueError:
                self.packed = pack(w, self.tile_mask, self.row_order)
        self._packed_stamp = _stamp(weights)
        counters["packs"] += 1
        return self.packed

    def packed_for(self, weights) -> PackedWeight:
        """The packed weight, re-packed (with a warning) when a weight changed since packing."""
        if self.released:
            return self.packed
        stamp = _stamp(weights)
        if self.packed is None or stamp != self._packed_stamp:
            with self._lock:
                if self.packed is not None and stamp != self._packed_stamp:
                    log.warning("patchc: a weight of %s changed after compile; re-packing it", self.fqn)
                    counters["repacks"] += 1
                if self.packed is None or stamp != self._packed_stamp:
                    self.repack(weights)
        return self.packed

    # ---- the masked dense weight -----------------------------------------------------------------
    def _dense_state(self, weights, x: Tensor):
        """(stamp, device, dtype, W ⊙ M or None) for ``weights``: None when every member's weight
        already holds W ⊙ M on x's device and dtype (then the weights serve as they are: no copy);
        rebuilt, with a warning and a ``repacks`` count, when a weight changed."""
        stamp = _stamp(weights)
        hit = self._dense
        if hit is not None and hit[:3] == (stamp, x.device, x.dtype):
            return hit
        with self._lock:
            hit = self._dense
            if hit is not None and hit[0] != stamp:
                log.warning("patchc: a weight of %s changed after compile; rebuilding its masked copy", self.fqn)
                counters["repacks"] += 1
            if hit is None or hit[:3] != (stamp, x.device, x.dtype):
                with counters.timed("masked_weight_seconds"):
                    same = all(w.device == x.device and w.dtype == x.dtype for w in weights)
                    held = same and all(holds_masked(m.oriented(w), m.tile_mask.unpacked().to(w.device))
                                        for m, w in zip(self.members, weights))
                    ws = None if held else cat_rows(
                        [m.oriented(apply_mask(w, m.tile_mask, m.transposed)) for m, w in zip(self.members, weights)]
                    ).to(device=x.device, dtype=x.dtype)
                hit = self._dense = (stamp, x.device, x.dtype, ws)
                counters["masked_weight_builds"] += 1
        return hit

    def dense_linear(self, x: Tensor, weights, bias: Optional[Tensor]) -> Tensor:
        """``F.linear`` with W ⊙ M: from the packed form when released (unpacked per call, nothing
        kept), else from the users' weights when they hold W ⊙ M, else from a cached masked copy."""
        if self.released:
            return F.linear(x, unpack(self.packed).to(device=x.device, dtype=x.dtype), bias)
        ws = self._dense_state(weights, x)[3]
        if ws is not None:
            return F.linear(x, ws, bias)
        if len(weights) == 1:
            return F.linear(x, self.members[0].oriented(weights[0]), bias)
        y = torch.cat([F.linear(x, m.oriented(w)) for m, w in zip(self.members, weights)], -1)
        return y if bias is None else y + bias

    def member_weight(self, i: int, weight: Tensor) -> Tensor:
        """Member ``i``'s W ⊙ M in its stored orientation, a fresh tensor (the backward and the
        masked fallback use it)."""
        m = self.members[i]
        if self.released:
            w = unpack(self.packed).to(device=weight.device, dtype=weight.dtype)
            return w.t().contiguous() if m.transposed else w
        return apply_mask(weight, m.tile_mask, m.transposed)

    def release(self, weight: Tensor) -> None:
        """Free the dense storage of a single-member entry's ``weight`` (inference only).  The
        weight keeps its shape as a stride-0 view of one zero and holds this entry (the packed
        form is now the only copy of its values); the compile and ``patchc.release`` hooks make
        the module compute from the packed form and ``state_dict`` return W ⊙ M."""
        if self.n_sites != 1:
            raise ValueError(f"patchc: cannot release the fused entry {self.fqn}")
        self.packed_for([weight])
        self.released = True
        self._dense = None
        with torch.no_grad():
            weight.data = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        weight._patchc_entry = self
        counters["released"] += 1

    # ---- a call -------------------------------------------------------------------------------------
    def bias_of(self, biases, like: Tensor) -> Optional[Tensor]:
        """The members' biases (those that exist, in member order) as one [N] vector (zeros where
        a member has none); None when no member has one."""
        if not biases:
            return None
        if len(self.members) == 1:
            return biases[0].to(like.dtype)
        it = iter(biases)
        return torch.cat([next(it).to(like.dtype) if m.has_bias else like.new_zeros(m.n) for m in self.members])

    def run(self, x: Tensor, weights, biases) -> Tensor:
        bias = self.bias_of(biases, x)
        n = self.n_sites
        counters["linear_calls"] += n
        if n > 1:
            counters["fused_calls"] += 1
        path, kernel = choose_path(self, x, bias is not None)
        counters[_PATH_COUNTER[path]] += n
        if path == TRITON:
            return launch(kernel, x, self.packed_for(weights), bias)
        return self.dense_linear(x, weights, bias)


# ---- the path of a call ----------------------------------------------------------------------------
def uses_kernels(entry: Entry, device: torch.device) -> bool:
    """Whether ``entry``'s calls on ``device`` may run generated kernels: ``kernel="triton"``, or
    ``"auto"`` on CUDA (``"reference"``, and ``"auto"`` off CUDA, compute ``F.linear`` with W ⊙ M)."""
    return entry.kernel == "triton" or (entry.kernel == "auto" and device.type == "cuda")


def choose_path(entry: Entry, x: Tensor, has_bias: bool):
    """``(path, kernel)`` of one call: ``TRITON`` with the kernel for x's row count, ``DENSE``
    where the cost model says dense wins at that M, ``DTYPE`` for an input dtype the kernels
    were not built for, else ``REFERENCE``.  The one place that decides."""
    if not uses_kernels(entry, x.device) or entry.runner is None:
        return REFERENCE, None
    if entry.dtype is not None and x.dtype != entry.dtype:
        return DTYPE, None
    m = x.numel() // max(1, x.shape[-1])
    kernel = entry.runner.kernel_for(m, has_bias, x.device.type != "cuda", entry.kernel == "triton")
    return (TRITON, kernel) if kernel is not None else (DENSE, None)


def needs_packing(entry: Entry, device: torch.device) -> bool:
    """Whether the compile packs ``entry`` now: only what reads the packed form needs it (the
    generated kernels, a released entry); the reference path computes from the users' weights,
    so on CPU nothing is packed."""
    return entry.released or uses_kernels(entry, device)


# ---- the registry: site id -> entry, weakly ----------------------------------------------------------
_REGISTRY: "weakref.WeakValueDictionary[int, Entry]" = weakref.WeakValueDictionary()
_IDS = itertools.count()
_REG_LOCK = threading.RLock()     # re-entrant: a weakref callback may run under it (GC)


_BY_KEY: dict = {}          # (weight ids, mask fingerprints, orientation, biases) -> weakref to the entry


def entry_for(weights, masks, transposed, fqns, has_bias, tile_mask: Optional[TileMask] = None) -> Entry:
    """The entry for the linears with these weights and masks (one linear, or fused siblings in
    output order): the live one when these weights already have it (a recompile for new shapes
    reuses it, so a weight is packed once per process), else a new registered one.  The caller
    owns it; the registry holds it weakly."""
    from .maskops import concat_masks
    key = (tuple(id(w) for w in weights), tuple(m.fingerprint() for m in masks), tuple(map(bool, transposed)),
           tuple(map(bool, has_bias)))
    with _REG_LOCK:
        ref = _BY_KEY.get(key)
        e = ref() if ref is not None else None
        if e is not None and all(m.weight_ref() is w for m, w in zip(e.members, weights)):
            return e
    members = [Member(f, m, bool(t), bool(b), weakref.ref(w))
               for w, m, t, f, b in zip(weights, masks, transposed, fqns, has_bias)]
    if tile_mask is None:
        tile_mask = masks[0] if len(masks) == 1 else concat_masks(list(masks))
    with _REG_LOCK:
        e = Entry(next(_IDS), members, tile_mask)
        _REGISTRY[e.site_id] = e
        _BY_KEY[key] = weakref.ref(e, functools.partial(_forget, key))
    return e


def _forget(key, ref) -> None:
    with _REG_LOCK:
        if _BY_KEY.get(key) is ref:
            del _BY_KEY[key]


def released_entry(weight: Tensor) -> Optional[Entry]:
    """The entry holding ``weight``'s values after ``release_dense`` (None when not released)."""
    return getattr(weight, "_patchc_entry", None)


def get_entry(site_id: int) -> Entry:
    e = _REGISTRY.get(site_id)
    if e is None:
        raise RuntimeError(f"patchc: site {site_id} is not registered in this process (its compiled model "
                           "was freed?)")
    return e


def live_entries() -> list[Entry]:
    """Every entry alive in this process (``patchc.memory_report`` reads them)."""
    return list(_REGISTRY.values())
