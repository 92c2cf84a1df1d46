import atexit
import copy
import os
import shutil
import sys
import tempfile

import pytest
import torch
from torch import nn

# every run starts from its own empty cache (kernels, plans, calibration): no stale hits from an
# earlier run or another checkout, nothing left behind
_CACHE = tempfile.mkdtemp(prefix="patchc-test-cache-")
# the benchmarks (bench/, outside the wheel) import as the package ``bench`` from the checkout
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
os.environ["PATCHC_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)


class MLP(nn.Module):
    def __init__(self, d_in=64, d_hid=96, d_out=48, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hid, bias=bias)
        self.fc2 = nn.Linear(d_hid, d_out, bias=bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_llama_config(**kw):
    from transformers import LlamaConfig
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(seed=0, **kw):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).eval()


def masked_reference(model, plan, dtype=torch.float64):
    """A float64 copy of the model with the plan applied: the ground truth every path must match."""
    import patchc
    ref = copy.deepcopy(model).to(dtype)
    patchc.apply_plan(ref, plan)
    return ref


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def llama():
    return tiny_llama()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for it in items:
            if "gpu" in it.keywords:
                it.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: dynamo's per-code recompile limit would otherwise make a
    later test silently run its model eagerly."""
    import patchc
    torch._dynamo.reset()
    patchc.counters.reset()
    yield
