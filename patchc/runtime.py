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
import hashlib
import itertools
import logging
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dtypes import NO_SIGN_BITS, SAME_SIZE_INT
from .packing import PackedWeight, pack, unpack
from .types import TileMask

log = logging.getLogger("patchc")


class Counters(collections.Counter):
    """Process-wide event counts (``patchc.counters``): sites rewritten, op calls per path."""

    def reset(self) -> None:
        self.clear()


counters = Counters()




def holds_masked(w: Tensor, mask: Tensor) -> bool:
    """True when ``w`` (out, in) is already zero (±0) wherever ``mask`` prunes.

    On CPU in numpy on the bits (sign cleared), by blocks of ~1 M weights with an early exit, so
    an unmasked weight is settled in its first block: the boolean index ``w[~mask].any()`` this
    replaces took ~130 ms for a 4096x1536 fp32 weight (6x its pack), torch's ``(w != 0) & ~m``
    ~50 ms, this ~6 ms for the whole weight."""
    if w.device.type != "cpu" or not w.is_floating_point() or w.element_size() not in NO_SIGN_BITS:
        return not bool(((w != 0) & ~mask.to(w.device)).any())
    import numpy as np
    int_t, bits = SAME_SIZE_INT[w.element_size()], NO_SIGN_BITS[w.element_size()]
    rows = max(1, (1 << 20) // max(1, w.shape[1]))
    for a in range(0, w.shape[0], rows):
        x = w[a:a + rows]
        xi = (x.contiguous() if x.dim() == 2 and x.stride(-1) != 1 else x).view(int_t).numpy()
        if np.any((xi & bits).astype(bool) & ~mask[a:a + rows].numpy()):
            return False
    return True


def _cached_reference(entry, stamp: tuple, x: Tensor, build, what: str) -> Tensor:
    """``entry._ref``'s W ⊙ M while the weights' ``stamp`` holds (and on ``x``'s device and dtype),
    else ``build()`` again -- with a warning and a ``repacks`` count when the weights changed."""
    def fresh(h):
        return h is not None and h[0] == stamp and h[1].device == x.device and h[1].dtype == x.dtype
    hit = entry._ref
    if not fresh(hit):
        with entry._lock:
            hit = entry._ref
            if hit is not None and isinstance(hit[0], tuple) and hit[0] != stamp:
                log.warning("patchc: %s of %s changed after compile; rebuilding its masked copy", what, entry.fqn)
                counters["repacks"] += 1
            if not fresh(hit):
                hit = entry._ref = (stamp, build().to(device=x.device, dtype=x.dtype))
    return hit[1]


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
        self._ref = None                      # (packed | weight stamp, W ⊙ M) for the reference path
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
            self._weight_masked = holds_masked(w, self.tile_mask.mask)
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
        (unpacking on every call made the CPU reference ~5x slower than dense on SmolLM2).
        A released entry (``release_dense``) keeps no copy and unpacks on every call: a cached
        copy brought the freed bytes back at the first forward (0.7 B model, bf16: RSS 3.4 GB
        with release_dense vs 1.8 GB eager)."""
        if self.released:
            return unpack(p).to(device=x.device, dtype=x.dtype)
        hit = self._ref
        if hit is None or hit[0] is not p or hit[1].device != x.device or hit[1].dtype != x.dtype:
            w = self.masked_user_weight()
            hit = (p, (unpack(p) if w is None else w).to(device=x.device, dtype=x.dtype))
            self._ref = hit
        return hit[1]

    def user_reference(self, weight: Tensor, x: Tensor) -> Tensor:
        """W ⊙ M (out, in) for the reference path, built from the user's ``weight`` and kept
        until it changes (``_version`` / data pointer: then rebuilt, with a warning).  The
        reference path never reads the packed form, so it needs none (see ``needs_packing``)."""
        return _cached_reference(self, (weight._version, weight.data_ptr()), x, lambda: self._masked(weight), "weight")

    def masked_user_weight(self) -> Optional[Tensor]:
        """W ⊙ M (out, in) from the user's weight, or None when it is gone (released, freed).
        Equal to ``unpack(self.packed)`` while the weight is the one packed (``packed_for``
        checks that first) and ~2x faster: one ``torch.where`` instead of a scatter from the
        packed form (CPU, 4096x1536 bf16: 27 ms vs 49 ms)."""
        w = None if self.released else self._weight()
        return None if w is None else self._masked(w)

    def _masked(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            return self.oriented(torch.where(self.where_mask(w.device), w, 0))

    def reference_for(self, weight, x: Tensor) -> Tensor:
        """W ⊙ M for the reference path: from the user's weight, unpacked when it was released."""
        return self.reference_weight(self.packed, x) if self.released else self.user_reference(weight, x)

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

    def where_mask(self, device) -> Tensor:
        """The bool mask in the weight's orientation for one ``torch.where``, not kept: building
        W ⊙ M holds no mask beside it (a mask file's bits are unpacked for the call and dropped;
        a 0.7 B-weight plan held 576 MiB of bool masks on the CPU reference path)."""
        m = self.tile_mask.unpacked().to(device)
        return m.t() if self.transposed else m

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
        counters["hybrid_calls"] += 1
        if runs_reference(self, x.device):
            counters["reference_calls"] += 1
            return F.linear(x, self.reference_for(weight, x), bias)
        return self.runner(self, x, self.packed_for(weight), bias)


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


# ---- sibling fusion: one kernel for the linears that read the same input -------------------------
class GroupEntry:
    """Sibling linears (q/k/v, gate/up) run as ONE hybrid kernel over their row-concatenated
    weights: one launch, the input read once.  ``tile_mask`` is the row-concatenation of the
    members' masks (each member's N is a multiple of the tile height, so no tile-row straddles two
    members); the group packs once per (weights, masks) and re-packs when any member's weight
    changes (``_version`` / data pointer, per member).  Counters count per member linear
    (``hybrid_calls``, ``triton_calls``, ...) and once per group call (``fused_calls``)."""

    def __init__(self, group_id: int, weights, members, tile_mask: TileMask, has_bias):
        self.site_id = group_id
        self.members = list(members)              # the members' SiteEntry: masks, orientation, fqn
        self.n_sites = len(self.members)
        self.sizes = [m.tile_mask.shape[0] for m in self.members]
        self.has_bias = tuple(bool(b) for b in has_bias)
        self.tile_mask = tile_mask
        self.fqn = " + ".join(m.fqn for m in self.members)
        self._weights = [weakref.ref(w) for w in weights]
        self.kernel = "auto"
        self.runner = None
        self.kernels: list = []
        self.packed: Optional[PackedWeight] = None
        self.row_order = None
        self.released = False
        self._ref = None
        self._lock = threading.Lock()
        self._stamp = None
        self._weight_masked = False               # every member weight already holds W ⊙ M

    @staticmethod
    def _stamp_of(weights) -> tuple:
        return tuple((w._version, w.data_ptr()) for w in weights)

    def repack(self, weights, row_order=None) -> PackedWeight:
        if row_order is not None:
            self.row_order = row_order
        with torch.no_grad():
            ws = [m.oriented(w) for m, w in zip(self.members, weights)]
            self.packed = pack(cat_rows(ws), self.tile_mask, self.row_order)
            self._weight_masked = all(holds_masked(w, m.tile_mask.mask) for m, w in zip(self.members, ws))
        self._stamp = self._stamp_of(weights)
        self._ref = None
        counters["packs"] += 1
        return self.packed

    def packed_for(self, weights) -> PackedWeight:
        """The group's packed weight, re-packed (with a warning) if any member weight changed."""
        stamp = self._stamp_of(weights)
        if self.packed is None or stamp != self._stamp:
            with self._lock:
                if self.packed is not None and stamp != self._stamp:
                    log.warning("patchc: a weight of %s changed after compile; re-packing the group", self.fqn)
                    counters["repacks"] += 1
                if self.packed is None or stamp != self._stamp:
                    self.repack(weights)
        return self.packed

    reference_weight = SiteEntry.reference_weight
    reference_for = SiteEntry.reference_for

    def user_reference(self, weights, x: Tensor) -> Tensor:
        """The members' W ⊙ M, row-concatenated, for the reference path (see
        ``SiteEntry.user_reference``); rebuilt with a warning when a member weight changed."""
        return _cached_reference(self, self._stamp_of(weights), x, lambda: self._masked(list(weights)), "a weight")

    def masked_user_weight(self) -> Optional[Tensor]:
        """The members' W ⊙ M, row-concatenated (see ``SiteEntry.masked_user_weight``)."""
        ws = [r() for r in self._weights]
        if self.released or any(w is None for w in ws) or any(m._weight() is not w for m, w in zip(self.members, ws)):
            return None
        return self._masked(ws)

    def _masked(self, ws) -> Tensor:
        out = ws[0].new_empty(self.tile_mask.shape)              # written in place: no concatenated copy
        off = 0
        with torch.no_grad():
            for m, w, n in zip(self.members, ws, self.sizes):
                mk = m.where_mask(w.device)
                if m.transposed:
                    out[off:off + n] = torch.where(mk, w, 0).t()
                else:
                    torch.where(mk, w, w.new_zeros(()), out=out[off:off + n])
                off += n
        return out

    def dense_linear(self, x: Tensor, p: PackedWeight, bias: Optional[Tensor]) -> Tensor:
        """Dense dispatch of the group: one F.linear per member on the users' own weights when they
        already hold W ⊙ M (no concatenated copy in memory), else on the unpacked group weight."""
        ws = [r() for r in self._weights]
        if not self._weight_masked or any(w is None or w.device != x.device or w.dtype != x.dtype for w in ws):
            return F.linear(x, self.reference_weight(p, x), bias)
        y = torch.cat([F.linear(x, m.oriented(w)) for m, w in zip(self.members, ws)], -1)
        return y if bias is None else y + bias

    def bias_of(self, biases, like: Tensor) -> Optional[Tensor]:
        """The members' biases (those that exist, in member order) as one [N] vector (zeros where
        a member has none); None when no member has one."""
        if not biases:
            return None
        it = iter(biases)
        return torch.cat([next(it).to(like.dtype) if b else like.new_zeros(n)
                          for b, n in zip(self.has_bias, self.sizes)])

    def run(self, x: Tensor, weights, biases) -> Tensor:
        bias = self.bias_of(biases, x)
        counters["fused_calls"] += 1
        counters["hybrid_calls"] += self.n_sites
        if runs_reference(self, x.device):
            counters["reference_calls"] += self.n_sites
            return F.linear(x, self.reference_for(weights, x), bias)
        return self.runner(self, x, self.packed_for(weights), bias)


class FusedMember:
    """The runtime entry of one linear of a fused group, as the compiler sees it (``site_id``, the
    packed bytes of its share, the group's kernels).  Called alone (``patchc::hybrid_linear`` with
    its id, which the fused graph does not do) it computes its masked dense linear, so it is
    correct whatever happens to it."""

    class _Share:
        def __init__(self, nbytes: int):
            self._n = nbytes

        def nbytes(self) -> int:
            return self._n

    def __init__(self, site_id: int, group: GroupEntry, member: SiteEntry, packed_bytes: int):
        self.site_id, self.group, self.member = site_id, group, member
        self.tile_mask, self.fqn, self.transposed = member.tile_mask, member.fqn, member.transposed
        self.packed = self._Share(packed_bytes)
        self.released = False
        self.kernel = group.kernel

    @property
    def kernels(self) -> list:
        return self.group.kernels

    def run_hybrid(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        counters["hybrid_calls"] += 1
        counters["reference_calls"] += 1
        return F.linear(x, _masked_w(self.member, weight).to(x.dtype), bias)

    def packed_for(self, weight: Tensor):
        return self.packed


def _reference_kernel(entry, device) -> bool:
    """``entry``'s kernel choice means the reference path on ``device``: ``"reference"``, or ``"auto"`` off CUDA."""
    return entry.kernel == "reference" or (entry.kernel == "auto" and device.type != "cuda")


def runs_reference(entry, device) -> bool:
    """Whether ``entry`` runs on the reference path (W ⊙ M and ``F.linear``) on ``device``: its
    kernel choice says so, or no generated kernel is attached."""
    return _reference_kernel(entry, device) or entry.runner is None


def needs_packing(entry, weight: Tensor) -> bool:
    """Whether the compile packs ``entry``'s weight now: only what reads the packed form needs it
    -- the generated kernels (``kernel="triton"``, or ``"auto"`` on a CUDA weight) and a released
    entry.  The reference path (``"auto"`` on CPU, ``"reference"``) multiplies the user's weight
    by the mask instead, so on CPU nothing is packed (0.7 B Llama: 5.3 s of a 12.7 s compile)
    until someone asks for it (``packed_for``: ``release_dense``, a Triton launch)."""
    return bool(entry.released or not _reference_kernel(entry, weight.device))


def cat_rows(ts) -> Tensor:
    """``torch.cat(ts, 0)``; CPU tensors go through numpy, which was 8-80x faster on the 2-core
    VM this was measured on (2 x 786 KB uint8: 13.5 ms vs 0.16 ms; 2 x 4096x1536 bf16: 17 ms vs
    2.2 ms), the difference being how fresh memory is obtained."""
    if any(t.device.type != "cpu" or t.element_size() not in SAME_SIZE_INT or t.is_complex() for t in ts):
        return torch.cat(ts, 0)
    import numpy as np
    it = SAME_SIZE_INT[ts[0].element_size()]
    if any(t.dtype != ts[0].dtype for t in ts):
        return torch.cat(ts, 0)
    return torch.from_numpy(np.concatenate([t.detach().contiguous().view(it).numpy() for t in ts], 0)).view(ts[0].dtype)


def concat_masks(masks) -> TileMask:
    """The row-concatenation of TileMasks with one tile whose N are multiples of the tile height."""
    tile = masks[0].tile
    bad = [m.shape for m in masks if m.tile != tile or m.shape[0] % tile[0] or m.shape[1] != masks[0].shape[1]]
    if bad:
        raise ValueError(f"cannot concatenate masks {bad} with tile {tile}")
    kind = cat_rows([m.tile_kind for m in masks])
    if not all(m.shape[0] * m.shape[1] % 8 == 0 for m in masks):
        return TileMask(tile, kind, cat_rows([m.mask for m in masks]))
    # whole bytes: concatenate the bits; the statistics follow from the members' (the hash is
    # the fingerprint's formula over the concatenated bytes; valid members make a valid group)
    bits = cat_rows([m.bits[: m.shape[0] * m.shape[1] // 8] for m in masks])
    out = TileMask(tile, kind, bits=bits, shape=(sum(m.shape[0] for m in masks), masks[0].shape[1]))
    h = hashlib.sha1()
    h.update(repr((out.tile, out.shape)).encode())
    h.update(kind.numpy().tobytes())
    h.update(bits.numpy().tobytes())
    out._cache.update(fp=h.hexdigest()[:16], pruned=sum(m.pruned() for m in masks))
    if all(m._cache.get("valid") for m in masks):
        out._cache["valid"] = True
    return out


def register_group(weights, members, has_bias, tile_mask: Optional[TileMask] = None) -> GroupEntry:
    """The entry of a fused group (created once per process for these weights and masks)."""
    key = ("group", tuple(id(w) for w in weights), tuple(m.tile_mask.fingerprint() for m in members),
           tuple(m.transposed for m in members), tuple(bool(b) for b in has_bias))
    with _REG_LOCK:
        gid = _BY_KEY.get(key)
        if gid is not None:
            g = _REGISTRY[gid]
            if all(r() is w for r, w in zip(g._weights, weights)):
                return g
        tm = tile_mask if tile_mask is not None else concat_masks([m.tile_mask for m in members])
        g = GroupEntry(next(_IDS), weights, members, tm, has_bias)
        _REGISTRY[g.site_id] = g
        _BY_KEY[key] = g.site_id
        for w in weights:
            weakref.finalize(w, _forget, key, g.site_id)
        return g


def register_member(group: GroupEntry, member: SiteEntry, packed_bytes: int) -> FusedMember:
    """A ``FusedMember`` stand-in for one linear of ``group`` (registered: its id is valid)."""
    with _REG_LOCK:
        e = FusedMember(next(_IDS), group, member, packed_bytes)
        _REGISTRY[e.site_id] = e
    w = member._weight()
    if w is not None:
        weakref.finalize(w, _REGISTRY.pop, e.site_id, None)
    return e


@torch.library.custom_op("patchc::hybrid_linear_group", mutates_args=())
def hybrid_linear_group(x: Tensor, weights: list[Tensor], biases: list[Tensor], group_id: int) -> Tensor:
    """y = x · [W₁ ⊙ M₁; W₂ ⊙ M₂; …]ᵀ + [b₁; b₂; …] for fused sibling linears (one kernel, x read
    once); the graph narrows y back per member along the last dim, in member order.  ``biases``:
    the members' biases that exist, in member order (the group entry knows whose they are)."""
    return get_entry(group_id).run(x, weights, biases)


@hybrid_linear_group.register_fake
def _group_fake(x, weights, biases, group_id):
    return x.new_empty(_out_shape(x, get_entry(group_id).tile_mask.shape[0]))


def _group_setup(ctx, inputs, output):
    x, weights, biases, group_id = inputs
    ctx.group_id, ctx.n_weights, ctx.n_biases = group_id, len(weights), len(biases)
    ctx.save_for_backward(*weights)


def _group_backward(ctx, grad):
    g = get_entry(ctx.group_id)
    gx = grad @ unpack(g.packed_for(list(ctx.saved_tensors))).to(grad.dtype)
    gb, off = [], 0
    for b, n in zip(g.has_bias, g.sizes):
        if b:
            gb.append(grad[..., off:off + n].reshape(-1, n).sum(0))
        off += n
    return gx, [None] * ctx.n_weights, gb, None


hybrid_linear_group.register_autograd(_group_backward, setup_context=_group_setup)
