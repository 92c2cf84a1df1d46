"""Byte-permute (``prmt.b32``) selector tables of the 16-bit kernels, and a CPU model of ``prmt``.

A 2:4 group keeps two of four 16-bit weights; the packed form stores them as one 32-bit pair
``vp = v0 | v1 << 16`` and the group's pattern id p (``packing.PATTERNS[p] = (i0, i1)``, the kept
positions) in a nibble.  ``prmt.b32 d, a, s, c`` builds d byte by byte: nibble k of the selector s
picks byte k of d among the 8 bytes of (a, c) (0-3: a, 4-7: c; bit 3 would replicate a sign).

* pick (compute from the compressed form, small M): with x01 = x0 | x1 << 16 and x23 the inputs
  of the group, ``prmt(x01, SEL, x23)`` = x[i0] | x[i1] << 16, where SEL has the nibbles
  (2 i0, 2 i0 + 1, 2 i1, 2 i1 + 1);
* expand (tensor-core path): positions 0-1 of the dense group are ``prmt(vp, S_lo, 0)``, 2-3 are
  ``prmt(vp, S_hi, 0)``; a position takes the byte pair 0-1 (v0), 2-3 (v1) or 4-5 (zero).

Selectors come from the pattern ids with ``prmt`` used as a table lookup, 4 groups at a time: a
meta word holds 8 ids (nibble g: group g); with h = word >> 16 hh (half-word hh), ``prmt(T_A, h,
T_C)`` has byte q = byte (nibble q of h) of the 8-byte table (T_A, T_C), i.e. the table entry of
group 4 hh + q; one more ``prmt(l0, combine(q), l1)`` per group puts byte q of two lookups side by
side (the two bytes of a 16-bit element's selector).  The tables below are those 8-byte tables
as (T_A, T_C) int32 pairs; ``prmt`` is a faithful numpy model of the instruction and
``selectors`` the kernels' computation on it (``bodies._selectors`` renders the same steps).
"""
from __future__ import annotations

from patchc.packformat import PATTERNS



def combine(q: int) -> int:
    """The selector of ``prmt(l0, ., l1)`` = byte q of l0, then byte q of l1."""
    return q | (q + 4) << 4


def _pair(*byte_values) -> tuple[int, int]:
    """8 table bytes (missing ones 0) -> (low word, high word) as signed int32 values."""
    b = list(byte_values) + [0] * (8 - len(byte_values))
    lo = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24
    hi = b[4] | b[5] << 8 | b[6] << 16 | b[7] << 24
    return tuple(v - (1 << 32) if v >= 1 << 31 else v for v in (lo, hi))


def _nibble_pair(first: int) -> int:
    """The byte of two selector nibbles (first, first + 1): a 16-bit element's two bytes."""
    return (first + 1) << 4 | first


# pick: byte p = the selector byte of x[i0] (PICK_LO) / x[i1] (PICK_HI)
PICK_LO = _pair(*[_nibble_pair(2 * i0) for i0, _ in PATTERNS])
PICK_HI = _pair(*[_nibble_pair(2 * i1) for _, i1 in PATTERNS])


def _source(p: int, pos: int) -> int:
    """First byte (in (vp, 0)) of what dense position ``pos`` of pattern p holds: 0 v0, 2 v1, 4 zero."""
    i0, i1 = PATTERNS[p]
    return 0 if pos == i0 else 2 if pos == i1 else 4


# expand: byte p = the selector byte of dense position 0, 1, 2, 3
EXPAND = tuple(_pair(*[_nibble_pair(_source(p, pos)) for p in range(len(PATTERNS))]) for pos in range(4))


def prmt(a, sel, c):
    """numpy model of ``prmt.b32`` (default mode) on int32 arrays."""
    import numpy as np
    a, sel, c = (np.asarray(v, dtype=np.int64) & 0xFFFFFFFF for v in (a, sel, c))
    src = a | (c << 32)                                      # the 8 bytes, byte i at bits 8 i
    out = np.zeros(np.broadcast(a, sel, c).shape, dtype=np.int64)
    for k in range(4):
        nib = (sel >> (4 * k)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        byte = np.where(nib & 8, np.where(byte & 0x80, 0xFF, 0), byte)
        out |= byte << (8 * k)
    return out.astype(np.uint32).astype(np.int32)


def selectors(words, tab_lo: tuple[int, int], tab_hi: tuple[int, int]):
    """int32 [..., 8]: per group g of each meta word of ``words``, the selector whose low byte is
    ``tab_lo``'s entry and whose high byte is ``tab_hi``'s entry for the group's pattern id."""
    import numpy as np
    words = np.asarray(words, dtype=np.int32)
    out = []
    for hh in range(2):
        h = words >> (16 * hh)                                    # arithmetic, as in the kernels
        lo, hi = prmt(tab_lo[0], h, tab_lo[1]), prmt(tab_hi[0], h, tab_hi[1])
        out += [prmt(lo, combine(q), hi) for q in range(4)]
    return np.stack(out, axis=-1)


def pick_selectors(words):
    """[..., 8] ``prmt`` selectors picking (x[i0], x[i1]) of every group of the words."""
    return selectors(words, PICK_LO, PICK_HI)


def expand_selectors(words):
    """([..., 8], [..., 8]) selectors expanding each group's value pair to dense positions (0, 1)
    and (2, 3)."""
    return selectors(words, EXPAND[0], EXPAND[1]), selectors(words, EXPAND[2], EXPAND[3])
