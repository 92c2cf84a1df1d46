"""The decode benchmark's models: a built-in Llama with its own static KV cache (``--impl native``),
a transformers Llama with ``StaticCache`` (``--impl hf``), and ``Decoder``, which prefills eagerly
and runs one compiled step per generated token.  Used by ``bench.e2e_decode``."""
from __future__ import annotations

import inspect


def _import_torch():
    import torch
    return torch


def build_native(m: dict, batch: int, max_len: int, device, dtype):
    """A Llama decoder with a static KV cache of its own (names as in transformers)."""
    torch = _import_torch()
    from torch import nn
    import torch.nn.functional as F

    hd = m["hidden"] // m["heads"]

    class RMSNorm(nn.Module):
        def __init__(self, h):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(h))

        def forward(self, x):
            v = x.float().pow(2).mean(-1, keepdim=True)
            return (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype) * self.weight

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            h, kv = m["heads"], m["kv_heads"]
            self.q_proj = nn.Linear(m["hidden"], h * hd, bias=False)
            self.k_proj = nn.Linear(m["hidden"], kv * hd, bias=False)
            self.v_proj = nn.Linear(m["hidden"], kv * hd, bias=False)
            self.o_proj = nn.Linear(h * hd, m["hidden"], bias=False)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(m["hidden"], m["intermediate"], bias=False)
            self.up_proj = nn.Linear(m["hidden"], m["intermediate"], bias=False)
            self.down_proj = nn.Linear(m["intermediate"], m["hidden"], bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm(m["hidden"])
            self.self_attn = Attn()
            self.post_attention_layernorm = RMSNorm(m["hidden"])
            self.mlp = MLP()

    def rope(x, cos, sin):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(m["vocab"], m["hidden"])
            self.layers = nn.ModuleList(Layer() for _ in range(m["layers"]))
            self.norm = RMSNorm(m["hidden"])

    class NativeLlama(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(m["hidden"], m["vocab"], bias=False)
            shape = (m["layers"], batch, m["kv_heads"], max_len, hd)
            self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
            self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
            self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd), persistent=False)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, cache_position):
            b, s = input_ids.shape
            x = self.model.embed_tokens(input_ids)
            ang = cache_position.float()[:, None] * self.inv_freq[None, :]
            ang = torch.cat((ang, ang), -1)
            cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
            keep = torch.arange(max_len, device=x.device)[None, :] <= cache_position[:, None]      # [s, L]
            rep = m["heads"] // m["kv_heads"]
            for i, layer in enumerate(self.model.layers):
                a = layer.self_attn
                h = layer.input_layernorm(x)
                q = a.q_proj(h).view(b, s, m["heads"], hd).transpose(1, 2)
                k = a.k_proj(h).view(b, s, m["kv_heads"], hd).transpose(1, 2)
                v = a.v_proj(h).view(b, s, m["kv_heads"], hd).transpose(1, 2)
                q, k = rope(q, cos, sin), rope(k, cos, sin)
                kc, vc = self.k_cache[i, :b], self.v_cache[i, :b]
                kc.index_copy_(2, cache_position, k)
                vc.index_copy_(2, cache_position, v)
                if rep > 1:
                    kc, vc = kc.repeat_interleave(rep, 1), vc.repeat_interleave(rep, 1)
                o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=keep)
                x = x + a.o_proj(o.transpose(1, 2).reshape(b, s, -1))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            return self.lm_head(self.model.norm(x))

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = NativeLlama().eval()
    finally:
        torch.set_default_dtype(old)
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(torch, "_dynamo"):
        torch._dynamo.mark_static_address(model.k_cache)
        torch._dynamo.mark_static_address(model.v_cache)
    return model


def build_hf(m: dict, device, dtype):
    torch = _import_torch()
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=m["hidden"], intermediate_size=m["intermediate"], num_hidden_layers=m["layers"],
                      num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"], vocab_size=m["vocab"],
                      max_position_embeddings=4096, tie_word_embeddings=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hf_static_cache(model, batch: int, max_len: int, device, dtype):
    """A ``StaticCache`` across transformers versions (4.4x takes batch/device/dtype, 5.x infers them)."""
    from transformers import StaticCache
    params = inspect.signature(StaticCache.__init__).parameters
    kw = {"config": model.config, "max_cache_len": max_len}
    size = next((name for name in ("max_batch_size", "batch_size") if name in params), None)
    if size:
        kw[size] = batch
    for name, val in (("device", device), ("dtype", dtype)):
        if name in params:
            kw[name] = val
    return StaticCache(**kw)


class Decoder:
    """Prefill + decode steps of one model at one batch size, for either implementation."""

    def __init__(self, impl: str, m: dict, batch: int, prompt: int, gen: int, device, dtype, seed: int = 0):
        torch = _import_torch()
        self.impl, self.batch, self.prompt, self.gen, self.device = impl, batch, prompt, gen, device
        self.max_len = prompt + gen
        torch.manual_seed(seed)
        if impl == "hf":
            self.model = build_hf(m, device, dtype)
            self.cache = hf_static_cache(self.model, batch, self.max_len, device, dtype)
        else:
            self.model = build_native(m, batch, self.max_len, device, dtype)
            self.cache = None
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        self.prompt_ids = torch.randint(0, m["vocab"], (batch, prompt), generator=g).to(device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)

    def set_batch(self, batch: int, vocab: int, dtype) -> None:
        """The same weights at another batch size (hf: a new cache; native: a slice of its cache)."""
        torch = _import_torch()
        if self.impl == "native" and self.model.k_cache.shape[1] < batch:
            raise ValueError(f"the native cache holds {self.model.k_cache.shape[1]} sequences, not {batch}")
        self.batch = batch
        g = torch.Generator(device="cpu").manual_seed(batch)
        self.prompt_ids = torch.randint(0, vocab, (batch, self.prompt), generator=g).to(self.device)
        if self.impl == "hf":
            self.cache = hf_static_cache(self.model, batch, self.max_len, self.device, dtype)

    def call(self, fn, ids, cache_position):
        if self.impl == "hf":
            return fn(input_ids=ids, past_key_values=self.cache, cache_position=cache_position, use_cache=True).logits
        return fn(ids, cache_position)

    def prefill(self):
        """Eager prefill (fills the static cache); returns the first decoded token [B, 1]."""
        torch = _import_torch()
        with torch.inference_mode():
            if self.cache is not None and hasattr(self.cache, "reset"):
                self.cache.reset()
            pos = torch.arange(self.prompt, device=self.device)
            logits = self.call(self.model, self.prompt_ids, pos)
            self.pos.fill_(self.prompt)
            return logits[:, -1:].argmax(-1)

    def decode(self, step, n: int, tok, cudagraphs: bool):
        """``n`` decode steps of ``step`` (the compiled module); returns the last token."""
        torch = _import_torch()
        with torch.inference_mode():
            for _ in range(n):
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = self.call(step, tok, self.pos)
                tok = logits[:, -1:].argmax(-1)
                self.pos.add_(1)
        return tok
