"""Mask learning (PATCH-Tile / PATCH-Joint) on a tiny trained LLaMA with 16×16 tiles."""
import copy
import json
import logging
import pathlib
import subprocess
import sys

import pytest
import torch

import patchc
from patchc.learn import LearnConfig, learn_masks, masked_forward
from patchc.learn.masking import pattern_index
from patchc.prune import mask24_from_scores
from patchc.types import expand_tiles
from test_learn_helpers import (TILE, calib_batches, heldout_batches, lm_ce, single_thread,  # noqa: F401
                                tiny_llama_model, trained_llama)


def cfg(**kw):
    base = dict(tile=TILE, steps=10, lr=1e-2, progress=False)
    base.update(kw)
    return LearnConfig(**base)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.45])
def test_plan_meets_target_exactly(target):
    model = trained_llama()
    plan = learn_masks(model, calib_batches(16), cfg(target_sparsity=target))
    plan.validate().validate_against(model)
    assert abs(plan.sparsity() - target) <= 0.005
    kinds = torch.cat([m.tile_kind.flatten() for m in plan.values()])
    assert (kinds == 0).any() and (kinds == 1).any(), "both dense and 2:4 tiles"
    per_layer = {round(v, 4) for v in plan.meta["per_layer_sparsity"].values()}
    assert len(per_layer) > 1, "layers end at different sparsities"
    assert plan.meta["method"] == "patch-tile" and plan.meta["target_sparsity"] == target


def test_joint_masks_are_24_and_start_at_the_prior():
    model = trained_llama()
    data = calib_batches(16)
    mods = dict(model.named_modules())
    for steps, strength in ((0, 3.0), (3, 1e4)):
        plan = learn_masks(model, data, cfg(mode="joint", steps=steps, prior_strength=strength, target_sparsity=0.4))
        plan.validate()
        for name, m in plan.items():
            prior = mask24_from_scores(mods[name].weight.detach().abs())
            sparse = expand_tiles(m.tile_kind, m.tile, m.shape).bool()
            assert torch.equal(m.mask[sparse], prior[sparse]), f"{name} (steps={steps}) differs from the prior"
    # after real training the 2:4 masks moved but stay valid 2:4 in every sparse tile
    plan = learn_masks(model, data, cfg(mode="joint", steps=15, target_sparsity=0.4))
    plan.validate()
    for name, m in plan.items():
        sparse = expand_tiles(m.tile_kind, m.tile, m.shape).bool()
        groups = m.mask.reshape(m.shape[0], -1, 4).sum(-1)[sparse[:, ::4]]
        assert (groups == 2).all()
        pattern_index(torch.where(sparse, m.mask, mask24_from_scores(torch.rand(m.shape))))  # raises if not 2:4


def test_pattern_logits_have_their_own_learning_rate():
    """lr_24 steers only the 2:4 pattern logits: at a tiny lr_24 the learned patterns stay the
    prior's while the tile choice still moves; at lr_24 = lr they leave it."""
    model = trained_llama()
    data = calib_batches(16)
    mods = dict(model.named_modules())

    def changed(plan):
        n = 0
        for name, m in plan.items():
            prior = mask24_from_scores(mods[name].weight.detach().abs())
            sparse = expand_tiles(m.tile_kind, m.tile, m.shape).bool()
            n += int((m.mask[sparse] != prior[sparse]).sum())
        return n

    slow = learn_masks(model, data, cfg(mode="joint", steps=15, lr=2e-2, lr_24=1e-7, target_sparsity=0.4))
    fast = learn_masks(model, data, cfg(mode="joint", steps=15, lr=2e-2, lr_24=2e-2, target_sparsity=0.4))
    assert changed(slow) == 0 and changed(fast) > 0
    assert slow.meta["lr_24"] == 1e-7 and fast.meta["lr_24"] == 2e-2
    assert cfg(mode="joint", lr=2e-2).pattern_lr == pytest.approx(2e-3)        # default: lr / 10
    with pytest.raises(ValueError, match="lr_24"):
        cfg(lr_24=0.0)


def test_prior_strength_24_sets_the_2_4_gap_alone(tmp_path):
    """prior_strength_24 scales the step-0 gap of the prior's 2:4 pattern and nothing else: the tile
    logits follow prior_strength; at a huge 2:4 gap the learned patterns stay the prior's; it is part
    of a run's identity (a checkpoint written before the option ran with one gap for both)."""
    from patchc.learn.priors import build_states
    model = tiny_llama_model()
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    gen = torch.Generator().manual_seed(0)
    priors = {n: {"pattern24": torch.randint(0, 6, (m.out_features, m.in_features // 4), generator=gen,
                                             dtype=torch.uint8),
                  "density": torch.rand(-(-m.out_features // TILE[0]), -(-m.in_features // TILE[1]), generator=gen,
                                        dtype=torch.float64)} for n, m in mods.items()}
    one, two = (build_states(mods, priors, cfg(mode="joint", prior_strength=2.0, prior_strength_24=s24))
                for s24 in (None, 7.0))
    c = cfg(mode="joint")
    for n in mods:
        for st, gap in ((one[n], 2.0), (two[n], 7.0)):
            p = st.pattern_logits.detach() * c.kappa_24[0]              # in noise units
            top = p.max(0)
            assert torch.equal(top.indices, priors[n]["pattern24"].long())
            torch.testing.assert_close(top.values - p.min(0).values, torch.full_like(top.values, gap))
        assert torch.equal(one[n].tile_logits, two[n].tile_logits)
    assert cfg(prior_strength=2.0).pattern_prior_strength == 2.0 and cfg(prior_strength_24=5).to_dict()[
        "prior_strength_24"] == 5.0
    with pytest.raises(ValueError, match="prior_strength_24 must be positive"):
        cfg(prior_strength_24=0.0)
    # learning: a 2:4 gap no step can close keeps the prior's patterns while the tiles still move
    model, data = trained_llama(), calib_batches(16)
    plan = learn_masks(model, data, cfg(mode="joint", steps=6, lr=2e-2, lr_24=2e-2, prior_strength_24=1e4,
                                        target_sparsity=0.4))
    mods = dict(model.named_modules())
    for name, m in plan.items():
        prior = mask24_from_scores(mods[name].weight.detach().abs())
        sparse = expand_tiles(m.tile_kind, m.tile, m.shape).bool()
        assert torch.equal(m.mask[sparse], prior[sparse]), name
    assert plan.meta["prior_strength_24"] == 1e4 and plan.meta["prior_strength"] == 3.0
    check_option_in_checkpoint(model, data, cfg(mode="joint", steps=3, checkpoint_every=1, checkpoint_dir=str(tmp_path)),
                               "prior_strength_24", 5.0, "prior_strength_24: checkpoint 3.0 vs now 5.0")


def check_option_in_checkpoint(model, data, c, option, other, match):
    """A run stopped after step 0's checkpoint resumes only with the same ``option`` (``other``
    is refused with ``match``), and a checkpoint header written before the option existed
    resumes at its default."""
    def stop(step, rec):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        learn_masks(model, data, c, callback=stop)         # stopped after step 0's checkpoint
    with pytest.raises(ValueError, match=match):
        learn_masks(model, data, c, resume=True, **{option: other})
    head = pathlib.Path(c.checkpoint_dir) / "learn_ckpt.json"
    old = json.loads(head.read_text())
    del old["config"][option]
    head.write_text(json.dumps(old))
    steps = []
    learn_masks(model, data, c, resume=True, callback=lambda step, rec: steps.append(step))
    assert steps == [1, 2]


def test_pattern_mask_matches_softmax_einsum():
    """The fused 2:4 relaxation equals softmax + einsum under autograd, forward and backward."""
    from patchc.learn.masking import PATTERNS, _PatternMask
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 12, 5, generator=gen, dtype=torch.float64).requires_grad_()
    noise, grad = torch.randn(6, 12, 5, generator=gen, dtype=torch.float64), torch.randn(12, 20, generator=gen,
                                                                                          dtype=torch.float64)
    ref = torch.einsum("png,pj->ngj", torch.softmax(noise + 7.0 * logits, 0), PATTERNS.double()).reshape(12, 20)
    (g_ref,) = torch.autograd.grad(ref, logits, grad)
    out = _PatternMask.apply(logits, noise.clone(), 7.0)
    (g_out,) = torch.autograd.grad(out, logits, grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g_out, g_ref)
    assert torch.autograd.gradcheck(lambda x: _PatternMask.apply(x, noise.clone(), 7.0), (logits,))


def _state(lin, tile, mode, tile_logits, pattern_logits=None, pattern24=None, sched=None, seed=0):
    """A MaskState of ``lin`` outside a run, with its own generator and schedule."""
    from patchc.learn.state import MaskState, StepContext
    st = MaskState("l", lin, tile, mode, tile_logits, pattern_logits, pattern24)
    st.ctx = StepContext(torch.Generator().manual_seed(seed))
    st.ctx.sched = sched
    return st


def _draw(st, w):
    """This step's relaxed W ⊙ M of a state (a new step each call)."""
    st.begin_step()
    gen = st._generator()
    return st.masked_weight(w, st.gate(gen), st.pattern_logits, gen)


def test_joint_noise_is_gumbel():
    """Gumbel-max: near τ → 0 each group picks pattern p with probability softmax(κ·logits)_p."""
    lin = torch.nn.Linear(8, 1, bias=False)
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0])
    logits = torch.where(probs > 0, probs.log(), torch.tensor(-1e4)).view(6, 1, 1).expand(6, 1, 2)
    st = _state(lin, (1, 8), "joint", torch.zeros(1, 1), logits, sched={"tau": 1e-3, "kappa_tile": 1e4, "kappa_24": 1.0})
    counts = torch.zeros(6)
    with torch.no_grad():
        st.tile_logits.fill_(-1.0)                       # the tile is 2:4
        for _ in range(2000):
            cur = _draw(st, torch.ones(1, 8))
            counts += torch.bincount(pattern_index(cur.round().bool()).flatten(), minlength=6)
    torch.testing.assert_close(counts / counts.sum(), probs, atol=0.02, rtol=0)


@pytest.mark.parametrize("mode", ["tile", "joint"])
def test_relaxed_weight_holds_no_subnormals(mode, monkeypatch):
    """Saturated sigmoids / softmaxes (small τ) give mask values ~1e-40: W ⊙ M must not carry them
    as subnormal floats (CPU GEMMs on those run ~10-160× slower); without the floor it would."""
    from patchc.learn import masking
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64, bias=False)
    pattern = torch.randn(6, 64, 16) * 5 if mode == "joint" else None
    st = _state(lin, (4, 4), mode, torch.randn(16, 16) * 5, pattern,
                pattern_index(mask24_from_scores(lin.weight.detach().abs())),
                sched={"tau": 0.05, "kappa_tile": 1.0, "kappa_24": 1.0})

    def subnormal():
        with torch.no_grad():
            c = _draw(st, lin.weight.detach())
        return int(((c != 0) & (c.abs() < torch.finfo(c.dtype).tiny)).sum())

    assert subnormal() == 0
    monkeypatch.setattr(masking, "_FLOOR", 0.0)
    assert subnormal() > 0


@pytest.mark.parametrize("mode,loss,lr", [("tile", "lm", 3e-2), ("joint", "lm", 1e-2), ("tile", "distill", 3e-2)])
def test_learning_lowers_heldout_loss(mode, loss, lr):
    model = trained_llama()
    data, held = calib_batches(64), heldout_batches()
    c = cfg(mode=mode, loss=loss, target_sparsity=0.3, steps=40, lr=lr)
    prior_plan = learn_masks(model, data, c, steps=0)
    plan = learn_masks(model, data, c)
    assert abs(plan.sparsity() - prior_plan.sparsity()) < 1e-9
    ce0, ce1 = lm_ce(model, prior_plan, held), lm_ce(model, plan, held)
    assert ce1 < ce0 - 0.01, (ce0, ce1)


def test_model_restored_exactly():
    model = trained_llama()
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    x = calib_batches(1)[0]
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    model.train()
    learn_masks(model, calib_batches(8), cfg(steps=3, grad_checkpointing=True))
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("forward" in vars(m) for m in model.modules()), "a patched forward was left behind"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref)


@pytest.mark.parametrize("mode", ["tile", "joint"])
def test_memory_options_give_the_same_run(mode):
    """Checkpointed blocks, masks rebuilt in backward, Adam moments on the CPU and two batches
    accumulated per step change where memory goes, not the numbers: the same losses and plan as
    the plain run (two half batches: the same mean loss as one batch of both)."""
    model, data = trained_llama(), calib_batches(8, batch_size=4)
    halves = [b[i:i + 2] for b in data for i in (0, 2)]

    def run(batches, **kw):
        recs = []
        plan = learn_masks(model, batches, cfg(steps=4, mode=mode, **kw), callback=lambda s, r: recs.append(r["loss"]))
        return plan, recs
    a, la = run(data)
    for kw in (dict(grad_checkpointing=True), dict(recompute_masks=True), dict(offload_optimizer=True),
               dict(grad_checkpointing=True, recompute_masks=True)):
        b, lb = run(data, **kw)
        assert lb == la and all(torch.equal(a[n].mask, b[n].mask) for n in a), kw
    c, lc = run(halves, batches_per_step=2)
    assert lc == pytest.approx(la, rel=1e-5) and all(torch.equal(a[n].mask, c[n].mask) for n in a)


def test_bfloat16_state():
    model = trained_llama()
    dtypes = set()

    def look(step, rec):
        dtypes.update(p.dtype for n, p in model.named_parameters() if p.requires_grad)
    plan = learn_masks(model, calib_batches(8), cfg(steps=3, mode="joint", state_dtype="bf16"), callback=look)
    plan.validate()
    assert dtypes == {torch.bfloat16} and abs(plan.sparsity() - 0.35) <= 0.005
    with pytest.raises(ValueError, match="state_dtype"):
        LearnConfig(state_dtype="float16")
    with pytest.raises(ValueError, match="batches_per_step"):
        LearnConfig(batches_per_step=0)
    with pytest.raises(ValueError, match="strategy"):
        LearnConfig(strategy="zero3")


def test_save_load_apply_reproduces_the_masked_model(tmp_path):
    model, x = trained_llama(), calib_batches(2)[0]
    plan = learn_masks(model, calib_batches(16), cfg(mode="joint", target_sparsity=0.35))
    with torch.no_grad(), masked_forward(model, plan):
        want = model(input_ids=x).logits
    loaded = patchc.MaskPlan.load(plan.save(tmp_path / "masks.safetensors"))
    assert all(torch.equal(loaded[n].mask, plan[n].mask) for n in plan)
    pruned = patchc.apply_plan(copy.deepcopy(model), loaded)
    with torch.no_grad():
        got = pruned(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, model(input_ids=x).logits.detach())  # the masks did something


def test_resume_gives_the_same_plan(tmp_path, caplog):
    model, data = trained_llama(), calib_batches(16)
    c = cfg(mode="joint", steps=8, checkpoint_every=3)
    with caplog.at_level(logging.WARNING, logger="patchc"):
        full = learn_masks(model, data, c, checkpoint_dir=str(tmp_path / "a"))
    said = [r.getMessage() for r in caplog.records if "each checkpoint takes" in r.getMessage()]
    assert len(said) == 1 and "B per planned weight" in said[0], "the checkpoint's disk size is said once"

    class Stop(Exception):
        pass

    def interrupt(step, rec):
        if step == 4:
            raise Stop
    with pytest.raises(Stop):
        learn_masks(model, data, c, checkpoint_dir=str(tmp_path / "b"), callback=interrupt)
    assert not any("forward" in vars(m) for m in model.modules())
    resumed = learn_masks(model, data, c, checkpoint_dir=str(tmp_path / "b"), resume=True)
    for n in full:
        assert torch.equal(full[n].mask, resumed[n].mask) and torch.equal(full[n].tile_kind, resumed[n].tile_kind)
    log = [json.loads(line) for line in open(tmp_path / "b" / "learn_log.jsonl")]
    assert [r["step"] for r in log] == list(range(8))
    assert {"loss", "soft_density", "tau"} <= set(log[0])
    with pytest.raises(ValueError, match="seed"):
        learn_masks(model, data, c, checkpoint_dir=str(tmp_path / "b"), resume=True, seed=1)
    with pytest.raises(ValueError, match="batches_per_step"):
        learn_masks(model, data, c, checkpoint_dir=str(tmp_path / "b"), resume=True, batches_per_step=2)
    from patchc.learn.checkpoint import read_tensors
    header, tensors = read_tensors(str(tmp_path / "a"))          # a checkpoint read whole, without a run
    name = next(iter(full))
    assert header["next_step"] == 8 and tensors[f"{name}.pattern_logits"].shape[0] == 6
    assert int(tensors["adam.step"]) == 8 and f"adam.{name}.tile_logits.exp_avg" in tensors
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "learn_ckpt.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="former single-file format"):
        learn_masks(model, data, c, checkpoint_dir=str(tmp_path / "v1"), resume=True)


def test_conv1d_model_learns():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)).eval()
    plan = learn_masks(model, calib_batches(4, seq_len=32), cfg(steps=3, mode="joint", prior="wanda"))
    plan.validate().validate_against(model)
    assert set(plan) == {f"transformer.h.{i}.{m}" for i in range(2)
                         for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert abs(plan.sparsity() - 0.35) <= 0.005


def test_bad_inputs_raise_clear_errors():
    model, data = tiny_llama_model(), calib_batches(2)
    with pytest.raises(ValueError, match="target_sparsity"):
        learn_masks(model, data, cfg(target_sparsity=0.6))
    with pytest.raises(ValueError, match="target_sparsity"):
        LearnConfig(target_sparsity=-0.1)
    with pytest.raises(ValueError, match=r"k_proj: tile \(64, 64\) is larger"):
        learn_masks(model, data, cfg(tile=(64, 64)))
    with pytest.raises(ValueError, match="no linear layers.*include"):
        learn_masks(model, data, cfg(include=["*.nothing"]))
    with pytest.raises(ValueError, match="empty"):
        learn_masks(model, [], cfg())
    with pytest.raises(ValueError, match="mode"):
        LearnConfig(mode="both")
    with pytest.raises(ValueError, match="loss"):
        LearnConfig(loss="mse")
    with pytest.raises(ValueError, match="resume"):
        LearnConfig(resume=True)
    with pytest.raises(ValueError, match="tile"):
        LearnConfig(tile=(16, 10))


def test_jsonl_log_and_include(tmp_path):
    model = trained_llama()
    plan = learn_masks(model, calib_batches(8), cfg(steps=3, include=["*.mlp.*"], log_path=str(tmp_path / "l.jsonl")))
    assert set(plan) == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    recs = [json.loads(line) for line in open(tmp_path / "l.jsonl")]
    assert len(recs) == 3 and recs[0]["tau"] == 4.0 and 0 < recs[0]["soft_density"] <= 1


def test_import_does_not_pull_triton_or_dynamo():
    code = ("import sys, patchc.learn, patchc.learn.trainer, patchc.learn.pruners, patchc.npz, "
            "patchc.learn.cli, patchc.data; "
            "bad = [m for m in ('triton', 'torch._dynamo') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sparsegpt_prior_in_bfloat16():
    model = trained_llama()
    plan = learn_masks(model, calib_batches(8), cfg(steps=3, mode="joint", prior="sparsegpt", dtype="bfloat16"))
    plan.validate().validate_against(model)
    assert abs(plan.sparsity() - 0.35) <= 0.005 and plan.meta["prior"] == "sparsegpt"
    assert next(model.parameters()).dtype == torch.bfloat16       # dtype moves the model, like model.to


def test_coarse_grid_reaches_the_target_with_the_fewest_tiles_and_a_warning(caplog):
    import logging
    model = trained_llama()
    with caplog.at_level(logging.WARNING, logger="patchc"):
        plan = learn_masks(model, calib_batches(4), cfg(tile=(64, 64), steps=2, target_sparsity=0.3,
                                                        include=["model.layers.0.mlp.down_proj"]))
    assert plan.sparsity() == 0.5 and "too coarse" in caplog.text      # 2 tiles: 0, 0.25 or 0.5; >= 0.3


def test_hidden_distill_adds_the_block_output_mismatch(tmp_path):
    from patchc.learn.losses import hidden_mismatch
    t = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    s = [x + 0.1 * torch.randn_like(x) for x in t]
    valid = torch.tensor([True] * 9 + [False])
    want = torch.stack([((a - b).reshape(-1, 8)[:9].square().sum(-1) / b.reshape(-1, 8)[:9].square().sum(-1)).mean()
                        for a, b in zip(s, t)]).mean()
    assert torch.allclose(hidden_mismatch(s, t, valid), want) and float(hidden_mismatch(t, t, valid)) == 0.0
    with pytest.raises(RuntimeError, match="1 student and 2 teacher"):
        hidden_mismatch(s[:1], t, valid)
    # the term is linear in its weight and leaves everything else of the step alone: the KL and the
    # Gumbel noise are the same, so the first step's task losses lie on a line
    model, data = trained_llama(), calib_batches(8)
    first = {}
    for w in (0.0, 1.0, 2.0):
        learn_masks(model, data, cfg(mode="joint", loss="distill", hidden_distill=w, steps=1),
                    callback=lambda step, rec, w=w: first.setdefault(w, rec))
    d1, d2 = (first[w]["task_loss"] - first[0.0]["task_loss"] for w in (1.0, 2.0))
    assert d1 > 1e-4 and d2 == pytest.approx(2 * d1, rel=1e-4)
    assert "hidden_mismatch" not in first[0.0]        # the log says the unweighted term
    assert first[1.0]["hidden_mismatch"] == pytest.approx(d1, rel=1e-4) == first[2.0]["hidden_mismatch"]
    plan = learn_masks(model, data, cfg(mode="joint", loss="distill", hidden_distill=1.0, steps=6))
    plan.validate().validate_against(model)
    assert abs(plan.sparsity() - 0.35) <= 0.005
    # it is part of a run's identity: a checkpoint resumes only with the same weight, and a
    # checkpoint written before the option existed counts as the default (0)
    check_option_in_checkpoint(model, data, cfg(loss="distill", steps=3, checkpoint_every=1, checkpoint_dir=str(tmp_path)),
                               "hidden_distill", 0.5, "hidden_distill: checkpoint 0.0 vs now 0.5")


def test_hidden_distill_bad_inputs():
    with pytest.raises(ValueError, match="hidden_distill=0.5 needs loss='distill'"):
        LearnConfig(hidden_distill=0.5)
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="hidden_distill must be a finite number"):
            LearnConfig(loss="distill", hidden_distill=bad)

    class Flat(torch.nn.Module):                # linears but no list of blocks
        def __init__(self):
            super().__init__()
            self.emb, self.a, self.b = torch.nn.Embedding(256, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 256)

        def forward(self, input_ids, **kw):
            return self.b(torch.relu(self.a(self.emb(input_ids))))
    with pytest.raises(ValueError, match="hidden_distill=1.0: Flat has no nn.ModuleList"):
        learn_masks(Flat(), calib_batches(2), cfg(loss="distill", hidden_distill=1.0))


def test_pattern_plan_gives_the_2_4_patterns(tmp_path):
    model, data = trained_llama(), calib_batches(8)
    src = learn_masks(model, data, cfg(mode="joint", target_sparsity=0.5, steps=3))   # a learned 2:4 plan
    path = str(tmp_path / "l24.safetensors")
    src.save(path)
    wanda = learn_masks(model, data, cfg(prior="wanda", steps=2))
    plan = learn_masks(model, data, cfg(prior="wanda", steps=2, pattern_plan=path))
    assert abs(plan.sparsity() - 0.35) <= 0.005
    differs = 0
    for n, m in plan.items():
        sparse = expand_tiles(m.tile_kind.bool(), m.tile, m.shape)
        assert torch.equal(m.mask[sparse], src[n].mask[sparse]), n          # every 2:4 tile: the plan's pattern
        w = wanda[n]
        both = expand_tiles((m.tile_kind & w.tile_kind).bool(), m.tile, m.shape)
        differs += int((m.mask[both] != w.mask[both]).sum())
    assert differs > 0, "the prior's own patterns differ from the plan's"
    # the plan is checked before any work: missing layers, other shapes, no file
    part = str(tmp_path / "part.safetensors")
    patchc.plan.MaskPlan({k: v for k, v in src.items() if "mlp" in k}, src.meta).save(part)
    with pytest.raises(ValueError, match=r"part.safetensors: no mask for the learned linear model.layers.0.self_attn"):
        learn_masks(model, data, cfg(pattern_plan=part))
    wide = tiny_llama_model(intermediate_size=192)
    with pytest.raises(ValueError, match=r"l24.safetensors: model.layers.0.mlp.gate_proj is \(128, 64\) in the plan, "
                                         r"\(192, 64\) in the model"):
        learn_masks(wide, data, cfg(pattern_plan=path))
    with pytest.raises(FileNotFoundError, match="pattern_plan: .*nothing.safetensors is not a file"):
        LearnConfig(pattern_plan=str(tmp_path / "nothing.safetensors"))
