"""The command line fails early and in words of its flags, and prints a screenful by default:
bad flags are caught before the model loads, outputs are checked before the work, a closed pipe
ends quietly, and prune's default is a hybrid plan."""
import os
import subprocess
import sys

import pytest

import patchc
from patchc.cli import main
from test_learn_cli import ckpt, single_thread  # noqa: F401  (module fixtures)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model: the error must come before."""
    import patchc.data

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the flag error")
    monkeypatch.setattr(patchc.data, "load_model", boom)


def _err(capsys, argv, code=2):
    rc = main([str(a) for a in argv])
    assert rc == code
    return capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["prune", "learn", "demo"])
def test_sparsity_out_of_range_fails_before_loading(cmd, capsys, no_model_load):
    argv = [cmd, "--sparsity", "0.7"] + (["--model", "/nowhere", "--out", "x.safetensors"] if cmd != "demo" else [])
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "--sparsity" in err and "[0, 0.5]" in err and "0.7" in err


def test_prune_tile_checked_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--model", "/nowhere", "--tile", "16x6", "--out", "x.safetensors"])
    assert "tile width 6 is not a multiple of 4" in capsys.readouterr().err


def test_prune_default_is_a_hybrid_plan(ckpt, capsys):
    out = ckpt / "default.safetensors"
    assert main(["prune", "--model", str(ckpt / "model"), "--method", "wanda", "--text", str(ckpt / "text.txt"),
                 "--tile", "16x16", "--seq-len", "32", "--samples", "4", "--out", str(out)]) == 0
    plan = patchc.MaskPlan.load(out)
    kinds = [int(k) for m in plan.values() for k in m.tile_kind.flatten()]
    assert abs(plan.sparsity() - 0.35) <= 0.01 and 0 in kinds and 1 in kinds
    text = capsys.readouterr().out
    assert "sparsity 0.35" in text and "layer kind" in text and text.startswith("wrote ")
    assert len(text.splitlines()) < 15, "default output groups layers by kind"


def test_missing_text_file_is_an_error_naming_it(ckpt, capsys, no_model_load):
    err = _err(capsys, ["prune", "--model", ckpt / "model", "--method", "wanda", "--text", ckpt / "missing.txt",
                        "--out", ckpt / "o.safetensors"])
    assert "--text" in err and "missing.txt: no such file" in err


def test_make_batches_path_like_string_that_is_no_file():
    from patchc.data import ByteTokenizer, make_batches
    with pytest.raises(FileNotFoundError, match="missing.txt: no such text file"):
        make_batches("missing.txt", ByteTokenizer(), seq_len=4)
    assert make_batches("plain words of text " * 4, ByteTokenizer(), seq_len=8, num_samples=1)[0].shape == (1, 8)


def test_out_whose_parent_is_a_file_fails_before_the_work(ckpt, tmp_path, capsys, no_model_load):
    f = tmp_path / "afile"
    f.write_text("x")
    err = _err(capsys, ["prune", "--model", ckpt / "model", "--out", f / "masks.safetensors"])
    assert "--out" in err and "is a file, not a folder" in err
    err = _err(capsys, ["prune", "--model", ckpt / "model", "--out", tmp_path])
    assert "--out" in err and "is a directory" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_out_unwritable_fails_before_the_work(ckpt, tmp_path, capsys, no_model_load):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    err = _err(capsys, ["prune", "--model", ckpt / "model", "--out", d / "m.safetensors"])
    assert "not writable" in err


def test_device_cuda_without_cuda(ckpt, capsys, no_model_load):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    err = _err(capsys, ["learn", "--model", ckpt / "model", "--device", "cuda", "--text", ckpt / "text.txt",
                        "--out", ckpt / "o.safetensors"])
    assert "--device cuda: CUDA is not available" in err


def test_checkpoint_without_tokenizer(ckpt, tmp_path, capsys, no_model_load):
    import shutil
    d = tmp_path / "notok"
    d.mkdir()
    for f in os.listdir(ckpt / "model"):
        if "token" not in f and f not in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            shutil.copy(ckpt / "model" / f, d / f)
    err = _err(capsys, ["learn", "--model", d, "--text", ckpt / "text.txt", "--out", tmp_path / "o.safetensors"])
    assert f"--model {d}: the checkpoint has no tokenizer files" in err


def test_errors_speak_in_flags(ckpt, capsys):
    err = _err(capsys, ["learn", "--model", ckpt / "model", "--text", ckpt / "text.txt", "--resume",
                        "--out", ckpt / "o.safetensors"])
    assert "--resume needs --checkpoint-dir" in err and "LearnConfig" not in err


def test_import_masks_text_file_is_not_a_pickle_message(ckpt, tmp_path, capsys):
    t = tmp_path / "masks.npz"
    t.write_text("these are not masks\n")
    err = _err(capsys, ["import-masks", t, "--model", ckpt / "model", "--out", tmp_path / "o.safetensors"])
    assert "masks.npz" in err and "not a .npz" in err and "pickle" not in err.lower()


def test_closed_pipe_exits_quietly(tmp_path):
    from patchc.prune import magnitude_hybrid
    from conftest import MLP
    path = magnitude_hybrid(MLP(256, 256, 128), 0.3, (16, 16)).save(tmp_path / "m.safetensors")
    r = subprocess.run(f"{sys.executable} -m patchc.cli inspect --verbose {path} | head -n 2", shell=True,
                       capture_output=True, text=True)
    assert len(r.stdout.splitlines()) == 2
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_quiet_and_verbose(ckpt, capsys):
    common = ["prune", "--model", str(ckpt / "model"), "--tile", "16x16", "--out", str(ckpt / "q.safetensors")]
    assert main(common + ["--quiet"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(common + ["--verbose"]) == 0
    out = capsys.readouterr().out
    plan = patchc.MaskPlan.load(ckpt / "q.safetensors")
    assert all(n in out for n in plan) and max(len(line) for line in out.splitlines()) <= 100
