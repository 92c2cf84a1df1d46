"""PackedWeight: pack/unpack round-trip exactly, layout invariants, and the bytes it saves."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from patchc.packing import balanced_row_order, pack, unpack, unpack_tile_kind
from patchc.prune import mask24_from_scores
from patchc.types import TileMask, sparse_allowed


@st.composite
def weight_and_mask(draw):
    tn = draw(st.sampled_from([1, 3, 4, 8, 16]))
    tk = draw(st.sampled_from([4, 8, 16, 32, 64]))
    n = draw(st.integers(1, 3 * tn + 2))
    k = draw(st.integers(1, 3 * tk + 5))
    kind_mode = draw(st.sampled_from(["dense", "sparse", "mixed"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    tile = (tn, tk)
    allowed = sparse_allowed(tile, (n, k))
    if kind_mode == "dense":
        kind = torch.zeros_like(allowed, dtype=torch.uint8)
    elif kind_mode == "sparse":
        kind = allowed.to(torch.uint8)
    else:
        kind = ((torch.rand(allowed.shape, generator=g) < 0.5) & allowed).to(torch.uint8)
    m24 = mask24_from_scores(torch.rand(n, k, generator=g))
    tm = TileMask.from_kinds(tile, kind, m24).validate()
    reorder = draw(st.booleans())
    return w, tm, reorder


@settings(max_examples=120, deadline=None)
@given(weight_and_mask(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_pack_unpack_roundtrip(case, dtype):
    w, tm, reorder = case
    w = w.to(dtype)
    order = balanced_row_order(tm.tile_kind) if reorder else None
    p = pack(w, tm, order)
    assert torch.equal(unpack(p), w * tm.mask.to(dtype))
    assert torch.equal(unpack_tile_kind(p), tm.tile_kind)
    # layout invariants: per packed tile-row, every tile exactly once, 2:4 first
    nN, nK = tm.grid
    for i in range(nN):
        r = int(p.row_order[i])
        sp = p.sparse_kidx[p.sparse_off[i]:p.sparse_off[i + 1]].tolist()
        de = p.dense_kidx[p.dense_off[i]:p.dense_off[i + 1]].tolist()
        assert sorted(sp + de) == list(range(nK))
        assert all(tm.tile_kind[r, c] == 1 for c in sp) and all(tm.tile_kind[r, c] == 0 for c in de)
    assert sorted(p.row_order.tolist()) == list(range(nN))


def test_packed_bytes_ratio_fp16():
    torch.manual_seed(0)
    n, k = 256, 512
    w = torch.randn(n, k, dtype=torch.float16)
    m24 = mask24_from_scores(w.abs().float())
    all24 = TileMask.from_kinds((128, 128), torch.ones(2, 4, dtype=torch.uint8), m24)
    p = pack(w, all24)
    values_meta = p.sparse_vals.numel() * 2 + p.sparse_meta.numel() * 4
    assert values_meta / (n * k * 2) == 0.5625
    assert p.nbytes() / p.dense_nbytes() < 0.5625 + 0.001    # index arrays are a rounding error
    dense = pack(w, TileMask.dense((n, k), (128, 128)))
    assert dense.nbytes() / dense.dense_nbytes() == pytest.approx(1.0, abs=0.001)


def test_balanced_row_order_puts_heavy_rows_first():
    kind = torch.tensor([[1, 1, 1], [0, 0, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.uint8)
    assert balanced_row_order(kind).tolist() == [3, 1, 2, 0]


def test_pack_rejects_bad_order_and_shape():
    tm = TileMask.dense((8, 8), (4, 4))
    with pytest.raises(ValueError, match="permutation"):
        pack(torch.randn(8, 8), tm, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="does not match its mask"):
        pack(torch.randn(8, 4), tm)
