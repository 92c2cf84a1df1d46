"""Checkpoints saved by llmcompressor / compressed-tensors in a sparse format compile as they are.

``data/ct-sparse24`` was written by compressed-tensors 0.12.2's own ``ModelCompressor`` in the
``sparse-24-bitmask`` format (``data/make_compressed_tensors_fixture.py``); the ``sparse-bitmask``
checkpoint below is written here, following the same documented layout."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import patchc
from patchc.cli import main
from patchc.interop import is_compressed_tensors, load_compressed_tensors, plan_from_compressed_tensors

from conftest import masked_reference

HERE = os.path.join(os.path.dirname(__file__), "data", "ct-sparse24")


def test_sparse24_checkpoint_decompresses_and_compiles():
    model, plan = plan_from_compressed_tensors(HERE, tile=(16, 16))
    for name, want in load_file(os.path.join(HERE, "expected.safetensors")).items():
        assert torch.equal(model.get_parameter(name).to(want.dtype), want), name
    assert "lm_head" not in plan and len(plan) == 7 and plan.meta["method"] == "imported-sparse-24-bitmask"
    assert all(m.num_sparse_tiles() == m.tile_kind.numel() for m in plan.values()), "every tile is 2:4"
    assert plan.sparsity() == 0.5
    ref = masked_reference(model, plan)
    compiled = patchc.compile(model, plan, inner="eager")
    ids = torch.randint(0, 64, (1, 7))
    with torch.inference_mode():
        y = compiled(ids).logits
    torch.testing.assert_close(y.double(), ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert patchc.counters["linear_calls"] > 0


def test_load_model_and_import_masks_cli_read_it(tmp_path, capsys):
    assert is_compressed_tensors(HERE) and not is_compressed_tensors(tmp_path)
    dense = patchc.data.load_model(HERE)
    assert dense.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    out, saved = tmp_path / "m.safetensors", tmp_path / "dense"
    assert main(["import-masks", HERE, "--tile", "16x16", "--out", str(out), "--save-model", str(saved)]) == 0
    plan = patchc.MaskPlan.load(out)
    assert len(plan) == 7 and plan.sparsity() == 0.5
    from transformers import AutoModelForCausalLM
    back = AutoModelForCausalLM.from_pretrained(saved)
    assert torch.equal(back.model.layers[0].mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight)
    assert "wrote" in capsys.readouterr().out
    assert main(["import-masks", HERE, "--model", "smollm2", "--out", str(out)]) == 2
    assert "drop --model" in capsys.readouterr().err


def _write_bitmask_checkpoint(src, dst):
    """The sparse-bitmask layout: values 1-D (non-zeros, row-major), bitmask rows LSB first,
    shape, row_offsets; config.json's sparsity_config names the format."""
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "expected.safetensors"))
    state = load_compressed_tensors(src).state_dict()
    out = {}
    for k, t in state.items():
        if k.endswith("mlp.down_proj.weight"):                 # unstructured: 40 % zeros anywhere
            g = torch.Generator().manual_seed(0)
            t = torch.randn(t.shape, generator=g) * (torch.rand(t.shape, generator=g) > 0.4)
        if k.endswith("_proj.weight"):
            base, keep = k[: -len(".weight")], (t != 0).numpy()
            out[f"{base}.compressed"] = t[t != 0].contiguous()
            out[f"{base}.bitmask"] = torch.from_numpy(np.packbits(keep, axis=-1, bitorder="little"))
            out[f"{base}.shape"] = torch.tensor(list(t.shape))
            counts = torch.from_numpy(keep.sum(1))
            out[f"{base}.row_offsets"] = torch.cumsum(counts, 0) - counts
        else:
            out[k] = t.contiguous()
    save_file(out, os.path.join(dst, "model.safetensors"))
    cfg = json.load(open(os.path.join(dst, "config.json")))
    cfg["quantization_config"]["sparsity_config"].update(format="sparse-bitmask", sparsity_structure="unstructured")
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return state


def test_sparse_bitmask_checkpoint_infers_tile_kinds(tmp_path):
    state = _write_bitmask_checkpoint(HERE, tmp_path / "bm")
    model, plan = plan_from_compressed_tensors(tmp_path / "bm", tile=(16, 16))
    assert plan.meta["method"] == "imported-sparse-bitmask"
    down = "model.layers.0.mlp.down_proj"
    assert plan[down].num_sparse_tiles() < plan[down].tile_kind.numel(), "unstructured tiles stay dense"
    assert plan["model.layers.0.mlp.up_proj"].num_sparse_tiles() == 8
    w = model.get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(w, state["model.layers.0.self_attn.q_proj.weight"])


def test_quantized_or_broken_checkpoints_are_refused(tmp_path):
    q = tmp_path / "q"
    shutil.copytree(HERE, q)
    cfg = json.load(open(q / "config.json"))
    cfg["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"]}}
    json.dump(cfg, open(q / "config.json", "w"))
    with pytest.raises(ValueError, match="also quantized"):
        load_compressed_tensors(q)
    b = tmp_path / "b"
    shutil.copytree(HERE, b)
    t = load_file(b / "model.safetensors")
    t["model.layers.0.mlp.up_proj.bitmask"] = t["model.layers.0.mlp.up_proj.bitmask"][:, :2].contiguous()
    save_file(t, b / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj: bitmask \(64, 2\)"):
        load_compressed_tensors(b)
