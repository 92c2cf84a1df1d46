"""The byte-permute selector logic of the 16-bit kernels, on the CPU (``codegen.tables``: the tables,
a numpy model of ``prmt.b32`` and the kernels' selector computation on it): for every group of
random metadata words, the pick selector gathers (x[i0], x[i1]) and the expand selectors rebuild
the dense group from the kept value pair."""
import numpy as np

from patchc.codegen import tables
from patchc.packformat import GROUPS_PER_WORD, PATTERNS

I0 = np.array([a for a, _ in PATTERNS])
I1 = np.array([b for _, b in PATTERNS])


def _halves(lo, hi) -> np.ndarray:
    """int32 words of 16-bit (lo, hi) pairs."""
    lo, hi = (np.asarray(v, dtype=np.int64) & 0xFFFF for v in (lo, hi))
    return (lo | hi << 16).astype(np.uint32).astype(np.int32)


def _words(rng, n):
    """n meta words of random pattern ids (every id in every nibble) and the ids [n, 8]."""
    ids = rng.integers(0, len(PATTERNS), (n, GROUPS_PER_WORD))
    ids[: len(PATTERNS)] = np.arange(len(PATTERNS))[:, None]
    w = sum(ids[:, g].astype(np.int64) << (4 * g) for g in range(GROUPS_PER_WORD))
    return w.astype(np.uint32).astype(np.int32), ids


def test_pick_selectors_gather_the_kept_inputs():
    rng = np.random.default_rng(0)
    words, ids = _words(rng, 512)
    x = rng.integers(0, 2**16, (4, 512, GROUPS_PER_WORD))          # x0..x3 of every group
    sel = tables.pick_selectors(words)
    got = tables.prmt(_halves(x[0], x[1]), sel, _halves(x[2], x[3]))
    want = _halves(np.take_along_axis(x, I0[ids][None], 0)[0], np.take_along_axis(x, I1[ids][None], 0)[0])
    assert np.array_equal(got, want)


def test_expand_selectors_rebuild_the_dense_group():
    rng = np.random.default_rng(1)
    words, ids = _words(rng, 512)
    v = rng.integers(0, 2**16, (2, 512, GROUPS_PER_WORD))
    s_lo, s_hi = tables.expand_selectors(words)
    vp = _halves(v[0], v[1])
    dense = np.zeros((4, 512, GROUPS_PER_WORD), dtype=np.int64)
    np.put_along_axis(dense, I0[ids][None], v[:1], 0)
    np.put_along_axis(dense, I1[ids][None], v[1:], 0)
    assert np.array_equal(tables.prmt(vp, s_lo, 0), _halves(dense[0], dense[1]))
    assert np.array_equal(tables.prmt(vp, s_hi, 0), _halves(dense[2], dense[3]))


def test_prmt_model_byte_order_and_sign_replication():
    assert tables.prmt(0x44332211, 0x3210, 0) == 0x44332211
    assert tables.prmt(0x44332211, 0x0123, 0) == 0x11223344
    assert tables.prmt(0, 0x7654, 0x44332211) == 0x44332211
    assert tables.prmt(0x80, 0x8888, 0) == -1                 # bit 3 of a nibble: the byte's sign
