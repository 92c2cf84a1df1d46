"""One-shot pruners: magnitude, Wanda, SparseGPT (2:4, unstructured, hybrid) and the priors."""
import pytest
import torch

from patchc.learn.calib import collect_stats, default_linears, materialize
from patchc.modules import oriented_weight
from patchc.learn.pruners import oneshot
from patchc.prune import magnitude_hybrid, mask24_from_scores
from patchc.learn.pruners import oneshot_hybrid
from patchc.learn.sparsegpt import sparsegpt_prune
from test_learn_helpers import TILE, calib_batches, single_thread, trained_llama  # noqa: F401


@pytest.fixture
def setup():
    return trained_llama(), calib_batches(8)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_24_plans_are_valid(setup, method):
    model, data = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = oneshot(model, data, method=method, tile=TILE)
    plan.validate().validate_against(model)
    assert abs(plan.sparsity() - 0.5) < 1e-9
    assert all(int(m.tile_kind.min()) == 1 for m in plan.values()), "every tile is 2:4"
    assert plan.meta["weights_updated"] is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "model mutated unasked"
    assert set(plan) == set(default_linears(model))


def test_wanda_uses_activations(setup):
    model, data = setup
    mag, wanda = oneshot(model, None, "magnitude", tile=TILE), oneshot(model, data, "wanda", tile=TILE)
    assert any(not torch.equal(mag[n].mask, wanda[n].mask) for n in mag)


def _recon_error(model, data, masks_or_weights):
    """Σ ‖X Wᵀ − X Ŵᵀ‖² over the calibration activations, via XᵀX: tr(D H Dᵀ) with D = W − Ŵ."""
    mods = default_linears(model)
    stats = collect_stats(model, mods, materialize(data), hessian=True)
    tot = 0.0
    for n, m in mods.items():
        d = oriented_weight(m).detach().double() - masks_or_weights[n].double()
        tot += float(torch.einsum("ik,kl,il->", d, stats[n].hess.double(), d))
    return tot


def test_sparsegpt_reconstructs_better_than_magnitude(setup):
    model, data = setup
    mag = oneshot(model, None, "magnitude", tile=TILE)
    mods = default_linears(model)
    err_mag = _recon_error(model, data, {n: oriented_weight(m).detach() * mag[n].mask for n, m in mods.items()})
    pruned = trained_llama()
    plan = oneshot(pruned, data, "sparsegpt", tile=TILE, update_weights=True)
    assert plan.meta["weights_updated"] is True
    new = {n: oriented_weight(m).detach().clone() for n, m in default_linears(pruned).items()}
    for n in new:
        assert not (new[n] * ~plan[n].mask).any(), f"{n}: sparsegpt left pruned weights non-zero"
    err_sgpt = _recon_error(model, data, new)
    assert err_sgpt < 0.8 * err_mag, (err_sgpt, err_mag)


def test_sparsegpt_sweep_on_one_layer():
    torch.manual_seed(0)
    w, x = torch.randn(32, 64), torch.randn(512, 64) @ torch.randn(64, 64)
    h = 2 * x.t() @ x / x.shape[0]
    keep24, w24 = sparsegpt_prune(w, h, pattern="2:4", blocksize=16)
    assert (keep24.view(32, 16, 4).sum(-1) == 2).all() and not (w24 * ~keep24).any()
    keep_u, w_u = sparsegpt_prune(w, h, sparsity=0.25, pattern="unstructured", blocksize=16)
    assert abs(1 - keep_u.float().mean().item() - 0.25) < 0.01
    # the update compensates: output error is below that of simply masking the weight
    assert ((x @ (w - w24).t()) ** 2).sum() < ((x @ (w * ~keep24).t()) ** 2).sum()
    # with the mask given instead of chosen, the same sweep: the same weights
    keep_f, w_f = sparsegpt_prune(w, h, blocksize=16, mask=keep24)
    assert torch.equal(keep_f, keep24) and torch.equal(w_f, w24)


def test_unstructured_masks(setup):
    model, data = setup
    for method in ("magnitude", "wanda", "sparsegpt"):
        masks = oneshot(model, data, method, pattern="unstructured", sparsity=0.3, tile=TILE)
        assert set(masks) == set(default_linears(model))
        for n, m in masks.items():
            assert m.dtype == torch.bool and abs(1 - m.float().mean().item() - 0.3) < 0.02, (method, n)


def test_hybrid_meets_target(setup):
    model, data = setup
    for method in ("magnitude", "wanda"):
        plan = oneshot_hybrid(model, data, method, target_sparsity=0.3, tile=TILE)
        plan.validate()
        assert abs(plan.sparsity() - 0.3) <= 0.005
    ref = magnitude_hybrid(model, 0.3, TILE, include=list(default_linears(model)))
    mine = oneshot_hybrid(model, None, "magnitude", target_sparsity=0.3, tile=TILE)
    assert all(torch.equal(ref[n].mask, mine[n].mask) for n in ref), "magnitude hybrid == patchc.prune's"


def test_oneshot_errors(setup):
    model, data = setup
    with pytest.raises(ValueError, match="calibration batches"):
        oneshot(model, None, "wanda", tile=TILE)
    with pytest.raises(ValueError, match="method"):
        oneshot(model, data, "obs", tile=TILE)
    with pytest.raises(ValueError, match="pattern"):
        oneshot(model, data, pattern="4:8", tile=TILE)
    with pytest.raises(ValueError, match="sparsity"):
        oneshot(model, data, pattern="unstructured", sparsity=1.5)
    with pytest.raises(ValueError, match="update_weights"):
        oneshot(model, data, "wanda", update_weights=True, tile=TILE)
    with pytest.raises(ValueError, match="empty"):
        oneshot(model, [], "wanda", tile=TILE)
    with pytest.raises(ValueError, match="larger than the weight"):
        oneshot(model, None, tile=(128, 128))
    with pytest.raises(ValueError, match="target_sparsity"):
        oneshot_hybrid(model, None, target_sparsity=0.7, tile=TILE)


def _block_stats(model, data, sequential, weights_fn):
    """Statistics each planned linear's calibration sees, streamed block by block."""
    from patchc.learn.stream import calibrate
    mods = default_linears(model)
    seen = {}

    def on_layers(stats):
        seen.update({n: (st.sq.clone(), st.hess.clone(), st.rows) for n, st in stats.items()})
        return {n: weights_fn(n, oriented_weight(mods[n]).detach()) for n in stats}
    calibrate(model, mods, materialize(data), on_layers, hessian=True, sequential=sequential)
    return seen


def test_streamed_calibration_is_one_dense_pass(setup):
    model, data = setup
    full = collect_stats(model, default_linears(model), materialize(data), hessian=True)
    streamed = _block_stats(model, data, False, lambda n, w: w * 0)     # returned weights unused
    for n, st in full.items():
        sq, hess, rows = streamed[n]
        assert torch.equal(sq, st.sq) and torch.equal(hess, st.hess) and rows == st.rows, n


def test_sequential_calibration_sees_the_pruned_blocks_before(setup):
    """Block 1 is calibrated on the outputs of block 0 computed with the weights block 0's pruning
    returned: the same statistics as one dense pass of a model whose block 0 holds those weights."""
    import copy
    model, data = setup
    pruned = {}

    def prune(name, w):
        pruned[name] = w * mask24_from_scores(w.abs()).to(w.dtype)
        return pruned[name]
    seq = _block_stats(model, data, True, prune)
    edited = copy.deepcopy(model)
    mods = default_linears(edited)
    with torch.no_grad():
        for n in mods:
            if n.startswith("model.layers.0."):
                oriented_weight(mods[n]).copy_(pruned[n])
    ref = collect_stats(edited, mods, materialize(data), hessian=True)
    dense = _block_stats(model, data, False, prune)
    for n in mods:         # block 0 itself is calibrated on dense activations, block 1 on pruned block 0's
        want = ref[n].hess if n.startswith("model.layers.1.") else dense[n][1]
        assert torch.equal(seq[n][1], want), n
    assert not torch.equal(dense["model.layers.1.mlp.down_proj"][1], seq["model.layers.1.mlp.down_proj"][1])


@pytest.mark.parametrize("sequential", [False, True])
def test_sparsegpt_returns_updated_weights_without_touching_the_model(setup, sequential):
    model, data = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan, weights = oneshot(model, data, "sparsegpt", tile=TILE, return_weights=True, sequential=sequential)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "model mutated unasked"
    assert plan.meta["weights_updated"] is False and plan.meta["calibration"] == ("sequential" if sequential else "dense")
    mods = default_linears(model)
    assert list(weights) == list(plan) == list(mods)
    for n, w in weights.items():
        assert w.shape == mods[n].weight.shape and w.dtype == mods[n].weight.dtype and w.device.type == "cpu"
        assert not (w * ~plan[n].mask).any(), f"{n}: pruned weights not zero"
        assert not torch.equal(w, mods[n].weight.detach() * plan[n].mask), f"{n}: weights not updated"
    # update_weights=True writes the same weights into the model
    inplace = trained_llama()
    oneshot(inplace, data, "sparsegpt", tile=TILE, update_weights=True, sequential=sequential)
    got = dict(inplace.named_modules())
    assert all(torch.equal(got[n].weight, w) for n, w in weights.items())
    # methods that change no weight return none
    assert oneshot(model, data, "wanda", tile=TILE, return_weights=True)[1] == {}


def test_updated_weights_of_conv1d_keep_its_layout():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)).eval()
    plan, weights = oneshot(model, calib_batches(4, seq_len=32), "sparsegpt", tile=TILE, return_weights=True,
                            sequential=True)
    mods = dict(model.named_modules())
    for n, w in weights.items():
        assert w.shape == mods[n].weight.shape                     # Conv1D: (in, out)
        assert not (w.t() * ~plan[n].mask).any()


def test_model_without_decoder_blocks_is_calibrated_in_one_pass():
    """Linears outside any list of blocks are calibrated in one dense pass of the whole model."""
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.a, self.b = torch.nn.Embedding(256, 32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

        def forward(self, input_ids):
            return self.b(torch.relu(self.a(self.emb(input_ids))))
    torch.manual_seed(0)
    model, data = Flat(), calib_batches(4)
    for seq in (False, True):
        plan = oneshot(model, data, "wanda", tile=TILE, sequential=seq)
        plan.validate().validate_against(model)
        assert set(plan) == {"a", "b"}
    ref = collect_stats(model, {"a": model.a, "b": model.b}, materialize(data))
    score = model.b.weight.detach().abs() * ref["b"].sq.sqrt()[None, :]
    assert torch.equal(plan["b"].mask, mask24_from_scores(score))


def test_selected_tiles_reach_the_target_never_below():
    from patchc.prune import select_sparse_tiles
    g = torch.Generator().manual_seed(0)
    sizes = {"a": torch.full((7, 5), 256.0), "b": torch.full((3, 9), 64.0)}
    costs = {n: torch.rand(s.shape, generator=g) for n, s in sizes.items()}
    allowed = {n: torch.ones(s.shape, dtype=torch.bool) for n, s in sizes.items()}
    total = sum(float(s.sum()) for s in sizes.values())
    for target in (0.0, 0.1, 0.2499, 0.25, 0.3, 0.5):
        kinds = select_sparse_tiles(costs, sizes, allowed, target)
        pruned = sum(float((kinds[n].double() * sizes[n]).sum()) / 2 for n in sizes)
        assert pruned >= target * total - 1e-6
        if pruned:                       # without the costliest chosen tile the plan would be below the target
            last = max((float(costs[n][kinds[n].bool()].max()), n) for n in sizes if kinds[n].any())[1]
            size = float(sizes[last][kinds[last].bool()][costs[last][kinds[last].bool()].argmax()])
            assert pruned - size / 2 < target * total
