"""TileMask / MaskPlan: validation, statistics, files, inference from zeros, applying."""
import json
import struct

import pytest
import torch
from torch import nn

import patchc
from patchc.plan import MaskPlan, MaskPlanError, mask_from_zeros
from patchc.prune import magnitude_hybrid
from patchc.types import TileMask

from conftest import MLP


def _plan(model, target=0.3, tile=(16, 16)):
    return magnitude_hybrid(model, target, tile)


def test_validate_names_layer_tile_and_group():
    kind = torch.tensor([[1, 0]], dtype=torch.uint8)
    m24 = torch.tensor([[True, True, False, False] * 4] * 8)
    tm = TileMask.from_kinds((8, 8), kind, m24)
    tm.validate("layer")
    bad = tm.mask.clone()
    bad[3, 4:8] = torch.tensor([True, True, True, False])
    with pytest.raises(ValueError, match=r"blk\.q: tile \(0, 0\) is 2:4 but group 1 \(row 3, columns 4\.\.7\) keeps 3 of 4"):
        TileMask((8, 8), kind, bad, name="blk.q")
    dense_pruned = tm.mask.clone()
    dense_pruned[0, 12] = False
    with pytest.raises(ValueError, match=r"tile \(0, 1\) is dense but prunes weight \(0, 12\)"):
        TileMask((8, 8), kind, dense_pruned, validate=False).validate("blk.q")


def test_ragged_edge_tile_not_multiple_of_4_must_be_dense():
    kind = torch.tensor([[0, 1]], dtype=torch.uint8)        # last tile is 2 wide (K = 10)
    mask = torch.ones(4, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"x: tile \(0, 1\) is 2:4 but its width 2 is not a multiple of 4"):
        TileMask((4, 8), kind, mask, name="x")
    # a ragged tile of width 4 may be 2:4
    m = torch.ones(4, 12, dtype=torch.bool)
    m[:, 8:12] = torch.tensor([True, False, True, False])
    TileMask((4, 8), torch.tensor([[0, 1]], dtype=torch.uint8), m).validate("x")


def test_tile_kind_shape_checked():
    with pytest.raises(ValueError, match="tile grid"):
        TileMask((4, 8), torch.zeros(3, 3, dtype=torch.uint8), torch.ones(4, 8, dtype=torch.bool))


def test_sparsity_counts_half_of_each_24_tile(mlp):
    kind1 = torch.ones(6, 4, dtype=torch.uint8)
    m24 = torch.tensor([True, False] * 32).repeat(96, 1)
    plan = MaskPlan({"fc1": TileMask.from_kinds((16, 16), kind1, m24),
                     "fc2": TileMask.dense((48, 96), (16, 16))})
    assert plan.sparsity() == pytest.approx(0.5 * 96 * 64 / (96 * 64 + 48 * 96))
    pl = plan.per_layer()
    assert pl["fc1"]["sparsity"] == 0.5 and pl["fc2"]["sparsity"] == 0.0
    assert pl["fc1"]["frac_sparse"] == 1.0 and pl["fc1"]["sparse_tiles"] == 24


def test_magnitude_hybrid_meets_target_and_is_valid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))
    for t in (0.1, 0.25, 0.45):
        plan = magnitude_hybrid(model, t, (16, 16)).validate()
        assert abs(plan.sparsity() - t) <= 0.005
        assert plan.validate_against(model) is plan
    with pytest.raises(ValueError, match="target_sparsity"):
        magnitude_hybrid(model, 0.6, (16, 16))
    with pytest.raises(ValueError, match=r"0: tile \(512, 16\) is larger than the weight"):
        magnitude_hybrid(model, 0.3, (512, 16))


def test_save_load_roundtrip(tmp_path, mlp):
    plan = _plan(mlp)
    p = plan.save(tmp_path / "m.safetensors")
    back = MaskPlan.load(p)
    assert list(back) == list(plan) and back.meta["method"] == "magnitude-hybrid"
    for k in plan:
        assert torch.equal(back[k].mask, plan[k].mask) and torch.equal(back[k].tile_kind, plan[k].tile_kind)
    assert back.sparsity() == plan.sparsity()
    # no pickle anywhere: the file is safetensors with a JSON header
    raw = open(p, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert json.loads(header["__metadata__"]["patchc"])["format"] == "patchc.maskplan"


def test_loaded_masks_stay_bits_until_used(tmp_path, mlp):
    """A loaded mask is unpacked to bool only when something reads ``mask``: shape, fingerprint,
    pruned count and validity come from the bits and equal the bool mask's; sibling masks
    concatenate on the bits (whole bytes) to the same mask and fingerprint as on the bools."""
    from patchc.maskops import concat_masks
    plan = _plan(mlp)
    back = MaskPlan.load(plan.save(tmp_path / "m.safetensors"))
    for k in plan:
        b = back[k]
        assert b._mask is None
        assert b.shape == plan[k].shape and b.pruned() == plan[k].pruned()
        assert b.fingerprint() == TileMask(plan[k].tile, plan[k].tile_kind, plan[k].mask.clone()).fingerprint()
        b.validate(k)
        assert b._mask is None, "statistics and validation unpacked the mask"
        assert torch.equal(b.mask, plan[k].mask)
    # (16, 16) tiles: rows of 16 x K; two loaded masks of equal K concatenate on their bits
    a = MaskPlan.load(plan.save(tmp_path / "n.safetensors"))
    same_k = [n for n in a if a[n].shape[1] == a["fc1"].shape[1]] if "fc1" in a else []
    for n in same_k[:1]:
        lazy = concat_masks([a[n], MaskPlan.load(tmp_path / "n.safetensors")[n]])
        eager = TileMask(plan[n].tile, torch.cat([plan[n].tile_kind] * 2), torch.cat([plan[n].mask] * 2))
        assert lazy._mask is None
        assert lazy.fingerprint() == eager.fingerprint() and torch.equal(lazy.mask, eager.mask)
        assert lazy.pruned() == eager.pruned() == 2 * plan[n].pruned()
    with pytest.raises(ValueError, match="packed bytes cannot hold"):
        TileMask((16, 16), torch.zeros(1, 1, dtype=torch.uint8), bits=torch.zeros(3, dtype=torch.uint8), shape=(16, 16))


def test_bad_mask_files(tmp_path, mlp):
    not_st = tmp_path / "a.safetensors"
    not_st.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(MaskPlanError, match=r"a\.safetensors: not a readable safetensors"):
        MaskPlan.load(not_st)
    good = _plan(mlp).save(tmp_path / "good.safetensors")
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 50])
    with pytest.raises(MaskPlanError, match=r"trunc\.safetensors"):
        MaskPlan.load(trunc)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, str(other), metadata={"foo": "bar"})
    with pytest.raises(MaskPlanError, match=r"other\.safetensors: .*no 'patchc' metadata"):
        MaskPlan.load(other)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(3)}, str(wrong), metadata={"patchc": json.dumps({"format": "nope"})})
    with pytest.raises(MaskPlanError, match=r"wrong\.safetensors: header format"):
        MaskPlan.load(wrong)
    with pytest.raises(MaskPlanError, match="no such mask file"):
        MaskPlan.load(tmp_path / "missing.safetensors")


def test_validate_against_lists_every_mismatch(mlp):
    plan = MaskPlan({"fc1": TileMask.dense((96, 64), (16, 16)), "fc9": TileMask.dense((8, 8), (8, 8)),
                     "fc2": TileMask.dense((48, 48), (16, 16))})
    with pytest.raises(MaskPlanError) as ei:
        plan.validate_against(mlp)
    msg = str(ei.value)
    assert "2 mismatches" in msg and "fc9: no such module" in msg and "fc2: plan shape (48, 48)" in msg


def test_infer_plan_from_zeros_and_apply_plan(mlp):
    plan = _plan(mlp, 0.35)
    patchc.apply_plan(mlp, plan)
    inferred = patchc.infer_plan(mlp, tile=(16, 16)).validate()
    for k in plan:
        # every 2:4 tile of the plan is found again (dense tiles may happen to be 2:4 too: not here)
        assert torch.equal(inferred[k].tile_kind, plan[k].tile_kind)
        assert torch.equal(inferred[k].mask, plan[k].mask)


def test_mask_from_zeros_keeps_exactly_two():
    w = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [1, 2, 0, 0, 0, 3, 0, 4]])
    tm = mask_from_zeros(w, (2, 8))
    assert tm.tile_kind.tolist() == [[1]]
    assert tm.mask[0, :4].sum() == 2 and tm.mask[0, 0]
    assert tm.mask[1].tolist() == [True, True, False, False, False, True, False, True]
    w[0, 1] = 1
    w[0, 2] = 1        # 3 non-zeros in a group: the tile is dense
    assert mask_from_zeros(w, (2, 8)).tile_kind.tolist() == [[0]]


def test_import_patchc_needs_no_triton_or_transformers():
    import subprocess
    import sys
    code = ("import sys, patchc; from patchc.plan import MaskPlan; from patchc.prune import magnitude_hybrid; "
            "bad = [m for m in ('triton', 'transformers', 'torch._dynamo') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
