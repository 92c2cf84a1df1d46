"""``patchc learn | prune | import-masks`` on a tiny checkpoint directory with a byte-level tokenizer."""
import argparse
import json
import os

import numpy as np
import pytest

import patchc
from patchc.learn.cli import register
from test_learn_helpers import corpus, single_thread, tiny_llama_model  # noqa: F401


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny LLaMA saved with a 256-symbol byte-level tokenizer (built offline), and a text file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("cli")
    tiny_llama_model().save_pretrained(d / "model")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(d / "model")
    (d / "text.txt").write_text(corpus()[0][:20000])
    return d


def run(*argv):
    parser = argparse.ArgumentParser(prog="patchc")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_prune_wanda_and_hybrid(ckpt, capsys):
    common = ["--model", ckpt / "model", "--text", ckpt / "text.txt", "--tile", "16x16", "--seq-len", 32,
              "--samples", 4]
    assert run("prune", *common, "--method", "wanda", "--sparsity", 0.5, "--out", ckpt / "w.safetensors") == 0
    plan = patchc.MaskPlan.load(ckpt / "w.safetensors")
    assert abs(plan.sparsity() - 0.5) < 1e-9 and plan.meta["method"] == "wanda-2:4"
    assert run("prune", *common, "--method", "sparsegpt", "--sparsity", 0.2, "--out", ckpt / "s.safetensors") == 0
    assert abs(patchc.MaskPlan.load(ckpt / "s.safetensors").sparsity() - 0.2) <= 0.005
    assert capsys.readouterr().out.count("layers, sparsity 0.") == 2


def test_prune_sparsegpt_writes_its_weights_unless_mask_only(ckpt, capsys):
    from patchc.weights import read_weights
    common = ["--model", ckpt / "model", "--text", ckpt / "text.txt", "--tile", "16x16", "--seq-len", 32,
              "--samples", 4, "--method", "sparsegpt"]
    for sp, name in ((0.5, "g24"), (0.3, "ghy")):
        assert run("prune", *common, "--sparsity", sp, "--sequential", "--out", ckpt / f"{name}.safetensors") == 0
        w, meta = read_weights(ckpt / f"{name}.weights.safetensors")
        plan = patchc.MaskPlan.load(ckpt / f"{name}.safetensors")
        assert set(w) == set(plan) and meta["plan"].endswith(f"{name}.safetensors")
        for n, t in w.items():                     # pruned positions are exactly 0, kept ones changed
            keep = plan[n].unpacked()
            assert not t[~keep].any()
    assert "updated weights of" in capsys.readouterr().out
    assert run("prune", *common, "--sparsity", 0.5, "--mask-only", "--out", ckpt / "mo.safetensors") == 0
    assert not (ckpt / "mo.weights.safetensors").exists()
    assert run("prune", *common[:-2], "--method", "magnitude", "--sparsity", 0.3, "--out", ckpt / "mag.safetensors") == 0
    assert not (ckpt / "mag.weights.safetensors").exists()
    with pytest.raises(SystemExit, match="--mask-only applies to --method sparsegpt"):
        run("prune", *common[:-2], "--method", "wanda", "--mask-only", "--out", ckpt / "x.safetensors")
    with pytest.raises(SystemExit, match="--sequential needs"):
        run("prune", *common[:-2], "--method", "magnitude", "--sequential", "--out", ckpt / "x.safetensors")


def test_prune_and_learn_reconstruct(ckpt):
    from patchc.weights import read_weights
    common = ["--model", ckpt / "model", "--text", ckpt / "text.txt", "--tile", "16x16", "--seq-len", 32,
              "--samples", 4]
    assert run("prune", *common, "--method", "wanda", "--sparsity", 0.3, "--reconstruct",
               "--out", ckpt / "wr.safetensors") == 0
    assert "reconstruction" in read_weights(ckpt / "wr.weights.safetensors")[1]["method"]
    # --recon-damp and --recon-diag-damp reach the least squares: a huge damping of either kind leaves
    # the kept weights where they were
    for f, flag in (("wd", "--recon-damp"), ("wg", "--recon-diag-damp")):
        assert run("prune", *common, "--method", "wanda", "--sparsity", 0.3, "--reconstruct", flag, 1e6,
                   "--out", ckpt / f"{f}.safetensors") == 0
    # --recon-strength: the first block's linears take exactly that fraction of the full update (the default 0.3)
    assert run("prune", *common, "--method", "wanda", "--sparsity", 0.3, "--reconstruct", "--recon-strength", 1,
               "--out", ckpt / "ws.safetensors") == 0
    import torch
    from transformers import AutoModelForCausalLM
    base = dict(AutoModelForCausalLM.from_pretrained(ckpt / "model").named_modules())
    plan = patchc.MaskPlan.load(ckpt / "wd.safetensors")
    moved = {}
    for f in ("wr", "wd", "wg"):
        w = read_weights(ckpt / f"{f}.weights.safetensors")[0]
        moved[f] = max(float((w[n] - base[n].weight * plan[n].unpacked()).abs().max()) for n in plan)
    assert max(moved["wd"], moved["wg"]) < 1e-4 < moved["wr"], moved
    part, full = (read_weights(ckpt / f"{f}.weights.safetensors")[0] for f in ("wr", "ws"))
    first = [n for n in plan if ".layers.0." in n]
    assert first and all(torch.allclose(part[n] - base[n].weight * plan[n].unpacked(),
                                        0.3 * (full[n] - base[n].weight * plan[n].unpacked()), atol=1e-5)
                         for n in first)
    for flag, bad in (("--recon-damp", 0), ("--recon-diag-damp", -1), ("--recon-diag-damp", "inf"),
                      ("--recon-strength", 0), ("--recon-strength", 1.5)):
        with pytest.raises(SystemExit):
            run("prune", *common, "--method", "wanda", "--sparsity", 0.3, "--reconstruct", flag, bad,
                "--out", ckpt / "wz.safetensors")
    assert not (ckpt / "wz.safetensors").exists()
    assert run("learn", *common, "--mode", "tile", "--sparsity", 0.3, "--steps", 2, "--no-progress",
               "--reconstruct", "--out", ckpt / "lr.safetensors") == 0
    assert len(read_weights(ckpt / "lr.weights.safetensors")[0]) == len(patchc.MaskPlan.load(ckpt / "lr.safetensors"))


def test_learn_writes_plan_checkpoint_and_log(ckpt):
    out, cdir = ckpt / "l.safetensors", ckpt / "run"
    assert run("learn", "--model", ckpt / "model", "--text", ckpt / "text.txt", "--tile", "16,16", "--seq-len", 32,
               "--samples", 4, "--mode", "joint", "--sparsity", 0.35, "--steps", 3, "--checkpoint-dir", cdir,
               "--no-progress", "--out", out) == 0
    plan = patchc.MaskPlan.load(out)
    assert abs(plan.sparsity() - 0.35) <= 0.005 and plan.meta["method"] == "patch-joint"
    assert (cdir / "learn_ckpt.json").is_file() and len((cdir / "learn_log.jsonl").read_text().splitlines()) == 3
    assert [p.name for p in (cdir / "learn_ckpt-0000003").iterdir()] == ["shard-00001-model-00001-of-00001.safetensors"]


def test_learn_memory_flags(ckpt):
    """The memory and distribution flags reach LearnConfig (one rank: ddp/fsdp do not apply)."""
    out, cdir = ckpt / "m.safetensors", ckpt / "run-m"
    assert run("learn", "--model", ckpt / "model", "--text", ckpt / "text.txt", "--tile", "16x16", "--seq-len", 32,
               "--samples", 4, "--mode", "joint", "--sparsity", 0.3, "--steps", 2, "--prior", "wanda",
               "--prior-sequential", "--state-dtype", "bfloat16", "--grad-checkpointing", "--recompute-masks",
               "--offload-optimizer", "--batches-per-step", 2, "--strategy", "ddp", "--checkpoint-dir", cdir,
               "--prior-strength", 4, "--prior-strength-24", 6, "--no-progress", "--out", out) == 0
    conf = json.loads((cdir / "learn_ckpt.json").read_text())["config"]
    assert conf["state_dtype"] == "bfloat16" and conf["batches_per_step"] == 2 and conf["prior_sequential"] is True
    assert conf["prior_strength"] == 4 and conf["prior_strength_24"] == 6
    assert abs(patchc.MaskPlan.load(out).sparsity() - 0.3) <= 0.005


def test_import_masks(ckpt):
    model = patchc.data.load_model(str(ckpt / "model"))
    plan = patchc.prune.magnitude_hybrid(model, 0.25, (16, 16))
    np.savez_compressed(ckpt / "m.npz", **{f"{n}.weight": np.packbits(m.mask.numpy()) for n, m in plan.items()})
    assert run("import-masks", ckpt / "m.npz", "--model", ckpt / "model", "--tile", "16x16",
               "--out", ckpt / "i.safetensors") == 0
    got = patchc.MaskPlan.load(ckpt / "i.safetensors")
    assert all((got[n].mask == plan[n].mask).all() for n in plan)


def test_main_cli_reports_bad_options(ckpt, capsys):
    from patchc.cli import main
    with pytest.raises(SystemExit):
        main(["learn", "--model", str(ckpt / "model"), "--text", str(ckpt / "text.txt"), "--sparsity", "0.7",
              "--out", str(ckpt / "x.safetensors")])
    assert "--sparsity: must be in [0, 0.5]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("learn", "--model", "m", "--out", "o", "--tile", "16")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PATCHC_SLOW") != "1", reason="starts torchrun with 2 ranks (~15 s); set PATCHC_SLOW=1")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_learn_under_torchrun(ckpt, strategy):
    """Two gloo ranks started by torchrun: each joins the group from its environment, learns on its
    share of the batches, and only rank 0 writes the plan."""
    import os
    import subprocess
    import sys
    out = ckpt / f"{strategy}.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "patchc.cli", "learn", "--model", str(ckpt / "model"), "--text", str(ckpt / "text.txt"),
           "--tile", "16x16", "--seq-len", "32", "--samples", "4", "--steps", "3", "--sparsity", "0.3",
           "--strategy", strategy, "--checkpoint-dir", str(ckpt / f"run-{strategy}"), "--no-progress",
           "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1, "only rank 0 writes and reports"
    plan = patchc.MaskPlan.load(out)
    assert abs(plan.sparsity() - 0.3) <= 0.005
