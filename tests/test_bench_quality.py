"""Smoke test of the quality benchmark's code path on a tiny Llama (not the real numbers)."""
import json
import os

import pytest
import torch

from conftest import tiny_llama

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from bench import quality as q  # noqa: E402
from patchc.data import ByteTokenizer  # noqa: E402

TEXT_A = "Alas, poor Yorick! I knew him, Horatio: a fellow of infinite jest. " * 40
TEXT_B = "Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day. " * 40
TEXT_C = "This License applies to any program or other work which contains a notice placed by the holder. " * 30
# one row per code path: dense, one-shot 2:4 (with SparseGPT's weight update), one-shot hybrid,
# tile-mode learning, joint-mode learning at 50 % (every tile forced 2:4)
ROWS = ["dense", "sparsegpt 2:4", "oneshot-hybrid 25%", "patch-tile 35%", "patch-joint 35%", "patch-joint 35% + recon",
        "patch-joint 35% latency-aware", "learned 2:4"]


def _ctx(opt):
    model = tiny_llama(seed=0, num_hidden_layers=1)
    return q.build_context(model, ByteTokenizer(), TEXT_A, {"plays": TEXT_B, "gpl3": TEXT_C, "britannica": TEXT_A},
                           opt, {"calib_texts": ["A"], "eval_texts": {"plays": ["B"], "gpl3": ["C"],
                                                                       "britannica": ["A"]}}, model_name="tiny-llama")


def test_quality_end_to_end_and_resume(tmp_path, monkeypatch):
    import patchc.latency
    # a 64-wide model saves nothing on any GPU: give the latency-aware row weights to learn with
    monkeypatch.setattr(patchc.latency, "density_weights",
                        lambda shapes, tile, device=None: {n: (2.0 if "mlp" in n else 0.5) for n in shapes})
    opt = q.Options(steps=2, seq_len=32, calib_samples=4, eval_samples=2, prior_batches=2, tile=(16, 16),
                    checkpoint_every=1, recon_strength=0.5, recon_layers=r"\.mlp\.")
    ctx = _ctx(opt)
    before = [p.detach().clone() for p in ctx.model.parameters()]
    out, res = str(tmp_path / "quality"), str(tmp_path)
    lines = []
    recs = q.run_benchmark(ctx, ROWS, opt, out, "quality", res, say=lines.append,
                           cache_dir=str(tmp_path / "kernels"))
    by = {r["method"]: r for r in recs}
    assert all(by[m]["status"] == "done" for m in ROWS), [(m, by[m]["status"]) for m in ROWS]
    assert by["patch-tile 25%"]["status"] == "pending"            # not requested: rendered as pending
    for m in ROWS[1:]:
        r = by[m]
        assert r["rel_diff"] <= q.REL_TOL, (m, r["ppl_compiled"], r["ppl_eager"])
        assert int(r["hybrid_sites"].split("/")[0]) > 0, (m, r["hybrid_sites"])   # the rewrite fired
    assert by["sparsegpt 2:4"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by["learned 2:4"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by["oneshot-hybrid 25%"]["sparsity"] == pytest.approx(0.25, abs=0.03)
    assert by["sparsegpt 2:4"]["weights_updated"] is True and by["sparsegpt 2:4"]["calibration"] in (
        "sequential", "one dense pass") and by["sparsegpt 2:4"]["ppl_other_calibration"] > 1
    recon, base = by["patch-joint 35% + recon"], by["patch-joint 35%"]
    assert recon["weights_updated"] is True and recon["sparsity"] == base["sparsity"]
    assert recon["options"]["recon_strength"] == 0.5 and recon["options"]["recon_layers"] == r"\.mlp\."
    assert "| updated ×0.5 (`\\.mlp\\.`) |" in open(os.path.join(res, "quality.md")).read()
    assert by["patch-joint 35% latency-aware"]["budget"].startswith("latency")
    for r in by.values():
        if r["status"] == "done":
            assert r["code"].startswith("patchc ") and r["ppl_gpl3"] > 1 and r["ppl_britannica"] > 1
            assert r["ppl"] != r["ppl_gpl3"]
    assert by["patch-tile 35%"]["tokens_seen"] == 2 * 32 and by["patch-tile 35%"]["steps"] == 2
    assert by["dense"]["ppl_compiled"] is None and by["dense"]["ppl"] > 1
    # the shared base model was never touched
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.model.parameters()))
    # outputs: table, csv, plot, per-row JSON, per-layer reports of the learned rows
    for ext in ("md", "csv", "png"):
        assert os.path.getsize(os.path.join(res, f"quality.{ext}")) > 0
    md = open(os.path.join(res, "quality.md")).read()
    assert "| patch-tile 35% |" in md and "| patch-tile 25% |" not in md and "Not run with this code" in md
    csv_head = open(os.path.join(res, "quality.csv")).readline()
    assert "ppl_gpl3,ppl_britannica,code" in csv_head and csv_head.startswith("method,sparsity,ppl,ppl_compiled")
    for m in ("patch-tile 35%", "learned 2:4", "oneshot-hybrid 25%"):
        for suffix in ("-layers.csv", "-layers.md", "-tiles.png", "-heatmap.png"):
            assert os.path.isfile(os.path.join(out, q.slug(m) + suffix)), (m, suffix)
    row = json.load(open(os.path.join(out, "rows", "learned-2-4.json")))
    assert row["method"] == "learned 2:4" and row["options"]["steps"] == 2 and row["tokens_seen"] == 64
    curve = row["loss_curve"]        # the learner's log, averaged per 40 steps: one mean of the 2 steps
    assert curve["every"] == 40 and len(curve["mean_task_loss"]) == 1 and curve["mean_task_loss"][0] > 0
    # a rerun skips every finished row
    lines.clear()
    q.run_benchmark(ctx, ROWS, opt, out, "quality", res, say=lines.append)
    assert sum(line.startswith("[skip]") for line in lines) == len(ROWS)
    assert not any(line.startswith("[run ]") for line in lines)


def test_loss_curve_keeps_the_last_record_of_a_resumed_step(tmp_path):
    log = tmp_path / "learn_log.jsonl"
    recs = [(0, 4.0), (1, 2.0), (2, 9.0), (2, 1.0), (3, 3.0), (4, 5.0)]   # step 2 logged again after a resume
    log.write_text("".join(json.dumps({"step": s, "task_loss": v, "loss": 0.0}) + "\n" for s, v in recs) + "\n")
    assert q.loss_curve(str(log), every=2) == {"every": 2, "mean_task_loss": [3.0, 2.0, 5.0]}


def test_rows_and_split():
    assert q.parse_rows("dense, patch-tile 25%") == ["dense", "patch-tile 25%"]
    with pytest.raises(ValueError, match="unknown rows"):
        q.parse_rows("patch 25%")
    assert len(q.ALL_ROWS) == 21 and "patch-tile 25% + recon" in q.ALL_ROWS and q.slug("learned 2:4") == "learned-2-4"
    assert q.slug("patch-joint 35% + recon") == "patch-joint-35-recon"
    p = q.add_arguments(__import__("argparse").ArgumentParser())
    opt = q.options_from_args(p.parse_args(["--quick"]))
    assert opt.steps < 20 and opt.eval_samples <= 8 and opt.seq_len >= 256
    assert opt.tile == (128, 128) and opt.prior_sequential is False
    opt = q.options_from_args(p.parse_args(["--tile", "64x64", "--prior-sequential"]))
    assert opt.tile == (64, 64) and opt.prior_sequential is True
    with pytest.raises(SystemExit):
        p.parse_args(["--tile", "64x62"])           # not a multiple of 4: argparse refuses it
    opt = q.options_from_args(p.parse_args(["--recon-strength", "0.3", "--recon-layers", "mlp"]))
    assert opt.recon_strength == 0.3 and opt.recon_layers == "mlp"
    with pytest.raises(SystemExit, match="--recon-layers: '\\(' is not a regular expression"):
        q.options_from_args(p.parse_args(["--recon-layers", "("]))
    with pytest.raises(SystemExit, match="--recon-strength: a number in"):
        q.options_from_args(p.parse_args(["--recon-strength", "1.5"]))


def test_targets_are_checked_on_the_rows():
    from bench.quality_report import target_lines
    done = lambda m, p, g, b, **kw: {"method": m, "status": "done", "ppl": p, "ppl_gpl3": g,  # noqa: E731
                                     "ppl_britannica": b, **kw}
    rows = [done("dense", 50.0, 30.0, 30.0), done("sparsegpt 2:4", 100.0, 180.0, 130.0, rel_diff=0.0),
            done("patch-tile 25%", 56.0, 33.0, 33.0, rel_diff=0.0), done("patch-joint 25%", 54.0, 36.0, 35.0),
            done("patch-joint 35%", 60.0, 45.0, 40.0, pred_decode_speedup=1.0, pred_decode_speedup_l40s=1.10),
            done("patch-joint 35% + recon", 58.0, 46.0, 39.0),
            done("patch-joint 35% latency-aware", 59.0, 44.0, 40.0, pred_decode_speedup=1.0,
                 pred_decode_speedup_l40s=1.15),
            done("learned 2:4", 70.0, 90.0, 80.0, rel_diff=2e-4), {"method": "patch-joint 45%", "status": "pending"}]
    text = "\n".join(target_lines(rows))
    assert "| PATCH 25 % ≤ 1.10× dense in domain | 1.080× (patch-joint 25%) | met |" in text
    assert "| PATCH 35 % ≤ 1.18× dense in domain | 1.200× (patch-joint 35%) | missed |" in text
    assert "| PATCH 45 % ≤ 1.25× dense in domain | pending | pending |" in text
    # in domain and out of domain each take the better of tile / joint on that measure
    assert "out of domain (mean GPL-3, Britannica) | 1.100× (patch-tile 25%) | met |" in text
    # every PATCH row is compared with SparseGPT, not only the best one
    assert "| patch-tile 25% better than sparsegpt 2:4 (weights updated) on every text | 56.00 vs 100.00" in text
    assert "| patch-joint 25% better than sparsegpt 2:4 (weights updated) on every text | 54.00 vs 100.00" in text
    assert "| patch-joint 35% better than sparsegpt 2:4 (weights updated) on every text | 60.00 vs 100.00" in text
    assert "| learned 2:4 ≤ 1.35× dense in domain | 1.400× | missed |" in text
    assert "| patch-joint 35% + recon < mask only on every text | 58.00 vs 60.00 / 46.00 vs 45.00 / 39.00 vs 40.00 | missed |" in text
    assert "higher predicted decode speedup (L40S) | 59.00 vs 60.00 / 44.00 vs 45.00 / 40.00 vs 40.00; 1.150× vs 1.100× | met |" in text
    assert "higher predicted decode speedup (H200) |" in text and "1.000× vs 1.000× | missed |" in text
    assert text.rstrip().endswith("| learned 2:4 | missed |")
    # plans learned for different step counts: perplexities not compared; a lost speedup stays missed
    for r in rows:
        r["steps"] = 240 if r["method"].endswith("latency-aware") else 480
    text = "\n".join(target_lines(rows))
    assert ("(L40S) | learned 240 vs 480 steps: perplexities not compared; 1.150× vs 1.100× | pending |" in text)
    assert "(H200) | learned 240 vs 480 steps: perplexities not compared; 1.000× vs 1.000× | missed |" in text


def test_learned_options_render_per_mode():
    from bench.quality_report import learned_pair
    opts = {"lr": 0.005, "lr_24": 0.0005, "prior_strength": 3.0}
    joint = {"method": "patch-joint 25%", "steps": 240, "options": {**opts, "prior_strength_24": 4.0}}
    assert learned_pair(joint, "lr", "lr_24") == "0.005 / 0.0005"
    assert learned_pair(joint, "prior_strength", "prior_strength_24") == "3 / 4"
    old = {"method": "learned 2:4", "steps": 240, "options": opts}       # a row from before prior_strength_24
    assert learned_pair(old, "prior_strength", "prior_strength_24") == "3 / 3"
    tile = {"method": "patch-tile 25%", "steps": 240, "options": {**opts, "prior_strength_24": 4.0}}
    assert learned_pair(tile, "lr", "lr_24") == "0.005" and learned_pair(tile, "prior_strength", "x") == "3"
    assert learned_pair({"method": "patch-joint 25% + recon", "steps": 0, "options": opts}, "lr", "lr_24") == ""


def test_learned_mode_of_every_row():
    from bench.quality import ALL_ROWS
    from bench.quality_report import learned_mode
    modes = {m: learned_mode(m) for m in ALL_ROWS}
    assert modes["patch-tile 35%"] == "tile" and modes["patch-joint 45%"] == "joint"
    assert modes["learned 2:4"] == "joint" and modes["patch-joint 35% latency-aware"] == "joint"
    learned = {m for m, mode in modes.items() if mode}
    assert learned == {m for m in ALL_ROWS if m.startswith("patch-") and not m.endswith(" + recon")} | {"learned 2:4"}


def test_weights_cell_says_how_much_of_the_update_a_recon_row_took():
    from bench.quality_report import weights_cell
    assert weights_cell({"method": "patch-joint 25%", "weights_updated": False}) == ""
    assert weights_cell({"method": "sparsegpt 2:4", "weights_updated": True}) == "updated"
    old = {"method": "patch-joint 25% + recon", "weights_updated": True, "options": {"recon_diagdamp": 1.0}}
    assert weights_cell(old) == "updated ×1"              # from before --recon-strength: the full update
    new = {**old, "options": {"recon_strength": 0.3, "recon_layers": None}}
    assert weights_cell(new) == "updated ×0.3"
    assert weights_cell({**old, "options": {"recon_strength": 0.5, "recon_layers": "mlp"}}) == "updated ×0.5 (`mlp`)"


def test_unstructured_reference_rows():
    from bench.unstructured_ref import reference_rows
    opt = q.Options(seq_len=32, calib_samples=4, eval_samples=2)
    ctx = _ctx(opt)
    before = [p.detach().clone() for p in ctx.model.parameters()]
    rows = reference_rows(ctx, ("wanda", "sparsegpt"), (0.25,), 2, say=lambda s: None)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"wanda unstructured", "sparsegpt unstructured"}
    for r in rows:
        # Wanda prunes 25 % of every output row; SparseGPT 25 % of every block of columns
        assert r["sparsity_measured"] == pytest.approx(0.25, abs=0.01), r
        assert set(r["ppl"]) == {"plays", "gpl3", "britannica"} and all(v > 1 for v in r["ppl"].values())
    assert by["sparsegpt unstructured"]["weights_updated"] and not by["wanda unstructured"]["weights_updated"]
    assert by["wanda unstructured"]["ppl"] != by["sparsegpt unstructured"]["ppl"]
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.model.parameters()))
