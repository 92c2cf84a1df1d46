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
