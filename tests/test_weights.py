"""Updated weights beside a plan: saved as safetensors, validated against the model before any
parameter changes, loaded by patchc.compile and by the string backend's ``weights`` option."""
import copy

import pytest
import torch

import patchc
from patchc.prune import magnitude_hybrid
from patchc.weights import WeightsFileError, load_weights, read_weights, save_weights, weights_path_for

from conftest import MLP, masked_reference

TILE = (16, 16)


def _updated(model, scale=0.5):
    return {n: (m.weight.detach() * scale).clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_save_read_load_round_trip(tmp_path, mlp):
    w = _updated(mlp)
    path = save_weights(tmp_path / "m.weights.safetensors", w, {"method": "sparsegpt-2:4"})
    got, meta = read_weights(path)
    assert meta["method"] == "sparsegpt-2:4" and meta["layers"] == 2 and meta["format"] == 1
    assert set(got) == {"fc1", "fc2"} and all(torch.equal(got[n], w[n]) for n in w)
    assert load_weights(mlp, path) == ["fc1", "fc2"]
    assert torch.equal(mlp.fc1.weight, w["fc1"])
    assert weights_path_for("out/masks.safetensors") == "out/masks.weights.safetensors"


@pytest.mark.parametrize("bad, match", [
    ({"fc9": torch.zeros(96, 64)}, "fc9: no such module"),
    ({"fc2": torch.zeros(96, 64)}, r"fc2: weight shape \(96, 64\) but the model's is \(48, 96\)"),
    ({"fc2": torch.zeros(48, 96, dtype=torch.float16)}, "fc2: weight dtype float16 but the model's is float32"),
    ({"fc2": torch.full((48, 96), float("nan"))}, "fc2: the weight has non-finite values"),
])
def test_a_bad_file_names_file_and_layer_and_changes_nothing(tmp_path, mlp, bad, match):
    path = save_weights(tmp_path / "w.safetensors", {"fc1": torch.ones(96, 64), **bad})
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(WeightsFileError, match=match) as e:
        load_weights(mlp, path)
    assert str(path) in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())     # fc1 untouched too


def test_not_a_weights_file(tmp_path, mlp):
    from safetensors.torch import save_file
    save_file({"fc1.weight": torch.zeros(96, 64)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(WeightsFileError, match="not a patchc weights file"):
        read_weights(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsFileError, match="not a readable safetensors"):
        read_weights(tmp_path / "y.safetensors")
    with pytest.raises(WeightsFileError, match="no such weights file"):
        read_weights(tmp_path / "missing.safetensors")


def _expected(model, plan, w, x):
    ref = copy.deepcopy(model)
    load_weights(ref, w)
    return masked_reference(ref, plan)(x.double())


@pytest.mark.parametrize("how", ["compile", "string"])
def test_compiled_model_computes_with_the_loaded_weights(tmp_path, how):
    torch.manual_seed(0)
    model = MLP().eval()
    plan = magnitude_hybrid(model, 0.3, TILE)
    w = _updated(model, 0.25)
    path = save_weights(tmp_path / "w.safetensors", w)
    x = torch.randn(5, 64)
    want = _expected(model, plan, w, x)
    if how == "compile":
        compiled = patchc.compile(model, plan, weights=path, inner="eager")
    else:
        compiled = torch.compile(model, backend="patch", options={"plan": plan, "weights": path, "inner": "eager"})
    with torch.inference_mode():
        y = compiled(x)
    assert (y.double() - want).abs().max() / want.abs().max() < 1e-5
    assert torch.equal(model.fc1.weight, w["fc1"])                 # loaded into the model's parameters
    assert patchc.explain(compiled).counts()["hybrid"] == 2


def test_compile_rejects_bad_weights_before_compiling(tmp_path, mlp):
    plan = magnitude_hybrid(mlp, 0.3, TILE)
    path = save_weights(tmp_path / "w.safetensors", {"fc1": torch.zeros(10, 10)})
    with pytest.raises(WeightsFileError, match="fc1: weight shape"):
        patchc.compile(mlp, plan, weights=path)
    with pytest.raises(ValueError, match="option weights must be"):
        patchc.compile(mlp, plan, weights=3)
