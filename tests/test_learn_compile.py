"""A learned plan compiles with the ``patch`` backend and reproduces the learned masked model."""
import torch

import patchc
from patchc.learn import LearnConfig, learn_masks, masked_forward
from test_learn_helpers import TILE, calib_batches, single_thread, trained_llama  # noqa: F401


def test_learned_plan_through_torch_compile(tmp_path):
    model = trained_llama()
    plan = learn_masks(model, calib_batches(8), LearnConfig(mode="joint", target_sparsity=0.35, tile=TILE,
                                                            steps=5, progress=False))
    path = plan.save(tmp_path / "masks.safetensors")
    x = calib_batches(2, seed=5)[0]
    with torch.no_grad(), masked_forward(model, plan):
        want = model(input_ids=x).logits
    compiled = torch.compile(model, backend="patch", options={"plan": path, "inner": "eager"})
    with torch.inference_mode():
        got = compiled(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    decisions = {d.fqn: d.action for d in patchc.explain(compiled).decisions}
    assert all(decisions[n] == "hybrid" for n in plan)
