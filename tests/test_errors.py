"""Bad input gets a clear error naming what is wrong, and never silently wrong output."""
import pytest
import torch
from torch import nn

import patchc
from patchc.plan import MaskPlan, MaskPlanError
from patchc.prune import magnitude_hybrid
from patchc.types import TileMask

from conftest import MLP, masked_reference

TILE = (16, 16)


def test_unknown_option_through_torch_compile(mlp):
    compiled = torch.compile(mlp, backend="patch", options={"plann": "x.safetensors"})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as ei:
        compiled(torch.randn(2, 64))
    inner = ei.value.inner_exception
    assert isinstance(inner, ValueError)
    assert "plann" in str(inner) and "cache_dir" in str(inner) and "fallback" in str(inner)


def test_unknown_option_and_bad_values_in_patchc_compile(mlp):
    with pytest.raises(ValueError, match=r"unknown patch backend option\(s\) \['bogus'\]; valid options are: .*plan"):
        patchc.compile(mlp, None, bogus=1)
    with pytest.raises(ValueError, match=r"option inner='jit' is not one of \['inductor', 'eager'\]"):
        patchc.compile(mlp, None, inner="jit")
    with pytest.raises(ValueError, match=r"option tile="):
        patchc.compile(mlp, None, tile=(16, 6))


def test_patchc_compile_validates_plan_up_front(mlp):
    plan = MaskPlan({"fc1": TileMask.dense((96, 64), TILE), "fc3": TileMask.dense((8, 8), (8, 8)),
                     "fc2": TileMask.dense((48, 64), TILE)})
    with pytest.raises(MaskPlanError) as ei:
        patchc.compile(mlp, plan)
    assert "fc3: no such module" in str(ei.value) and "fc2: plan shape (48, 64)" in str(ei.value)


def test_patchc_compile_mask_file_errors_name_the_file(tmp_path, mlp):
    bad = tmp_path / "masks.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(MaskPlanError, match="masks.safetensors"):
        patchc.compile(mlp, str(bad))


def test_unsupported_dtype_falls_back_to_masked_dense(mlp):
    model = mlp.double()
    plan = magnitude_hybrid(model, 0.4, TILE)
    ref = masked_reference(model, plan)
    compiled = patchc.compile(model, plan, inner="eager")
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.inference_mode():
        y = compiled(x)
    assert torch.allclose(y, ref(x))
    rep = patchc.explain(compiled)
    assert all(d.action == "dense" and "dtype float64 is not supported" in d.reason for d in rep.decisions)
    # dense sites that need only W ⊙ M run the patchc op on its reference path (no kernel for fp64)
    assert patchc.counters["reference_calls"] == 2 and patchc.counters["triton_calls"] == 0
    assert patchc.counters["sites_masked_dense"] == 2 and patchc.counters["sites_rewritten"] == 0
    assert "float64 is not supported" in str(rep)


def test_fallback_error_raises(mlp):
    model = mlp.double()
    plan = magnitude_hybrid(model, 0.4, TILE)
    compiled = patchc.compile(model, plan, inner="eager", fallback="error")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as ei, torch.inference_mode():
        compiled(torch.randn(3, 64, dtype=torch.float64))
    assert "fc1" in str(ei.value.inner_exception) and "float64" in str(ei.value.inner_exception)


def test_model_without_linears_compiles_with_zero_sites():
    model = nn.Sequential(nn.LayerNorm(8), nn.GELU())
    compiled = torch.compile(model, backend="patch", options={"inner": "eager"})
    rep = patchc.explain(compiled)
    assert not rep.compiled and "call the compiled model" in str(rep)
    with torch.inference_mode():
        compiled(torch.randn(2, 8))
    rep = patchc.explain(compiled)
    assert rep.compiled and rep.decisions == [] and "0 linear sites" in str(rep)


def test_explain_before_first_call_says_so(mlp):
    compiled = patchc.compile(mlp, magnitude_hybrid(mlp, 0.3, TILE))
    assert "nothing compiled yet" in str(patchc.explain(compiled))
    with torch.inference_mode():
        compiled(torch.randn(2, 64))
    rep = patchc.explain(compiled)
    assert rep.counts()["hybrid"] == 2
    with pytest.raises(TypeError, match="compiled nn.Module"):
        patchc.explain(42)


def test_plan_entry_matching_no_site_is_listed(mlp):
    class Half(nn.Module):          # only fc1 is used in forward
        def __init__(self, m):
            super().__init__()
            self.fc1, self.fc2 = m.fc1, m.fc2

        def forward(self, x):
            return self.fc1(x)

    model = Half(mlp)
    plan = magnitude_hybrid(mlp, 0.3, TILE)
    compiled = patchc.compile(model, plan, inner="eager")
    with torch.inference_mode():
        compiled(torch.randn(2, 64))
    rep = patchc.explain(compiled)
    assert rep.unmatched_plan_entries == ["fc2"] and "matched no site (1): fc2" in str(rep)


def test_tied_weight_maps_to_the_module_that_uses_it():
    from conftest import tiny_llama
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compiled = patchc.compile(model, None, inner="eager")
    with torch.inference_mode():
        compiled(torch.randint(0, 256, (1, 4)))
    fqns = {d.fqn for d in patchc.explain(compiled).decisions}
    assert "lm_head" in fqns and "model.embed_tokens" not in fqns
