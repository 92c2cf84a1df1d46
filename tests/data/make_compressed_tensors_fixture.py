"""Writes tests/data/ct-sparse24/: a tiny LLaMA saved by compressed-tensors' own compressor in its
``sparse-24-bitmask`` format (the way llmcompressor's ``save_pretrained(save_compressed=True)``
does: ModelCompressor.compress + update_config), plus ``expected.safetensors`` with the dense
2:4-pruned weights of two layers.  Needs ``pip install --no-deps compressed-tensors==0.12.2 loguru``;
the test reads the committed files without that package."""
import os
import sys

import torch
from safetensors.torch import save_file

from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
from compressed_tensors.config import Sparse24BitMaskConfig
from transformers import LlamaConfig, LlamaForCausalLM

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "ct-sparse24")
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
with torch.no_grad():                       # prune every targeted linear 2:4 by magnitude first
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            w = m.weight
            g = w.view(-1, 4).abs().float()
            keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(2, dim=1).indices, True)
            w.mul_(keep.view_as(w).to(w.dtype))
model.config.save_pretrained(out)
compressor = ModelCompressor(sparsity_config=Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"],
                                                                   global_sparsity=0.5))
save_file(compressor.compress(model), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
compressor.update_config(out)
save_file({n: model.get_parameter(n).detach().contiguous() for n in
           ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight")},
          os.path.join(out, "expected.safetensors"))
print("wrote", out)
