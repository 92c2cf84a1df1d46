"""Sibling fusion (passes/fuse_siblings.py): q/k/v and gate/up of a tiny Llama run as one
``patchc::hybrid_linear_group`` call each; the numbers never depend on whether fusion fired."""
import pytest
import torch

import patchc
from patchc import runtime
from patchc.maskops import cat_rows
from patchc.prune import magnitude_hybrid

from conftest import masked_reference, tiny_llama

TILE = (16, 16)


def _compile(model, plan, **opts):
    return torch.compile(model, backend="patch", options={"plan": plan, "inner": "eager", **opts})


@pytest.fixture(scope="module")
def llama_runs():
    """One tiny Llama compiled with and without fusion (module scope: compiles are the slow part)."""
    torch._dynamo.reset()
    model = tiny_llama()
    plan = magnitude_hybrid(model, 0.35, TILE)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = masked_reference(model, plan)(ids).logits
    out = {}
    for fusion in (True, False):
        torch._dynamo.reset()
        patchc.counters.reset()
        compiled = _compile(model, plan, fusion=fusion)
        with torch.inference_mode():
            y = compiled(ids).logits
        out[fusion] = dict(y=y, counters=dict(patchc.counters), report=patchc.explain(compiled),
                           kernels=patchc.kernels(compiled))
        if fusion:     # a member's weight changes after compile: the group re-packs (same graph)
            k = model.model.layers[0].self_attn.k_proj.weight
            saved = k.detach().clone()
            with torch.inference_mode():
                with torch.no_grad():
                    k.mul_(2.0)
                out["changed"] = dict(y=compiled(ids).logits, want=masked_reference(model, plan)(ids).logits,
                                      repacks=patchc.counters["repacks"])
                with torch.no_grad():
                    k.copy_(saved)
    return model, plan, ids, want, out


def _rel(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def test_fused_outputs_match_reference_and_unfused(llama_runs):
    _, _, _, want, out = llama_runs
    assert _rel(out[True]["y"], want) < 1e-4 and _rel(out[False]["y"], want) < 1e-4
    torch.testing.assert_close(out[True]["y"], out[False]["y"], rtol=1e-6, atol=1e-6)


def test_qkv_and_gate_up_are_fused(llama_runs):
    _, plan, _, _, out = llama_runs
    c = out[True]["counters"]
    assert c["groups_fused"] == 4 and c["sites_fused"] == 10                 # 2 layers x (q/k/v, gate/up)
    assert c["fused_calls"] == 4 and c["linear_calls"] == c["sites_rewritten"] == len(plan) == 14
    # on CPU the reference path runs every entry from the user's weights: nothing is packed
    assert "packs" not in c and "packs" not in out[False]["counters"]
    assert "groups_fused" not in out[False]["counters"]
    rows = {d.fqn: d for d in out[True]["report"].decisions}
    assert len(rows) == 15 and sum(d.action == "hybrid" for d in rows.values()) == 14     # a row per linear
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        q, k, v = (rows[f"{p}.self_attn.{n}_proj"] for n in "qkv")
        assert "fused with" in q.reason and f"{p}.self_attn.k_proj" in q.reason and "N=128" in q.reason
        assert q.kernel == k.kernel == v.kernel and q.layout["group"] == [q.fqn, k.fqn, v.fqn]
        gate, up = rows[f"{p}.mlp.gate_proj"], rows[f"{p}.mlp.up_proj"]
        assert gate.kernel == up.kernel and "N=256" in up.reason
        assert "fused" not in rows[f"{p}.self_attn.o_proj"].reason and "fused" not in rows[f"{p}.mlp.down_proj"].reason
        assert q.packed_bytes and q.packed_bytes < q.dense_bytes
    text = str(out[True]["report"])
    assert "fused with" in text and "into one patchc::hybrid_linear call" in text
    names = {k.name for k in out[True]["kernels"]}
    assert any("_n128_k64_" in name for name in names)                     # the q/k/v group's kernel
    assert not any("fused" in d.reason for d in out[False]["report"].decisions)


def test_weight_change_of_one_member_repacks_the_group(llama_runs):
    changed = llama_runs[-1]["changed"]
    assert changed["repacks"] >= 1
    assert _rel(changed["y"], changed["want"]) < 1e-4


def test_grad_through_input_of_a_fused_group():
    torch._dynamo.reset()
    model = tiny_llama().requires_grad_(False)
    plan = magnitude_hybrid(model, 0.35, TILE)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(1))
    emb = model.model.embed_tokens(ids).detach()
    ref = masked_reference(model, plan, torch.float32)
    compiled = _compile(model, plan)
    x = emb.clone().requires_grad_(True)
    compiled(inputs_embeds=x).logits.square().sum().backward()
    xr = emb.clone().requires_grad_(True)
    ref(inputs_embeds=xr).logits.square().sum().backward()
    assert patchc.counters["fused_calls"] >= 2
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)


def test_siblings_that_cannot_concatenate_stay_separate():
    """N not a multiple of the tile height: no clean tile-row concat, so no fusion (and why)."""
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(64, 40)          # 40 = 2.5 tile-rows of 16
            self.b = torch.nn.Linear(64, 48)

        def forward(self, x):
            return self.a(x).sum(-1) + self.b(x).sum(-1)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Two().eval()
    plan = magnitude_hybrid(model, 0.4, TILE)
    compiled = _compile(model, plan)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y = compiled(x)
        want = masked_reference(model, plan)(x.double())
    assert _rel(y, want) < 1e-5
    rows = {d.fqn: d for d in patchc.explain(compiled).decisions}
    assert "not fused with its siblings: N=40 is not a multiple of the tile height 16" in rows["a"].reason
    assert "fused_calls" not in patchc.counters and rows["b"].action == "hybrid"


def _group(a, b, plan):
    return runtime.entry_for([a.weight, b.weight], [plan["a"], plan["b"]], [False, False], ["a", "b"], [True, False])


def test_group_entry_is_made_once_and_concatenates_masks():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(32, 16), torch.nn.Linear(32, 32)
    plan = magnitude_hybrid(torch.nn.ModuleDict({"a": a, "b": b}), 0.4, TILE)
    g1 = _group(a, b, plan)
    g2 = _group(a, b, plan)
    assert g1 is g2 and g1.tile_mask.shape == (48, 32) and [m.n for m in g1.members] == [16, 32]
    assert torch.equal(g1.tile_mask.mask, torch.cat([plan["a"].mask, plan["b"].mask]))
    x = torch.randn(5, 32)
    with torch.inference_mode():
        y = torch.ops.patchc.hybrid_linear(x, [a.weight, b.weight], [a.bias], g1.site_id)
    want = torch.cat([torch.nn.functional.linear(x, a.weight * plan["a"].mask, a.bias),
                      torch.nn.functional.linear(x, b.weight * plan["b"].mask)], -1)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_reference_weight_from_the_users_weights_equals_the_unpacked_one(transposed):
    """The CPU reference path builds W ⊙ M from the user's weights (one torch.where, a group's
    members written in place); it must be the packed weight unpacked, bit for bit, for plain and
    (in, out)-stored weights, a site and a group alike."""
    from patchc import runtime
    from patchc.packing import unpack
    from patchc.prune import mask24_from_scores
    from patchc.types import TileMask
    torch.manual_seed(0)
    ws, masks = [], []
    x = torch.randn(3, 64)
    for i, n in enumerate((32, 48)):
        w = torch.randn((64, n) if transposed else (n, 64))
        kind = (torch.rand(n // 16, 4) < 0.6).to(torch.uint8)
        tm = TileMask.from_kinds((16, 16), kind, mask24_from_scores(torch.rand(n, 64)))
        e = runtime.entry_for([w], [tm], [transposed], [f"layer{i}"], [False])
        e.repack([w])
        assert torch.equal(e._dense_state([w], x)[3], unpack(e.packed))
        ws.append(w)
        masks.append(tm)
    g = runtime.entry_for(ws, masks, [transposed] * 2, ["layer0", "layer1"], [False, False])
    p = g.packed_for(ws)
    ref = g._dense_state(ws, x)[3]
    assert ref.shape == (80, 64) and torch.equal(ref, unpack(p))
    assert torch.equal(g.dense_linear(x, ws, None), torch.nn.functional.linear(x, ref))


def test_cat_rows_is_torch_cat():
    """maskops.cat_rows (numpy on CPU) equals torch.cat for every dtype the runtime concatenates,
    transposed views included."""
    torch.manual_seed(0)
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.bool, torch.uint8):
        a, b = (torch.randn(5, 3) * 3).to(dt), (torch.randn(2, 3) * 3).to(dt)
        out = cat_rows([a, b])
        assert out.dtype == dt and torch.equal(out, torch.cat([a, b]))
    t = torch.randn(4, 3).t()
    assert torch.equal(cat_rows([t, t]), torch.cat([t, t]))


def test_cpu_reference_path_packs_nothing_and_reports_exact_bytes(llama_runs, monkeypatch):
    """kernel="auto" on CPU: the reference path reads the user's weights, so no entry is packed;
    explain still reports the packed bytes, exactly what packing would give.  Where something
    reads the packed form (``needs_packing``: a Triton kernel, a released entry) the compile packs."""
    from patchc.modules import oriented_weight
    from patchc.packing import pack
    model, plan, ids, want, out = llama_runs
    mods = dict(model.named_modules())
    rows = {d.fqn: d for d in out[True]["report"].decisions}
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        assert rows[name].packed_bytes == pack(oriented_weight(mods[name]).detach(), plan[name]).nbytes()
    w = torch.zeros(plan["model.layers.0.self_attn.o_proj"].shape)
    e = runtime.entry_for([w], [plan["model.layers.0.self_attn.o_proj"]], [False], ["x"], [False])
    assert not runtime.needs_packing(e, w.device)
    e.kernel = "triton"
    assert runtime.needs_packing(e, w.device)
    fresh = tiny_llama(seed=1)
    plan1 = magnitude_hybrid(fresh, 0.35, TILE)
    monkeypatch.setattr(runtime, "needs_packing", lambda entry, device: True)
    torch._dynamo.reset()
    patchc.counters.reset()
    with torch.inference_mode():
        y = _compile(fresh, plan1, fusion=False)(ids).logits
    assert patchc.counters["packs"] == len(plan1)
    assert _rel(y, masked_reference(fresh, plan1)(ids).logits) < 1e-4


def test_cpu_reference_path_holds_no_bool_masks(tmp_path):
    """A plan loaded from a mask file stays packed bits on the CPU reference path: W ⊙ M is built
    with a mask unpacked for the call and dropped, sites and fused groups alike."""
    from patchc.plan import MaskPlan
    torch._dynamo.reset()
    model = tiny_llama(seed=2)
    path = magnitude_hybrid(model, 0.35, TILE).save(tmp_path / "m.safetensors")
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        compiled = _compile(model, MaskPlan.load(path), fusion=True)
        y = compiled(ids).logits
    pids = {id(p) for p in model.parameters()}
    entries = [e for r in patchc.backend.records() if r.param_ids() & pids for e in r.entries]
    ran = [e for e in entries if e._dense is not None]
    assert any(e.n_sites > 1 for e in ran) and any(e.n_sites == 1 for e in ran)
    for e in entries:
        for m in e.members:
            assert m.tile_mask.held_nbytes() == m.tile_mask.bits.numel(), f"{m.fqn} holds its bool mask"
        assert e.tile_mask.held_nbytes() == e.tile_mask.bits.numel(), f"{e.fqn} holds its bool mask"
    assert _rel(y, masked_reference(model, MaskPlan.load(path))(ids).logits) < 1e-4
