"""The patch backend end to end on CPU: rewrites fire, outputs match the masked float64 reference."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import patchc
from patchc.prune import magnitude_hybrid

from conftest import MLP, masked_reference, tiny_llama

TILE = (16, 16)


def _compile(model, plan, **opts):
    return torch.compile(model, backend="patch", options={"plan": plan, "inner": "eager", **opts})


def _run(fn, *args):
    with torch.inference_mode():
        return fn(*args)


def _check(y, ref, dtype):
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


SUBPROCESS = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import MLP, tiny_llama
    torch.manual_seed(0)
    model = {ctor}
    plan_path = sys.argv[1]
    compiled = torch.compile(model, backend="patch", options={{"plan": plan_path}})
    x = {inp}
    with torch.inference_mode():
        y = compiled(x)
    y = y.logits if hasattr(y, "logits") else y
    import patchc                                   # loaded by the entry point, not by this script
    assert patchc.counters["sites_rewritten"] > 0 and patchc.counters["linear_calls"] > 0, dict(patchc.counters)
    torch.save({{"y": y.double(), "x": x}}, sys.argv[2])
""")


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_string_backend_in_fresh_interpreter(tmp_path, kind):
    """backend="patch" works through the entry point in a process that never imports patchc."""
    torch.manual_seed(0)
    if kind == "mlp":
        model, ctor, inp = MLP().eval(), "MLP().eval()", "torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))"
    else:
        model, ctor, inp = tiny_llama(), "tiny_llama()", "torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))"
    plan = magnitude_hybrid(model, 0.35, TILE)
    plan_path = plan.save(tmp_path / "m.safetensors")
    script = tmp_path / "run.py"
    # the check that patchc is absent happens before compile runs
    src = SUBPROCESS.format(tests=os.path.dirname(__file__), ctor=ctor, inp=inp).replace(
        "compiled = torch.compile", "assert 'patchc' not in sys.modules, 'patchc imported too early'\ncompiled = torch.compile")
    script.write_text(src)
    out = tmp_path / "out.pt"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    r = subprocess.run([sys.executable, str(script), plan_path, str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = torch.load(out)
    ref = masked_reference(model, plan)
    with torch.inference_mode():
        yr = ref(res["x"].double()) if kind == "mlp" else ref(res["x"]).logits
    _check(res["y"], yr, torch.float32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mlp_matches_masked_reference(bias, shape, dtype):
    torch.manual_seed(0)
    model = MLP(bias=bias).eval().to(dtype)
    plan = magnitude_hybrid(model, 0.4, TILE)
    patchc.counters.reset()
    compiled = _compile(model, plan)
    x = torch.randn(shape).to(dtype)
    y = _run(compiled, x)
    ref = masked_reference(model, plan)
    _check(y, ref(x.double()), dtype)
    assert patchc.counters["sites_rewritten"] == 2 and patchc.counters["linear_calls"] == 2
    rep = patchc.explain(compiled)
    assert [d.action for d in rep.decisions] == ["hybrid", "hybrid"]
    assert {d.fqn for d in rep.decisions} == {"fc1", "fc2"}


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_tiny_llama_every_linear_rewritten(inner):
    model = tiny_llama()
    plan = magnitude_hybrid(model, 0.35, TILE)
    compiled = torch.compile(model, backend="patch", options={"plan": plan, "inner": inner})
    ids = torch.randint(0, 256, (2, 9))
    y = _run(compiled, ids).logits
    ref = masked_reference(model, plan)
    with torch.inference_mode():
        _check(y, ref(ids).logits, torch.float32)
    rep = patchc.explain(compiled)
    by = {d.fqn: d for d in rep.decisions}
    assert set(plan) <= set(by)
    assert all(by[f].action == "hybrid" for f in plan)
    assert by["lm_head"].action == "skipped"           # not in the plan: the LM head is left out
    assert "hybrid" in str(rep) and "model.layers.0.self_attn.q_proj" in str(rep)


def test_dynamic_batch_does_not_rebuild_the_weights():
    """New batch sizes recompile the graph (or run the dynamic one) but never redo the per-weight
    work: the CPU reference path's W ⊙ M is built once per weight, and nothing is packed."""
    torch.manual_seed(0)
    model = MLP().eval()
    plan = magnitude_hybrid(model, 0.3, TILE)
    compiled = _compile(model, plan)
    ref = masked_reference(model, plan)
    _run(compiled, torch.randn(2, 64))
    assert patchc.counters["masked_weight_builds"] == 2 and patchc.counters["packs"] == 0
    for m in (3, 17, 40):
        x = torch.randn(m, 64)
        _check(_run(compiled, x), ref(x.double()), torch.float32)
    assert patchc.counters["masked_weight_builds"] == 2 and patchc.counters["packs"] == 0
    assert patchc.counters["reference_calls"] == 2 * 4


def test_grad_through_input_with_frozen_weights():
    torch.manual_seed(0)
    model = MLP().eval().requires_grad_(False)
    plan = magnitude_hybrid(model, 0.4, TILE)
    compiled = _compile(model, plan)
    before = patchc.counters["linear_calls"]
    x = torch.randn(4, 64, requires_grad=True)
    compiled(x).square().sum().backward()
    assert patchc.counters["linear_calls"] == before + 2
    ref = masked_reference(model, plan)
    xr = x.detach().double().requires_grad_()
    ref(xr).square().sum().backward()
    assert torch.allclose(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)


def test_grad_mode_with_trainable_weights_warns_and_stays_masked():
    torch.manual_seed(0)
    model = MLP().eval()
    plan = magnitude_hybrid(model, 0.4, TILE)
    compiled = _compile(model, plan)
    x = torch.randn(4, 64)
    with pytest.warns(UserWarning, match="torch.inference_mode"):
        y = compiled(x)
    ref = masked_reference(model, plan)
    _check(y.detach(), ref(x.double()), torch.float32)
    y.sum().backward()                                    # gradients reach the weights, masked
    assert model.fc1.weight.grad is not None
    assert (model.fc1.weight.grad[~plan["fc1"].mask] == 0).all()
    rep = patchc.explain(compiled)
    assert all(d.action == "dense" and "gradients" in d.reason for d in rep.decisions)


def test_generate_through_compiled_forward():
    model = tiny_llama()
    plan = magnitude_hybrid(model, 0.35, TILE)
    ref = masked_reference(model, plan, dtype=torch.float32)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = ref.generate(prompt, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(model.forward, backend="patch", options={"plan": plan, "inner": "eager"})
    before = patchc.counters["linear_calls"]
    with torch.inference_mode():
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert patchc.counters["linear_calls"] - before >= 6 * len(plan)
    assert torch.equal(got, want)
    rep = patchc.explain(model.forward)
    assert sum(d.action == "hybrid" for d in rep.decisions) == len(plan)


def test_weight_changed_after_compile_is_repacked():
    torch.manual_seed(0)
    model = MLP().eval()
    plan = magnitude_hybrid(model, 0.3, TILE)
    compiled = _compile(model, plan)
    x = torch.randn(3, 64)
    _run(compiled, x)
    with torch.no_grad():
        model.fc1.weight.mul_(2.0)
    y = _run(compiled, x)
    _check(y, masked_reference(model, plan)(x.double()), torch.float32)
    assert patchc.counters["repacks"] >= 1


def test_infer_plan_from_pruned_weights():
    torch.manual_seed(0)
    model = MLP().eval()
    plan = magnitude_hybrid(model, 0.4, TILE)
    patchc.apply_plan(model, plan)
    compiled = torch.compile(model, backend="patch", options={"tile": list(TILE), "inner": "eager"})
    x = torch.randn(3, 64)
    _check(_run(compiled, x), masked_reference(model, plan)(x.double()), torch.float32)
    rep = patchc.explain(compiled)
    assert all(d.action == "hybrid" for d in rep.decisions)
    assert rep.decisions[0].frac_sparse == pytest.approx(plan["fc1"].fraction_sparse_tiles())


def test_other_linear_forms_and_transposed_weights():
    class Forms(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 16))        # (out, in)
            self.v = nn.Parameter(torch.randn(16, 32))        # (in, out)
            self.b = nn.Parameter(torch.randn(32))

        def forward(self, x):
            return (x @ self.w.t() + torch.addmm(self.b, x, self.v) + torch.matmul(x, self.w.T)
                    + x.matmul(self.v) + torch.mm(x, self.w.transpose(0, 1)))

    torch.manual_seed(0)
    model = Forms().eval()
    from patchc.prune import mask24_from_scores
    from patchc.plan import MaskPlan
    from patchc.types import TileMask
    kind = torch.tensor([[1], [0]], dtype=torch.uint8)
    tw = TileMask.from_kinds((16, 16), kind, mask24_from_scores(model.w.abs()))
    tv = TileMask.from_kinds((16, 16), kind, mask24_from_scores(model.v.t().abs()))
    # one module owns both weights, so the plan is inferred from the zeros instead of keyed by FQN
    with torch.no_grad():
        model.w.mul_(tw.mask)
        model.v.mul_(tv.mask.t())
    compiled = torch.compile(model, backend="patch", options={"tile": [16, 16], "inner": "eager"})
    x = torch.randn(4, 16)
    y = _run(compiled, x)
    _check(y, model.double()(x.double()), torch.float32)
    rep = patchc.explain(compiled)
    assert sorted(d.form for d in rep.decisions) == ["addmm", "matmul", "matmul", "matmul", "mm"]
    assert all(d.action == "hybrid" for d in rep.decisions)
    assert patchc.counters["linear_calls"] == 5


def test_dump_dir(tmp_path, mlp):
    plan = magnitude_hybrid(mlp, 0.3, TILE)
    compiled = _compile(mlp, plan, dump_dir=str(tmp_path))
    _run(compiled, torch.randn(2, 64))
    names = sorted(os.listdir(tmp_path))
    assert any("find_linear_sites" in n for n in names) and any("rewrite_linears" in n for n in names)
    last = [n for n in names if "rewrite_linears" in n][0]
    assert "patchc.hybrid_linear" in (tmp_path / last).read_text()


def test_release_dense_frees_weights_and_stays_correct():
    model = tiny_llama()
    plan = magnitude_hybrid(model, 0.35, TILE)
    ref = masked_reference(model, plan)
    ids = torch.randint(0, 256, (2, 6))
    before = sum(p.untyped_storage().nbytes() for p in model.parameters())
    compiled = patchc.compile(model, plan, inner="eager", release_dense=True)
    after = sum(p.untyped_storage().nbytes() for p in model.parameters())
    planned = sum(m.mask.numel() * 4 for n, m in plan.items() if m.num_sparse_tiles())
    assert before - after >= planned * 0.99
    with torch.inference_mode():
        y = compiled(ids).logits
        _check(y, ref(ids).logits, torch.float32)
        y2 = compiled(torch.randint(0, 256, (3, 4))).logits         # a recompile reuses the packed entries
    assert patchc.counters["packs"] == sum(1 for m in plan.values() if m.num_sparse_tiles())
    assert all(d.action == "hybrid" for d in patchc.explain(compiled).decisions if d.fqn in plan)
    assert y2.shape == (3, 4, 256)
