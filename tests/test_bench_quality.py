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
ROWS = ["dense", "sparsegpt 2:4", "oneshot-hybrid 25%", "patch-tile 35%", "learned 2:4"]


def _ctx(opt):
    model = tiny_llama(seed=0, num_hidden_layers=1)
    return q.build_context(model, ByteTokenizer(), TEXT_A, {"plays": TEXT_B, "gpl3": TEXT_C, "britannica": TEXT_A},
                           opt, {"calib_texts": ["A"], "eval_texts": {"plays": ["B"], "gpl3": ["C"],
                                                                       "britannica": ["A"]}}, model_name="tiny-llama")


def test_quality_end_to_end_and_resume(tmp_path):
    opt = q.Options(steps=2, seq_len=32, calib_samples=4, eval_samples=2, prior_batches=2, tile=(16, 16),
                    checkpoint_every=1)
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
    assert by["sparsegpt 2:4"]["weights_updated"] is True
    assert by["patch-tile 35%"]["tokens_seen"] == 2 * 32 and by["patch-tile 35%"]["steps"] == 2
    assert by["dense"]["ppl_compiled"] is None and by["dense"]["ppl"] > 1
    # the shared base model was never touched
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.model.parameters()))
    # outputs: table, csv, plot, per-row JSON, per-layer reports of the learned rows
    for ext in ("md", "csv", "png"):
        assert os.path.getsize(os.path.join(res, f"quality.{ext}")) > 0
    md = open(os.path.join(res, "quality.md")).read()
    assert "| patch-tile 35% |" in md and "pending" in md
    for m in ("patch-tile 35%", "learned 2:4", "oneshot-hybrid 25%"):
        for suffix in ("-layers.csv", "-layers.md", "-tiles.png", "-heatmap.png"):
            assert os.path.isfile(os.path.join(out, q.slug(m) + suffix)), (m, suffix)
    row = json.load(open(os.path.join(out, "rows", "learned-2-4.json")))
    assert row["method"] == "learned 2:4" and row["options"]["steps"] == 2 and row["tokens_seen"] == 64
    # a rerun skips every finished row
    lines.clear()
    q.run_benchmark(ctx, ROWS, opt, out, "quality", res, say=lines.append)
    assert sum(line.startswith("[skip]") for line in lines) == len(ROWS)
    assert not any(line.startswith("[run ]") for line in lines)


def test_rows_and_split():
    assert q.parse_rows("dense, patch-tile 25%") == ["dense", "patch-tile 25%"]
    with pytest.raises(ValueError, match="unknown rows"):
        q.parse_rows("patch 25%")
    assert len(q.ALL_ROWS) == 18 and q.slug("learned 2:4") == "learned-2-4"
    assert q.slug("patch-joint 35% + recon") == "patch-joint-35-recon"
    p = q.add_arguments(__import__("argparse").ArgumentParser())
    opt = q.options_from_args(p.parse_args(["--quick"]))
    assert opt.steps < 20 and opt.eval_samples <= 8 and opt.seq_len >= 256


def test_targets_are_checked_on_the_rows():
    from bench.quality_report import target_lines
    done = lambda m, p: {"method": m, "status": "done", "ppl": p}  # noqa: E731
    rows = [done("dense", 50.0), done("magnitude 2:4", 900.0), done("wanda 2:4", 160.0), done("sparsegpt 2:4", 100.0),
            done("oneshot-hybrid 25%", 80.0), done("patch-tile 25%", 70.0), done("patch-joint 25%", 56.0),
            done("patch-tile 35%", 75.0), done("patch-tile 45%", 90.0), done("oneshot-hybrid 45%", 85.0),
            done("learned 2:4", 95.0), {"method": "patch-joint 45%", "status": "pending"}]
    text = "\n".join(target_lines(rows))
    assert "| PATCH 25 % ≤ 1.15× dense | 1.12× (patch-joint 25%) | met |" in text
    assert "sparsegpt 2:4 / patch-tile 45% = 1.11× | missed |" in text
    assert "keeps the weights) | wanda 2:4 / patch-tile 45% = 1.78× | missed |" in text
    assert "| patch-tile 25% < oneshot-hybrid 25% | 70.00 vs 80.00 | met |" in text
    assert "| patch-tile 45% < oneshot-hybrid 45% | 90.00 vs 85.00 | missed |" in text
    assert text.rstrip().endswith("| 56.0 < 75.0 < 90.0 < 95.0 < 100.0 < 160.0 < 900.0 | met |")
    rows[-2] = done("learned 2:4", 120.0)
    assert "learned 2:4 120.0 ≥ sparsegpt 2:4 100.0 | missed |" in "\n".join(target_lines(rows))
