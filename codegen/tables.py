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

A selector is found from the pattern id with one ``prmt`` per byte used as a table lookup: with
the meta word shifted so the id is nibble 0, ``prmt(T_A, t, T_C)`` has byte 0 = byte p of the
8-byte table (T_A, T_C) (bytes 1-3 read other groups' nibbles and are never used); a second
``prmt(l0, 0x40, l1)`` puts the two looked-up bytes side by side.  The tables below are those
8-byte tables as (T_A, T_C) int32 pairs; ``prmt`` is a faithful numpy model of the instruction.
"""
from __future__ import annotations

from patchc.packformat import PATTERNS

COMBINE = 0x0040            # prmt(l0, COMBINE, l1): byte 0 of l0, then byte 0 of l1


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


def lookup(table: tuple[int, int], t):
    """Byte 0 of ``prmt(table, t)``: the table byte at the pattern id in nibble 0 of ``t``."""
    return prmt(table[0], t, table[1])


def pick_selector(t):
    """The ``prmt`` selector picking (x[i0], x[i1]) for the pattern id in nibble 0 of ``t``."""
    return prmt(lookup(PICK_LO, t), COMBINE, lookup(PICK_HI, t))


def expand_selectors(t):
    """(S_lo, S_hi) selectors expanding a value pair to dense positions (0, 1) and (2, 3)."""
    l0, l1, l2, l3 = (lookup(tab, t) for tab in EXPAND)
    return prmt(l0, COMBINE, l1), prmt(l2, COMBINE, l3)
