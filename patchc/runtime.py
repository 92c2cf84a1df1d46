"""Runtime: the packed-weight registry, the counters, and the ``patchc::`` custom ops.

The compiled graph calls ``torch.ops.patchc.hybrid_linear(x, weight, bias, site_id)``. The op
finds its packed buffers by ``site_id`` (inductor rejects ``get_attr`` constants in a backend's
graph); the weight is passed too so the op can notice an in-place change (``weight._version``)
and re-pack instead of computing with stale data.  Sites that fall back run
``patchc::masked_linear``, which multiplies by the mask on the fly, so every path computes with
the masked weight.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import PackedWeight, pack, unpack
from .types import TileMask

log = logging.getLogger("patchc")


class Counters(collections.Counter):
    """Process-wide event counts (``patchc.counters``): sites rewritten, op calls per path."""

    def reset(self) -> None:
        self.clear()


counters = Counters()


class SiteEntry:
    """One (weight, mask) pair known to the runtime: its packed form and how to run it."""

    def __init__(self, site_id: int, weight: Tensor, tile_mask: TileMask, transposed: bool, fqn: str):
        self.site_id = site_id
        self.fqn = fqn
        self.tile_mask = tile_mask
        self.transposed = transposed          # weight stored (in, out); the mask is (out, in)
        self._weight = weakref.ref(weight)
        self.kernel = "auto"                  # "auto" | "triton" | "reference" (set by the backend)
        self.runner = None                    # the hybrid launcher, set by codegen (None: reference)
        self.packed: Optional[PackedWeight] = None
        self.row_order = None
        self._mask_cache: dict = {}
        self._ref = None                      # (packed, unpacked weight) for the reference path
        self._lock = threading.Lock()
        self._version = None
        self._ptr = None
        self._weight_masked = False           # the user's weight already holds W ⊙ M (checked per pack)
        self.released = False                 # dense weight freed (release_dense): packed is the only copy

    # ---- packing ---------------------------------------------------------------------------
    def oriented(self, weight: Tensor) -> Tensor:
        return weight.t() if self.transposed else weight

    def repack(self, weight: Tensor, row_order=None) -> PackedWeight:
        if row_order is not None:
            self.row_order = row_order
        with torch.no_grad():
            w = self.oriented(weight)
            self.packed = pack(w, self.tile_mask, self.row_order)
            self._weight_masked = not bool(w[~self.tile_mask.mask.to(w.device)].any())
        self._version, self._ptr = weight._version, weight.data_ptr()
        counters["packs"] += 1
        return self.packed

    def packed_for(self, weight: Tensor) -> PackedWeight:
        """The packed weight, re-packed (with a warning) if ``weight`` changed since packing."""
        if self.released:
            return self.packed
        if self.packed is None or weight._version != self._version or weight.data_ptr() != self._ptr:
            with self._lock:
                if self.packed is not None and (weight._version != self._version or weight.data_ptr() != self._ptr):
                    log.warning("patchc: weight of %s changed after compile; re-packing it", self.fqn)
                    counters["repacks"] += 1
                if self.packed is None or weight._version != self._version or weight.data_ptr() != self._ptr:
                    self.repack(weight)
        return self.packed

    def reference_weight(self, p: PackedWeight, x: Tensor) -> Tensor:
        """The weight unpacked from ``p`` for the reference path, kept until the next re-pack
        (unpacking on every call made the CPU reference ~5x slower than dense on SmolLM2)."""
        hit = self._ref
        if hit is None or hit[0] is not p or hit[1].device != x.device or hit[1].dtype != x.dtype:
            hit = (p, unpack(p).to(device=x.device, dtype=x.dtype))
            self._ref = hit
        return hit[1]

    def dense_weight(self, p: PackedWeight, x: Tensor) -> Tensor:
        """(out, in) masked weight for a dense dispatch: the user's own weight when it already
        holds W ⊙ M (no extra memory), else the unpacked copy."""
        w = None if self.released or not self._weight_masked else self._weight()
        if w is None or w.device != x.device or w.dtype != x.dtype:
            return self.reference_weight(p, x)
        return self.oriented(w)

    def release(self, weight: Tensor) -> None:
        """Free the dense storage of ``weight`` (inference only): keep its shape as a stride-0
        view of one zero, mark it so later compiles use this entry, and serve every dense
        path from the packed form."""
        self.packed_for(weight)
        self.released = True
        with torch.no_grad():
            weight.data = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        weight._patchc_site = self.site_id
        counters["released"] += 1

    def mask_on(self, device, dtype) -> Tensor:
        key = (str(device), dtype)
        m = self._mask_cache.get(key)
        if m is None:
            m = self.tile_mask.mask.to(device=device, dtype=dtype)
            m = m.t() if self.transposed else m
            self._mask_cache[key] = m
        return m

    # ---- execution -------------------------------------------------------------------------
    def run_hybrid(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        p = self.packed_for(weight)
        counters["hybrid_calls"] += 1
        use_ref = self.kernel == "reference" or (self.kernel == "auto" and x.device.type != "cuda")
        if use_ref or self.runner is None:
            counters["reference_calls"] += 1
            return F.linear(x, self.reference_weight(p, x), bias)
        return self.runner(self, x, p, bias)


_REGISTRY: dict[int, SiteEntry] = {}
_BY_KEY: dict[tuple, int] = {}
_IDS = itertools.count()
_REG_LOCK = threading.Lock()


def register_site(weight: Tensor, tile_mask: TileMask, transposed: bool, fqn: str) -> SiteEntry:
    """The entry for (weight, mask), created and packed once per process and shared by every
    graph that uses the weight (recompiles for new shapes reuse it)."""
    key = (id(weight), tile_mask.fingerprint(), transposed)
    with _REG_LOCK:
        sid = _BY_KEY.get(key)
        if sid is not None:
            e = _REGISTRY[sid]
            if e._weight() is weight:
                return e
        e = SiteEntry(next(_IDS), weight, tile_mask, transposed, fqn)
        _REGISTRY[e.site_id] = e
        _BY_KEY[key] = e.site_id
        weakref.finalize(weight, _forget, key, e.site_id)
        return e


def _forget(key, sid) -> None:
    with _REG_LOCK:
        if _BY_KEY.get(key) == sid:
            del _BY_KEY[key]
        _REGISTRY.pop(sid, None)


def get_entry(site_id: int) -> SiteEntry:
    try:
        return _REGISTRY[site_id]
    except KeyError:
        raise RuntimeError(f"patchc: site {site_id} is not registered in this process (its weight was freed?)") from None


def reference_linear(x: Tensor, p: PackedWeight, bias: Optional[Tensor]) -> Tensor:
    """The reference computation from a packed weight (unpacks on every call)."""
    return F.linear(x, unpack(p).to(device=x.device, dtype=x.dtype), bias)


def _out_shape(x: Tensor, n: int):
    return (*x.shape[:-1], n)


# ---- the custom ops -------------------------------------------------------------------------
@torch.library.custom_op("patchc::hybrid_linear", mutates_args=())
def hybrid_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], site_id: int) -> Tensor:
    """y = x · (W ⊙ M)ᵀ + b for a rewritten site, computed from its packed weight."""
    return get_entry(site_id).run_hybrid(x, weight, bias)


@hybrid_linear.register_fake
def _hybrid_fake(x, weight, bias, site_id):
    n = get_entry(site_id).tile_mask.shape[0]
    return x.new_empty(_out_shape(x, n))


@torch.library.custom_op("patchc::masked_linear", mutates_args=())
def masked_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], site_id: int) -> Tensor:
    """The dense fallback: y = x · (W ⊙ M)ᵀ + b with the mask applied on the fly."""
    e = get_entry(site_id)
    counters["masked_dense_calls"] += 1
    return F.linear(x, _masked_w(e, weight), bias)


@masked_linear.register_fake
def _masked_fake(x, weight, bias, site_id):
    return x.new_empty(_out_shape(x, get_entry(site_id).tile_mask.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, site_id = inputs
    ctx.site_id = site_id
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _masked_w(e: SiteEntry, weight: Tensor) -> Tensor:
    """Masked weight in (out, in) orientation."""
    if e.released:
        return unpack(e.packed).to(device=weight.device, dtype=weight.dtype)
    m = e.mask_on(weight.device, weight.dtype)
    return e.oriented(weight * m)


def _grad_bias(grad: Tensor, has_bias: bool):
    return grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias else None


def _hybrid_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    e = get_entry(ctx.site_id)
    w = unpack(e.packed_for(weight)).to(grad.dtype)
    return grad @ w, None, _grad_bias(grad, ctx.has_bias), None


def _masked_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    e = get_entry(ctx.site_id)
    gx = grad @ _masked_w(e, weight).to(grad.dtype)
    gw = None
    if ctx.needs_input_grad[1]:
        g = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])     # (out, in)
        g = e.oriented(g) if e.transposed else g
        gw = g * e.mask_on(weight.device, weight.dtype)
    return gx, gw, _grad_bias(grad, ctx.has_bias), None


hybrid_linear.register_autograd(_hybrid_backward, setup_context=_setup)
masked_linear.register_autograd(_masked_backward, setup_context=_setup)
