"""The patchc command line: --help, inspect (table, bytes, plot), error exit codes."""
import subprocess
import sys

import pytest
import torch

from patchc.cli import main
from patchc.cliutil import packed_bytes_table
from patchc.packing import pack
from patchc.prune import magnitude_hybrid

from conftest import MLP


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "inspect", "learn", "prune", "import-masks"):
        assert cmd in out


def test_console_script_installed():
    """The ``patchc`` executable the install put beside this interpreter runs."""
    import os
    exe = os.path.join(os.path.dirname(sys.executable), "patchc")
    assert os.access(exe, os.X_OK), f"no console script at {exe}"
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    from patchc import __version__
    assert r.returncode == 0 and r.stdout.strip() == f"patchc {__version__}", r.stdout + r.stderr


def test_inspect_table_bytes_and_plot(tmp_path, capsys):
    torch.manual_seed(0)
    model = MLP(256, 256, 128)
    plan = magnitude_hybrid(model, 0.35, (32, 32))
    path = plan.save(tmp_path / "m.safetensors")
    png = tmp_path / "tiles.png"
    assert main(["inspect", path, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "fc2" in out and f"{plan.sparsity():.4f}" in out
    assert "packed weights (fp16/bf16)" in out and "packed weights (fp32)" in out
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_packed_bytes_table_matches_real_packing():
    torch.manual_seed(0)
    model = MLP(256, 256, 128)
    plan = magnitude_hybrid(model, 0.35, (32, 32))
    real = sum(pack(m.weight.detach().half(), plan[n]).nbytes() for n, m in (("fc1", model.fc1), ("fc2", model.fc2)))
    est, dense = packed_bytes_table(plan, torch.float16)
    assert dense == (256 * 256 + 256 * 128) * 2
    assert est == real


def test_inspect_bad_file_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert main(["inspect", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err


def _block_plan():
    from patchc.plan import MaskPlan
    from patchc.types import TileMask
    g = torch.Generator().manual_seed(0)
    masks = {}
    for b in range(3):
        for kind, shape in (("attn.q", (32, 64)), ("mlp.up", (64, 32))):
            allowed = torch.ones(shape[0] // 16, shape[1] // 16, dtype=torch.bool)
            k = (torch.rand(allowed.shape, generator=g) < 0.5).to(torch.uint8)
            from patchc.prune import mask24_from_scores
            masks[f"model.layers.{b}.{kind}"] = TileMask.from_kinds((16, 16), k, mask24_from_scores(torch.rand(*shape, generator=g)))
    masks["head"] = TileMask.dense((16, 32), (16, 16))
    meta = {"method": "patch-joint", "prior": "wanda", "config": {f"opt{i}": i for i in range(40)},
            "fingerprint": {n: list(m.shape) for n, m in masks.items()}, "losses": list(range(300))}
    return MaskPlan(masks, meta)


def test_inspect_header_is_readable(tmp_path, capsys):
    path = _block_plan().save(tmp_path / "m.safetensors")
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in out) <= 100, max(out, key=len)
    assert len(out) < 25 and any("method: patch-joint" in line for line in out)
    assert any("attn.q" in line and "3" in line for line in out), "layers grouped by kind"
    assert main(["inspect", path, "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.2.mlp.up" in out and '"opt39": 39' in out


def test_whole_model_tile_map_has_every_layer_one_row_per_block(tmp_path):
    from patchc.plot import plot_tile_maps, tile_canvas
    plan = _block_plan()
    canvas, rows, kinds, x0, y0, w, h = tile_canvas(plan)
    assert rows == [("model.layers", 0), ("model.layers", 1), ("model.layers", 2), ("", -1)]
    assert kinds == ["attn.q", "mlp.up", "head"]
    for b in range(3):
        for kind in ("attn.q", "mlp.up"):
            m = plan[f"model.layers.{b}.{kind}"]
            r = ("model.layers", b)
            got = canvas[y0[r]: y0[r] + m.grid[0], x0[kind]: x0[kind] + m.grid[1]]
            assert (got == m.tile_kind.numpy()).all()
    png = plot_tile_maps(plan, str(tmp_path / "t.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"
