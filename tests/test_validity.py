"""One validator for tiles and masks (``patchc.tiles``), run wherever a plan enters: TileMask and
MaskPlan construction, ``save`` (after in-place edits too), ``load``; and the compact 2:4 code
encoding of plan files (format 2) next to the bit-per-weight format 1."""
import json
import os
import random
import stat

import numpy as np
import pytest
import torch

import patchc
from patchc import maskcodes
from patchc.plan import MaskPlan, MaskPlanError
from patchc.prune import magnitude_hybrid, mask24_from_scores
from patchc.tiles import check_mask, pack_bits, sparse_allowed
from patchc.types import TileMask

from conftest import MLP


def _bad_group_case():
    """fc1 of a hybrid plan with one group of a 2:4 tile keeping 3 of 4 -> (plan, bad mask, where)."""
    torch.manual_seed(0)
    model = MLP(64, 96, 48)
    plan = magnitude_hybrid(model, 0.3, (16, 16))
    m = plan["fc1"]
    i, j = (int(v) for v in m.tile_kind.nonzero()[0])
    r, c = i * 16 + 5, j * 16 + 8                     # row 5 of the tile, its group 2
    bad = m.mask.clone()
    bad[r, c:c + 4] = torch.tensor([True, True, True, False])
    return plan, bad, (i, j, r, c)


def test_invalid_mask_fails_at_construction_naming_layer_tile_and_group():
    plan, bad, (i, j, r, c) = _bad_group_case()
    m = plan["fc1"]
    where = rf"tile \({i}, {j}\) is 2:4 but group 2 \(row {r}, columns {c}\.\.{c + 3}\) keeps 3 of 4"
    with pytest.raises(ValueError, match="fc1: " + where):
        TileMask(m.tile, m.tile_kind, bad, name="fc1")
    with pytest.raises(ValueError, match=where):
        TileMask(m.tile, m.tile_kind, bad)
    with pytest.raises(ValueError, match=where):               # the same check on packed bits
        TileMask(m.tile, m.tile_kind, bits=pack_bits(bad), shape=bad.shape)
    # deferred by the one caller that needs it (concatenation of checked parts): the plan catches it
    with pytest.raises(MaskPlanError, match="fc1: " + where):
        MaskPlan({"fc1": TileMask(m.tile, m.tile_kind, bad, validate=False), "fc2": plan["fc2"]})


def test_mask_edited_in_place_is_caught_before_save(tmp_path):
    plan, bad, (i, j, r, c) = _bad_group_case()
    plan["fc1"].mask[r, c:c + 4] = bad[r, c:c + 4]            # in place: the cached validity is stale
    with pytest.raises(MaskPlanError, match=rf"fc1: tile \({i}, {j}\) is 2:4 but group 2"):
        plan.save(tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == [], "nothing written"
    with pytest.raises(MaskPlanError, match="fc1"):
        plan.validate()


def _brute(tile, kind, mask) -> bool:
    (tn, tk), (n, k) = tile, mask.shape
    for r in range(n):
        for c in range(k):
            sparse = int(kind[r // tn, c // tk]) == 1
            if not sparse and not mask[r, c]:
                return False
            if sparse and c % 4 == 0:
                if c + 4 > k or int(mask[r, c:c + 4].sum()) != 2:
                    return False
    return bool((kind <= 1).all())


def test_one_validator_agrees_with_brute_force_on_bools_and_bits():
    g, rng = torch.Generator().manual_seed(1), random.Random(1)
    for _ in range(200):
        tn, tk = rng.choice([1, 3, 8, 16]), rng.choice([4, 8, 12, 32, 36])
        n, k = rng.randint(1, 3 * tn + 2), rng.randint(1, 3 * tk + 5)
        kind = ((torch.rand(sparse_allowed((tn, tk), (n, k)).shape, generator=g) < rng.random())
                & sparse_allowed((tn, tk), (n, k))).to(torch.uint8)
        mask = TileMask.from_kinds((tn, tk), kind, mask24_from_scores(torch.rand(n, k, generator=g))).mask.clone()
        if rng.random() < 0.6:
            a, b = rng.randrange(n), rng.randrange(k)
            mask[a, b] = ~mask[a, b]
        if rng.random() < 0.2:
            kind[rng.randrange(kind.shape[0]), rng.randrange(kind.shape[1])] = rng.choice([0, 1, 2])
        ok = _brute((tn, tk), kind, mask) and not ((kind == 1) & ~sparse_allowed((tn, tk), (n, k))).any()
        for form in ({"mask": mask}, {"bits": pack_bits(mask)}):
            try:
                check_mask((tn, tk), kind, (n, k), **form, name="w")
                got = True
            except ValueError as exc:
                assert str(exc).startswith("w: tile (")
                got = False
            assert got == ok, (tn, tk, n, k, form.keys())


@pytest.mark.parametrize("call, msg", [
    (lambda m: magnitude_hybrid(m, 0.3, (0, 128)), r"tile \(0, 128\): the tile height \(rows\) must be at least 1"),
    (lambda m: patchc.infer_plan(m, tile=(100, 30)), r"tile \(100, 30\): the tile width 30 is not a multiple of 4"),
    (lambda m: magnitude_hybrid(m, 0.3, (16, -4)), r"tile \(16, -4\): the tile width \(cols\) must be at least 1"),
    (lambda m: patchc.infer_plan(m, tile=(16,)), r"tile must be a pair of ints \(rows, cols\), got \(16,\)"),
    (lambda m: magnitude_hybrid(m, 0.3, (16.5, 16)), r"tile must be a pair of ints"),
    (lambda m: magnitude_hybrid(m, 0.3, (128, 16)), r"fc1: tile \(128, 16\) is larger than the weight \(96, 64\)"),
])
def test_tile_errors_name_the_tile_and_what_is_wrong(call, msg):
    with pytest.raises(ValueError, match=msg):
        call(MLP(64, 96, 48))


# ---- the compact encoding --------------------------------------------------------------------
def _ragged_plan():
    """Shapes with ragged tiles, K % 4 != 0 (a partial group), odd group counts."""
    g = torch.Generator().manual_seed(3)
    masks = {}
    for name, (n, k), tile in (("a", (37, 52), (8, 16)), ("b", (9, 30), (4, 8)), ("c", (5, 12), (5, 12)),
                               ("d", (33, 64), (16, 32))):
        allowed = sparse_allowed(tile, (n, k))
        kind = ((torch.rand(allowed.shape, generator=g) < 0.6) & allowed).to(torch.uint8)
        masks[name] = TileMask.from_kinds(tile, kind, mask24_from_scores(torch.rand(n, k, generator=g)), name=name)
    return MaskPlan(masks, {"method": "test"})


@pytest.mark.parametrize("encoding", ["codes", "bits"])
def test_both_formats_roundtrip_and_are_0644(tmp_path, encoding):
    plan = _ragged_plan()
    p = plan.save(tmp_path / "m.safetensors", encoding=encoding)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644 & ~_umask()
    back = MaskPlan.load(p)
    assert list(back) == list(plan) and back.meta["method"] == "test"
    for k in plan:
        assert torch.equal(back[k].mask, plan[k].mask) and torch.equal(back[k].tile_kind, plan[k].tile_kind)
        assert back[k].fingerprint() == plan[k].fingerprint()
    header = _header(p)
    assert header["version"] == (2 if encoding == "codes" else 1)
    assert all(f"{k}.{'codes' if encoding == 'codes' else 'mask'}" in _keys(p) for k in plan)


def test_codes_cost_nothing_for_dense_tiles_and_4_bits_per_24_group(tmp_path):
    torch.manual_seed(0)
    model = MLP(512, 512, 256)
    plan = magnitude_hybrid(model, 0.25, (64, 64))
    groups = sum(int((m.tile_kind.float().sum()) * 64 * 64 // 4) for m in plan.values())
    codes = plan.save(tmp_path / "c.safetensors")
    bits = plan.save(tmp_path / "b.safetensors", encoding="bits")
    payload = sum(maskcodes.encoded_nbytes(m) for m in plan.values())
    assert payload == sum((int(m.tile_kind.sum()) * 64 * 16 + 1) // 2 for m in plan.values())
    assert payload * 2 == pytest.approx(groups, abs=len(plan))
    # a 25 % plan: half of the weights in 2:4 tiles at 1 bit each (4 bits per group of 4), the dense
    # half free -> half of the bit-per-weight payload
    numel = sum(m.shape[0] * m.shape[1] for m in plan.values())
    assert payload == pytest.approx(0.5 * numel / 8, rel=0.02)
    assert os.path.getsize(codes) < 0.55 * os.path.getsize(bits)
    dense = MaskPlan({n: TileMask.dense(m.shape, m.tile) for n, m in plan.items()})
    assert sum(maskcodes.encoded_nbytes(m) for m in dense.values()) == 0


def test_bad_code_in_file_names_file_layer_tile_and_group(tmp_path):
    from safetensors.torch import load_file, save_file
    plan = _ragged_plan()
    p = plan.save(tmp_path / "m.safetensors")
    tensors, header = load_file(p), _header(p)
    codes = tensors["d.codes"].clone()
    codes[0] = (codes[0] & 0x0F) | 0x70                     # first group of d's first 2:4 tile: code 7
    tensors["d.codes"] = codes
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"patchc": json.dumps(header)})
    first = plan["d"].tile_kind.nonzero()[0].tolist()
    with pytest.raises(MaskPlanError, match=rf"bad\.safetensors: d: tile \({first[0]}, {first[1]}\) group 0 "
                                            r"\(row \d+, columns \d+\.\.\d+\) has code 7; codes are 0\.\.5"):
        MaskPlan.load(bad)
    tensors["d.codes"] = codes[:-1]
    save_file(tensors, str(bad), metadata={"patchc": json.dumps(header)})
    with pytest.raises(MaskPlanError, match=r"bad\.safetensors: d: \d+ code bytes, but its \d+ groups"):
        MaskPlan.load(bad)


def test_invalid_version_1_file_is_reported_by_the_same_validator(tmp_path):
    from safetensors.torch import save_file
    kind = torch.ones(1, 1, dtype=torch.uint8)
    bad = TileMask.from_kinds((4, 8), kind, torch.tensor([[True, True, False, False] * 2] * 4)).mask.clone()
    bad[2, 0:4] = True
    header = {"format": "patchc.maskplan", "version": 1, "meta": {},
              "entries": {"enc.fc": {"shape": [4, 8], "tile": [4, 8]}}}
    p = tmp_path / "bad.safetensors"
    save_file({"enc.fc.tile_kind": kind, "enc.fc.mask": pack_bits(bad)}, str(p),
              metadata={"patchc": json.dumps(header)})
    with pytest.raises(MaskPlanError, match=r"bad\.safetensors: enc\.fc: tile \(0, 0\) is 2:4 but group 0 \(row 2"):
        MaskPlan.load(p)


def _header(p):
    from safetensors import safe_open
    with safe_open(str(p), framework="pt") as f:
        return json.loads(f.metadata()["patchc"])


def _keys(p):
    from safetensors import safe_open
    with safe_open(str(p), framework="pt") as f:
        return set(f.keys())


def _umask():
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_decode_partial_group_and_odd_counts_directly():
    tm = _ragged_plan()["b"]                               # K = 30: groups of 4 and a partial one
    codes, s = maskcodes.encode(tm)
    assert s == int(maskcodes.sparse_groups(tm.tile, tm.tile_kind, tm.shape).sum())
    parts = maskcodes.decode(tm.tile, tm.tile_kind, tm.shape, codes)
    assert "mask" in parts and torch.equal(parts["mask"], tm.mask)
    assert np.all(parts["mask"].numpy()[:, 28:])
