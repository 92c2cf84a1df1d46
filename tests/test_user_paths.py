"""What a user does first: backward with the default inner, generate(), plans that do not fit,
release_dense, and that deleting a compiled model frees what patchc made for it."""
import gc
import weakref

import pytest
import torch
from torch import nn

import patchc
from patchc.prune import magnitude_hybrid

from conftest import MLP, masked_reference, tiny_llama

TILE = (16, 16)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- backward through the compiled graph, default inner (inductor) ----------------------------------
class Scaled(nn.Module):
    """A trainable parameter upstream of frozen linears (the LoRA / adapter case)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 64))
        self.mlp = MLP().requires_grad_(False)

    def forward(self, x):
        return self.mlp(x * self.scale)


def test_backward_with_inductor_through_hybrid_sites():
    """Frozen linears under a trainable parameter: the hybrid op's backward (built from patchc ops,
    traced by AOTAutograd under fake tensors) gives the masked reference's gradients."""
    torch.manual_seed(0)
    model = Scaled()
    plan = magnitude_hybrid(model.mlp, 0.4, TILE)
    plan = patchc.MaskPlan({f"mlp.{k}": v for k, v in plan.items()})
    compiled = torch.compile(model, backend="patch", options={"plan": plan})         # inner="inductor"
    x = torch.randn(5, 64, requires_grad=True)
    compiled(x).square().sum().backward()
    rep = patchc.explain(compiled)
    assert [d.action for d in rep.decisions] == ["hybrid", "hybrid"]
    ref = Scaled().double()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(ref.mlp, name).weight.mul_(plan[f"mlp.{name}"].mask)
    xr = x.detach().double().requires_grad_()
    ref(xr).square().sum().backward()
    assert _rel(model.scale.grad, ref.scale.grad) < 1e-5 and _rel(x.grad, xr.grad) < 1e-5


def test_backward_with_inductor_into_trainable_weights():
    """Grad mode with trainable weights: the sites fall back to F.linear(x, masked_weight(W)) and
    the weights' gradients are the reference's, zero where the mask prunes."""
    torch.manual_seed(0)
    model = MLP().train()
    plan = magnitude_hybrid(model, 0.4, TILE)
    compiled = torch.compile(model, backend="patch", options={"plan": plan})
    x = torch.randn(5, 64)
    with pytest.warns(UserWarning, match="inference_mode"):
        compiled(x).square().sum().backward()
    ref = masked_reference(model, plan)
    ref.fc1.weight.requires_grad_(True)
    w = ref.fc1.weight
    ref(x.double()).square().sum().backward()
    g = model.fc1.weight.grad
    assert (g[~plan["fc1"].mask] == 0).all()
    assert _rel(g[plan["fc1"].mask], w.grad[plan["fc1"].mask]) < 1e-5


# ---- generate() ----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["patchc.compile", "torch.compile"])
def test_generate_runs_the_compiled_forward(entry):
    model = tiny_llama()
    plan = magnitude_hybrid(model, 0.35, TILE)
    ref = masked_reference(model, plan, dtype=torch.float32)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = ref.generate(prompt, max_new_tokens=6, do_sample=False)
        dense = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert not torch.equal(want, dense)                   # else the test could not tell them apart
    if entry == "patchc.compile":
        compiled = patchc.compile(model, plan, inner="eager")
    else:
        compiled = torch.compile(model, backend="patch", options={"plan": plan, "inner": "eager"})
    before = patchc.counters["linear_calls"]
    with torch.inference_mode():
        got = compiled.generate(prompt, max_new_tokens=6, do_sample=False)
    assert patchc.counters["linear_calls"] - before >= 6 * len(plan)
    assert torch.equal(got, want)
    assert "forward" not in model.__dict__                # the model's own forward is back


# ---- plans that do not fit -------------------------------------------------------------------------
def _other_shapes_plan(tmp_path):
    other = MLP(d_in=64, d_hid=80, d_out=48)
    return magnitude_hybrid(other, 0.3, TILE).save(tmp_path / "other.safetensors")


def test_plan_with_other_shapes_through_torch_compile_names_file_layer_and_shapes(tmp_path, mlp):
    path = _other_shapes_plan(tmp_path)
    compiled = torch.compile(mlp, backend="patch", options={"plan": path, "inner": "eager"})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as ei, torch.inference_mode():
        compiled(torch.randn(2, 64))
    msg = str(ei.value)
    assert "other.safetensors" in msg and "fc1: plan (80, 64) vs weight (out, in) (96, 64)" in msg
    assert "fc2: plan (48, 80) vs weight (out, in) (48, 96)" in msg


def test_plan_with_other_shapes_and_fallback_dense_warns_and_runs(tmp_path, mlp):
    path = _other_shapes_plan(tmp_path)
    torch._dynamo.reset()
    compiled = torch.compile(mlp, backend="patch", options={"plan": path, "inner": "eager", "fallback": "dense"})
    x = torch.randn(2, 64)
    with pytest.warns(UserWarning, match="does not fit this model"), torch.inference_mode():
        y = compiled(x)
        assert torch.allclose(y, mlp(x))                  # the layers that do not fit stay as they are
    assert [d.action for d in patchc.explain(compiled).decisions] == ["skipped", "skipped"]


def test_plan_for_another_architecture_is_an_error(tmp_path, mlp):
    plan = magnitude_hybrid(tiny_llama(), 0.3, TILE)
    compiled = torch.compile(mlp, backend="patch", options={"plan": plan, "inner": "eager"})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="matches none of the 2 linear layers"), \
            torch.inference_mode():
        compiled(torch.randn(2, 64))


# ---- release_dense -----------------------------------------------------------------------------------
def test_release_dense_keeps_the_module_usable_and_saves_masked_weights(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    plan = magnitude_hybrid(model, 0.35, TILE)
    ref = masked_reference(model, plan, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 6))
    patchc.compile(model, plan, inner="eager", release_dense=True)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.untyped_storage().nbytes() <= 4           # the dense storage is gone
    with torch.inference_mode():
        assert _rel(model(ids).logits, ref(ids).logits) < 1e-5  # the plain module computes from the packed form
    assert q.weight.untyped_storage().nbytes() <= 4           # and keeps nothing after the call
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], ref.model.layers[0].self_attn.q_proj.weight)
    model.save_pretrained(tmp_path / "saved")
    from transformers import LlamaForCausalLM
    back = LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    for name, w in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], w), name


def test_release_dense_through_torch_compile_options_is_an_error(mlp):
    compiled = torch.compile(mlp, backend="patch", options={"release_dense": True, "inner": "eager"})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="patchc.compile"), torch.inference_mode():
        compiled(torch.randn(2, 64))


def test_release_dense_after_a_string_backend_run_keeps_no_masked_copy():
    """A CPU forward through the string backend builds W ⊙ M; releasing the same weights later
    must drop that copy (it is what release_dense exists to free)."""
    torch.manual_seed(0)
    model = MLP().eval()
    plan = magnitude_hybrid(model, 0.4, TILE)
    with torch.inference_mode():
        torch.compile(model, backend="patch", options={"plan": plan, "inner": "eager"})(torch.randn(2, 64))
    rows = patchc.memory_report(model)["entries"]
    assert rows and all(r["masked_copy_bytes"] for r in rows)
    compiled = patchc.compile(model, plan, inner="eager", release_dense=True)
    with torch.inference_mode():
        compiled(torch.randn(2, 64))
    rows = [r for r in patchc.memory_report()["entries"] if r["fqn"] in ("fc1", "fc2")]
    assert rows and all(r["released"] and r["masked_copy_bytes"] == 0 for r in rows)


# ---- ownership ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["torch.compile", "patchc.compile"])
def test_deleting_a_compiled_model_frees_its_weights_and_entries(entry):
    torch._dynamo.reset()
    model = tiny_llama(seed=5)
    plan = magnitude_hybrid(model, 0.35, TILE)
    if entry == "torch.compile":
        compiled = torch.compile(model, backend="patch", options={"plan": plan, "inner": "eager"})
    else:
        compiled = patchc.compile(model, plan, inner="eager")
    with torch.inference_mode():
        compiled(torch.randint(0, 256, (1, 6)))
    ids = {r["site_id"] for r in patchc.memory_report(compiled)["entries"]}
    assert ids and patchc.memory_report(compiled)["total"]["masked_copy_bytes"] > 0
    weight = weakref.ref(model.model.layers[0].mlp.down_proj.weight)
    from patchc import runtime
    entry_refs = [weakref.ref(e) for e in runtime.live_entries() if e.site_id in ids]
    del model, compiled
    torch._dynamo.reset()
    gc.collect()
    assert weight() is None, "the compiled model's weight outlived it"
    assert all(r() is None for r in entry_refs), "patchc kept runtime entries of a deleted model"
    assert not ids & {r["site_id"] for r in patchc.memory_report()["entries"]}


def test_explain_before_the_first_patch_call_says_so_even_after_another_backend(mlp):
    with torch.inference_mode():
        torch.compile(mlp, backend="eager")(torch.randn(2, 64))       # a cache entry, not patchc's
    rep = patchc.explain(torch.compile(mlp, backend="patch"))
    assert not rep.compiled and "nothing compiled yet" in str(rep)


def test_mode_goes_in_options(mlp):
    plan = magnitude_hybrid(mlp, 0.3, TILE)
    compiled = torch.compile(mlp, backend="patch", options={"plan": plan, "mode": "max-autotune-no-cudagraphs"})
    with torch.inference_mode():
        y = compiled(torch.randn(2, 64))
    assert y.shape == (2, 48) and patchc.explain(compiled).counts()["hybrid"] == 2
    with pytest.raises(ValueError, match="disagree"):
        patchc.PatchConfig.from_options({"mode": "default"}, mode="max-autotune")


def test_compile_shows_progress_over_many_sites_on_a_terminal(monkeypatch, capsys):
    import patchc.passes.state as state
    model = tiny_llama(num_hidden_layers=3)                     # 21 planned linears
    plan = magnitude_hybrid(model, 0.35, TILE)
    monkeypatch.setattr(state, "_tty", lambda: True)
    compiled = patchc.compile(model, plan, inner="eager")
    with torch.inference_mode():
        compiled(torch.randint(0, 256, (1, 4)))
    err = capsys.readouterr().err
    assert "patchc: packing weights" in err and "patchc: generating kernels" in err
    monkeypatch.setattr(state, "_tty", lambda: False)           # not a terminal: no bar
    assert state.progress(list(range(40)), "x") == list(range(40))
