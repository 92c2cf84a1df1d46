"""PackedWeight: pack/unpack round-trip exactly, layout invariants, and the bytes it saves."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from patchc.packing import ROW, balanced_row_order, pack, packed_nbytes, unpack, unpack_tile_kind
from patchc.prune import mask24_from_scores
from patchc.types import TileMask, expand_tiles, sparse_allowed


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
    assert p.nbytes() == packed_nbytes(tm, dtype)                  # exact, without packing
    # layout invariants: per packed tile-row, every tile-column once, 2:4 first, each kind in K order;
    # regions 16-byte aligned
    nN, nK = tm.grid
    rows = p.rows.tolist()
    for i in range(nN):
        orig, n_s = rows[i][ROW["orig"]], rows[i][ROW["n_s"]]
        kidx = p.kidx[i].tolist()
        sp, de = kidx[:n_s], kidx[n_s:]
        assert sorted(kidx) == list(range(nK)) and sp == sorted(sp) and de == sorted(de)
        assert all(tm.tile_kind[orig, c] == 1 for c in sp) and all(tm.tile_kind[orig, c] == 0 for c in de)
        assert rows[i][ROW["rows"]] == min(tm.tile[0], tm.shape[0] - orig * tm.tile[0])
    assert sorted(p.row_order.tolist()) == list(range(nN))


def test_ragged_tiles_are_stored_at_their_true_size():
    """SmolLM2-135M's 576 / 192-wide dims with 128x128 tiles: the ragged tiles used to be padded
    (up to 1.096x dense); stored at their true size, a layer packs smaller than dense as soon as
    one tile is 2:4, and its values + metadata are exactly 56.25 % of the 2:4 area in 16 bit."""
    for n, k in ((576, 576), (1536, 576), (576, 1536), (192, 576)):
        g = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=g).half()
        m24 = mask24_from_scores(torch.rand(n, k, generator=g))
        nN, nK = -(-n // 128), -(-k // 128)
        for kind in (torch.ones(nN, nK), (torch.rand(nN, nK, generator=g) < 0.3)):
            kind = (kind.bool() & sparse_allowed((128, 128), (n, k))).to(torch.uint8)
            kind[0, 0] = 1
            tm = TileMask.from_kinds((128, 128), kind, m24)
            p = pack(w, tm, balanced_row_order(kind))
            assert p.nbytes() < p.dense_nbytes(), (n, k)
            area24 = int((expand_tiles(kind, (128, 128), (n, k)) == 1).sum())
            # values + metadata: 56.25 % of the 2:4 area (+ < 16 bytes of region alignment per tile-row)
            assert 0.5625 * 2 * area24 <= p.sparse_vals.numel() * 2 + p.sparse_meta.numel() * 4 <= \
                0.5625 * 2 * area24 + 2 * 16 * nN


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


def test_in_place_repack_keeps_the_buffers():
    """pack(out=): same tile map -> same storage (a captured CUDA graph keeps reading it), new values
    and 2:4 patterns; another tile map or order -> ValueError, nothing written."""
    g = torch.Generator().manual_seed(0)
    n, k, tile = 70, 100, (32, 32)
    kind = ((torch.rand(3, 4, generator=g) < 0.5) & sparse_allowed(tile, (n, k))).to(torch.uint8)
    tm = TileMask.from_kinds(tile, kind, mask24_from_scores(torch.rand(n, k, generator=g)))
    w = torch.randn(n, k, generator=g)
    order = balanced_row_order(kind)
    p = pack(w, tm, order)
    ptrs = {name: t.data_ptr() for name, t in p.buffers().items()}
    tm2 = TileMask.from_kinds(tile, kind, mask24_from_scores(torch.rand(n, k, generator=g)))   # other patterns
    w2 = torch.randn(n, k, generator=g)
    assert pack(w2, tm2, order, out=p) is p
    assert {name: t.data_ptr() for name, t in p.buffers().items()} == ptrs
    assert torch.equal(unpack(p), w2 * tm2.mask)
    before = {name: t.clone() for name, t in p.buffers().items()}
    kind2 = kind.clone()
    r, c = (int(v) for v in kind.nonzero()[0])                          # one 2:4 tile turned dense
    kind2[r, c] = 0
    mask2 = tm2.mask.clone()
    mask2[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = True
    other = TileMask.from_kinds(tile, kind2, mask2)
    for bad_mask, bad_order in ((other, balanced_row_order(kind2)), (tm2, torch.tensor([2, 0, 1]))):
        with pytest.raises(ValueError, match="same layout"):
            pack(w, bad_mask, bad_order, out=p)
    assert all(torch.equal(before[name], t) for name, t in p.buffers().items())
    with pytest.raises(ValueError, match="same layout"):
        pack(w.double(), tm2, order, out=p)


def test_balanced_row_order_puts_heavy_rows_first():
    kind = torch.tensor([[1, 1, 1], [0, 0, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.uint8)
    assert balanced_row_order(kind).tolist() == [3, 1, 2, 0]


def test_pack_rejects_bad_order_and_shape():
    tm = TileMask.dense((8, 8), (4, 4))
    with pytest.raises(ValueError, match="permutation"):
        pack(torch.randn(8, 8), tm, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="does not match its mask"):
        pack(torch.randn(8, 4), tm)


def test_unpack_reads_nothing_back_from_the_device(monkeypatch):
    """unpack of a weight made by pack needs no device-to-host read (.cpu / .numpy / .item / .tolist)
    nor a host-to-device copy of index data, so it may run inside a CUDA-graph capture; the 2:4
    tiles still decode exactly."""
    g = torch.Generator().manual_seed(1)
    n, k, tile = 300, 200, (64, 64)                                 # a short tile-row and a ragged column
    kind = ((torch.rand(5, 4, generator=g) < 0.6) & sparse_allowed(tile, (n, k))).to(torch.uint8)
    tm = TileMask.from_kinds(tile, kind, mask24_from_scores(torch.rand(n, k, generator=g)))
    w = torch.randn(n, k, generator=g).half()
    p = pack(w, tm, balanced_row_order(kind))
    want = w * tm.mask.half()

    def forbidden(*a, **k):
        raise AssertionError("unpack read data back from the device")
    for name in ("cpu", "numpy", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "from_numpy", forbidden)
    got = unpack(p)
    monkeypatch.undo()
    assert torch.equal(got, want)
