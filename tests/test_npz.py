"""Plans from released .npz mask files (MaskLLM / PATCH format), written here by the tests."""
import json
import logging

import numpy as np
import pytest
import torch

import patchc
from patchc.npz import plan_from_npz
from patchc.plan import MaskPlanError
from patchc.prune import magnitude_hybrid
from test_learn_helpers import TILE, single_thread, tiny_llama_model  # noqa: F401


def _write_maskllm(path, plan, model, packed=True, shapes=True, meta=True, suffix=".weight"):
    """The released format: np.packbits of the flattened bool mask per parameter name, optional
    '<name>_shape' entries and a JSON metadata entry (np.savez_compressed)."""
    mods = dict(model.named_modules())
    out = {}
    for name, m in plan.items():
        mask = m.mask.numpy()
        if type(mods[name]).__name__ == "Conv1D":   # stored (in, out)
            mask = mask.T
        key = name + suffix
        out[key] = np.packbits(mask) if packed else mask.astype(bool)
        if shapes:
            out[key + "_shape"] = np.array(mask.shape, dtype=np.int64)
    if meta:
        out["metadata"] = np.array(json.dumps({"sparsity": "2:4", "source": "test"}))
    np.savez_compressed(path, **out)
    return path


@pytest.mark.parametrize("packed,shapes,meta,suffix", [(True, True, True, ".weight"), (True, False, False, ".weight"),
                                                       (False, True, False, ""), (False, False, True, ".mask")])
def test_roundtrip_of_a_learned_style_plan(tmp_path, packed, shapes, meta, suffix):
    model = tiny_llama_model()
    plan = magnitude_hybrid(model, 0.3, TILE)
    path = _write_maskllm(tmp_path / "mask_compressed.npz", plan, model, packed, shapes, meta, suffix)
    got = plan_from_npz(path, model, tile=TILE)
    got.validate().validate_against(model)
    assert set(got) == set(plan)
    for n in plan:
        assert torch.equal(got[n].mask, plan[n].mask) and torch.equal(got[n].tile_kind, plan[n].tile_kind)
    assert got.meta["restored_weights"] == 0 and got.meta["method"] == "imported-npz"
    assert got.meta["npz_metadata"] == ({"sparsity": "2:4", "source": "test"} if meta else {})


def test_maskllm_all_24_file_with_prefix_and_bad_tiles(tmp_path, caplog):
    model = tiny_llama_model()
    name = "model.layers.0.mlp.up_proj"
    w = dict(model.named_modules())[name].weight.detach()
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[:, 0::4] = mask[:, 1::4] = True        # valid 2:4 everywhere …
    mask[0, 2] = True                           # … but tile (0, 0) keeps 3 of 4 in one group
    mask[20, 0] = False                         # and a group of tile (1, 0) keeps only 1 (topped up to 2)
    np.savez(tmp_path / "m.npz", **{"module." + name + ".weight": np.packbits(mask.numpy()),
                                    "unknown.layer.weight": np.packbits(np.ones(8, bool))})
    with caplog.at_level(logging.WARNING, logger="patchc"):
        plan = plan_from_npz(tmp_path / "m.npz", model, tile=TILE)
    plan.validate()
    m = plan[name]
    assert list(plan) == [name]
    assert m.tile_kind[0, 0] == 0 and m.mask[:16, :16].all(), "a tile that is not 2:4 becomes dense"
    assert m.tile_kind[1, 0] == 1 and int(m.tile_kind.sum()) == m.tile_kind.numel() - 1
    restored = 16 * 16 - int(mask[:16, :16].sum()) + 1
    assert plan.meta["restored_weights"] == restored
    assert "unknown.layer.weight" in caplog.text and "kept" in caplog.text


def test_conv1d_masks_are_transposed(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=256, n_positions=32)).eval()
    plan = magnitude_hybrid(model, 0.3, TILE)
    got = patchc.plan_from_npz(_write_maskllm(tmp_path / "g.npz", plan, model), model, tile=TILE)
    assert all(torch.equal(got[n].mask, plan[n].mask) for n in plan)


def test_bad_files(tmp_path):
    model = tiny_llama_model()
    with pytest.raises(MaskPlanError, match="no such mask file"):
        plan_from_npz(tmp_path / "missing.npz", model, TILE)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(MaskPlanError, match=r"junk\.npz: not a \.npz file"):
        plan_from_npz(tmp_path / "junk.npz", model, TILE)
    np.savez(tmp_path / "none.npz", **{"foo.weight": np.zeros(3, np.uint8)})
    with pytest.raises(MaskPlanError, match="no entry matches"):
        plan_from_npz(tmp_path / "none.npz", model, TILE)
    np.savez(tmp_path / "size.npz", **{"model.layers.0.mlp.up_proj.weight": np.zeros(5, np.uint8)})
    with pytest.raises(MaskPlanError, match="model.layers.0.mlp.up_proj.weight.*5 values"):
        plan_from_npz(tmp_path / "size.npz", model, TILE)
    np.savez(tmp_path / "obj.npz", **{"model.layers.0.mlp.up_proj.weight": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(MaskPlanError, match="not a readable"):
        plan_from_npz(tmp_path / "obj.npz", model, TILE)     # never unpickled
