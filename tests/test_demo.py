"""``patchc demo``: one screen, compiled through patchc.compile with patchc op calls, the shipped
learned plan valid for SmolLM2-135M; the full run on SmolLM2 with PATCHC_SLOW=1."""
import json
import os
import re

import pytest

import patchc
from patchc.demo import SHIPPED, shipped_plan
from test_learn_cli import ckpt, single_thread  # noqa: F401  (module fixtures)

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_plan_is_packaged_compact_and_valid(name):
    path = shipped_plan(name)
    assert os.path.isfile(path) and set(SHIPPED) >= {"25"} and shipped_plan() == shipped_plan("25")
    plan = patchc.MaskPlan.load(path)                       # validated on load
    # learned plans meet their target within ±0.5 % (the tile grid)
    assert abs(plan.sparsity() - int(name) / 100) <= 0.005 and plan.meta["method"].startswith("patch-")
    shapes = plan.meta["fingerprint"]                       # what it was learned on: SmolLM2-135M's linears
    assert len(plan) == 210 and all(tuple(shapes[n]) == m.shape for n, m in plan.items())
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["patchc"])["version"] == 2
    assert os.path.getsize(path) < 1.1e6 * int(name) / 3     # one 4-bit code per 2:4 group, dense tiles free
    toml = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert re.search(r'"patchc"\s*=\s*\[[^\]]*"plans/\*\.safetensors"', toml), "plans are package data"


def test_demo_on_a_tiny_checkpoint_fits_one_screen(ckpt, tmp_path, capsys):
    from patchc.cli import main
    out = tmp_path / "demo"
    rc = main(["demo", "--model", str(ckpt / "model"), "--sparsity", "0.3", "--tile", "16x16", "--eval-samples", "2",
               "--tokens", "4", "--out", str(out), "--full"])
    assert rc == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("done in "))
    assert end + 1 <= 40, "the summary (without --full's table) fits one screen"
    assert len(lines) > end + 15, "--full adds one row per linear site"
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    calls = int(re.search(r"(\d+) patchc op calls", text).group(1))
    assert calls > 0
    for what in ("perplexity", "dense", "one-shot", "greedy text", "tile map", "kernels", "2:4 + "):
        assert what in text, what
    assert (out / "tile-map.png").is_file() and (out / "masks.safetensors").is_file()


def test_demo_model_without_plan_is_an_early_error(ckpt, capsys):
    from patchc.cli import main
    assert main(["demo", "--model", str(ckpt / "model")]) == 2
    assert "--model needs --plan or --sparsity" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PATCHC_SLOW") != "1", reason="runs the demo on SmolLM2-135M (~1 min idle); "
                    "set PATCHC_SLOW=1")
def test_demo_on_smollm2_meets_its_target(tmp_path):
    from patchc.demo import run_demo
    lines = []
    res = run_demo(out_dir=str(tmp_path / "d"), log=lines.append)
    assert len(lines) <= 40 and max(len(x) for x in lines) <= 100
    assert res["sparsity"] >= 0.25 and res["ppl_sparse"] <= 1.2 * res["ppl_dense"]
    assert res["ppl_sparse"] < res["ppl_oneshot"] and res["op_calls"] > 0
