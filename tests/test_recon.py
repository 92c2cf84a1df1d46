"""Weight reconstruction for a fixed plan: the OBS update of the kept weights, one block at a time."""
import copy

import pytest
import torch

from patchc.learn import oneshot_hybrid, reconstruct_weights
from patchc.learn.recon import reconstruction_error
from patchc.learn.sparsegpt import sparsegpt_prune
from test_learn_helpers import calib_batches, heldout_batches, lm_ce, single_thread, trained_llama  # noqa: F401

TILE = (16, 16)


@pytest.fixture(scope="module")
def setup():
    model = trained_llama()
    data = calib_batches(n=32)
    plan = oneshot_hybrid(model, data, "wanda", target_sparsity=0.3, tile=TILE)
    return model, data, plan


@pytest.mark.parametrize("sequential", [False, True])
def test_reconstruction_keeps_the_mask_lowers_every_layer_error_and_leaves_the_model(setup, sequential):
    model, data, plan = setup
    before = copy.deepcopy(model.state_dict())
    w = reconstruct_weights(model, plan, data, sequential=sequential)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(w) == list(plan)
    for n, t in w.items():
        keep = plan[n].unpacked()
        assert t.shape == dict(model.named_modules())[n].weight.shape and t.dtype == torch.float32
        assert not t[~keep].any()
        # a layer left all dense has no pruning error to compensate: unchanged; the others move
        assert torch.equal(t, before[f"{n}.weight"]) == bool(keep.all()), n
    errs = reconstruction_error(model, plan, w, data)
    if not sequential:      # one dense pass: each layer's least-squares problem is exactly the measured one
        assert all(after < masked or masked == after == 0 for masked, after in errs.values()), errs


def test_reconstruction_lowers_the_held_out_loss(setup):
    model, data, plan = setup
    rec = copy.deepcopy(model)
    rec.load_state_dict({f"{k}.weight": v for k, v in reconstruct_weights(model, plan, data).items()}, strict=False)
    held = heldout_batches()
    assert lm_ce(rec, plan, held) < lm_ce(model, plan, held)


def test_fixed_mask_is_sparsegpt_own_update():
    torch.manual_seed(1)
    w, x = torch.randn(8, 32), torch.randn(64, 32)
    hess = 2 * x.t() @ x / 64
    keep, w1 = sparsegpt_prune(w, hess, pattern="2:4")
    keep2, w2 = sparsegpt_prune(w, hess, mask=keep)
    assert torch.equal(keep, keep2) and torch.allclose(w1, w2, atol=1e-5)


def test_damping_pulls_the_update_toward_the_masked_weights(setup):
    model, data, plan = setup
    mods = dict(model.named_modules())

    def moved(**damping):
        w = reconstruct_weights(model, plan, data, **damping)
        return sum(float((w[n] - mods[n].weight.detach() * plan[n].unpacked()).norm()) for n in plan)
    iso = [moved(percdamp=d, diagdamp=0.0) for d in (0.01, 0.3, 10.0)]
    assert iso[0] > iso[1] > iso[2] > 0, iso
    per_input = [moved(diagdamp=d) for d in (0.0, 1.0, 100.0)]
    assert per_input[0] > per_input[1] > per_input[2] > 0, per_input
    assert per_input[0] == pytest.approx(iso[0])      # diagdamp 0 is the isotropic damping alone


def test_diagonal_damping_is_invariant_to_the_scale_of_an_input():
    # H + a·diag(H) damps every input in proportion to its own energy: scaling input j by s (and
    # column j of W by 1/s, the same function) gives the same update, column j scaled by 1/s;
    # isotropic damping does not (it damps a loud input's column relatively less)
    torch.manual_seed(2)
    w, x = torch.randn(8, 32), torch.randn(256, 32)
    keep = torch.rand(8, 32) > 0.4
    s = torch.ones(32)
    s[3], s[10] = 30.0, 0.05
    xs, ws = x * s, w / s

    def update(w_, x_, **damping):
        return sparsegpt_prune(w_, 2 * x_.t() @ x_ / 256, mask=keep, **damping)[1]
    def gap(**damping):       # largest difference of the two updates, in the original parametrisation
        return float((update(ws, xs, **damping) * s - update(w, x, **damping)).abs().max())
    assert gap(percdamp=1e-6, diagdamp=1.0) < 5e-3 < 0.1 < gap(percdamp=1.0, diagdamp=0.0)


def test_bad_inputs(setup):
    model, data, plan = setup
    for bad in (0, -0.1, float("nan"), float("inf"), True, "0.3"):
        with pytest.raises(ValueError, match="percdamp must be a finite number > 0"):
            reconstruct_weights(model, plan, data, percdamp=bad)
    for bad in (-0.1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="diagdamp must be a finite number >= 0"):
            reconstruct_weights(model, plan, data, diagdamp=bad)
    with pytest.raises(ValueError, match="needs calibration batches"):
        reconstruct_weights(model, plan, None)
    with pytest.raises(TypeError, match="MaskPlan"):
        reconstruct_weights(model, {}, data)


def test_a_subset_of_layers_is_reconstructed_with_the_others_masked_in_the_stream(setup):
    from patchc.plan import MaskPlan
    model, data, plan = setup
    mlp = [n for n in plan if ".mlp." in n]
    assert mlp and len(mlp) < len(plan)
    before = copy.deepcopy(model.state_dict())
    w = reconstruct_weights(model, plan, data, sequential=True, layers=mlp)
    assert list(w) == mlp
    # reference: the other planned linears set to W ⊙ M in a copy, only the MLP's in the plan
    masked = copy.deepcopy(model)
    mods = dict(masked.named_modules())
    with torch.no_grad():
        for n in plan:
            if n not in mlp:
                mods[n].weight.mul_(plan[n].unpacked().to(mods[n].weight.dtype))
    sub = MaskPlan({n: plan[n] for n in mlp})
    ref = reconstruct_weights(masked, sub, data, sequential=True)
    assert all(torch.allclose(w[n], ref[n], atol=1e-5) for n in mlp)
    # the stream matters: with the attention left dense (the MLP alone in the plan) the updates differ
    dense_stream = reconstruct_weights(model, sub, data, sequential=True)
    assert any(not torch.allclose(w[n], dense_stream[n], atol=1e-4) for n in mlp[1:])
    # one pass: the same, on the activations of the model with the other linears masked
    one = reconstruct_weights(model, plan, data, sequential=False, layers=mlp)
    assert all(torch.allclose(one[n], reconstruct_weights(masked, sub, data, sequential=False)[n], atol=1e-5)
               for n in mlp)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.modules())     # the masking hooks are gone


def test_bad_layers(setup):
    model, data, plan = setup
    with pytest.raises(ValueError, match=r"layers not in the plan: \['model.nope'\]"):
        reconstruct_weights(model, plan, data, layers=["model.nope"])
    with pytest.raises(ValueError, match="layers is empty"):
        reconstruct_weights(model, plan, data, layers=[])
    with pytest.raises(TypeError, match="iterable of linear names"):
        reconstruct_weights(model, plan, data, layers=next(iter(plan)))


def test_strength_takes_a_fraction_of_each_update(setup):
    model, data, plan = setup
    mods = dict(model.named_modules())
    full = reconstruct_weights(model, plan, data, sequential=False, strength=1.0)
    half = reconstruct_weights(model, plan, data, sequential=False, strength=0.5)
    default = reconstruct_weights(model, plan, data, sequential=False)          # RECON_STRENGTH, 0.3
    for n in plan:
        masked = mods[n].weight.detach() * plan[n].unpacked()
        assert torch.allclose(half[n], masked + 0.5 * (full[n] - masked), atol=1e-6), n
        assert torch.allclose(default[n], masked + 0.3 * (full[n] - masked), atol=1e-6), n
    # sequential: the blocks after a layer are calibrated on its weakened update, not the full one
    seq_full = reconstruct_weights(model, plan, data, sequential=True, strength=1.0)
    seq_half = reconstruct_weights(model, plan, data, sequential=True, strength=0.5)
    last = [n for n in plan if ".layers.1." in n]
    assert last and any(not torch.allclose(
        seq_half[n], mods[n].weight.detach() * plan[n].unpacked() * 0.5 + 0.5 * seq_full[n], atol=1e-4)
        for n in last)
    for bad in (0, -0.5, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            reconstruct_weights(model, plan, data, strength=bad)
