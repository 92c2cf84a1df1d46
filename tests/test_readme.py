"""The README's "Use" snippet runs as written (on a tiny LLaMA standing in for SmolLM2), and the
command-line examples it lists parse."""
import os
import re
import shlex

import torch

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _block(marker: str, lang: str) -> str:
    text = open(README, encoding="utf-8").read()
    m = re.search(re.escape(marker) + r".*?\n```" + lang + r"\n(.*?)\n```", text, re.S)
    assert m, f"no ```{lang} block after {marker!r} in README.md"
    return m.group(1)


def test_use_snippet_runs(tmp_path, monkeypatch, capsys):
    import patchc.data
    from conftest import tiny_llama
    model = tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setattr(patchc.data, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(patchc.data, "load_tokenizer", lambda *a, **k: patchc.data.ByteTokenizer())
    monkeypatch.chdir(tmp_path)
    real = torch.compile

    def eager_inner(model, *a, backend=None, options=None, **k):
        # inductor's first compile of even this tiny model takes ~30 s here; what the snippet
        # tests is the patch backend and its options, so the rest of the graph runs eagerly
        if backend == "patch":
            options = {"inner": "eager", **(options or {})}
        return real(model, *a, backend=backend, options=options, **k)
    monkeypatch.setattr(torch, "compile", eager_inner)
    code = _block("<!-- use-snippet", "python")
    scope = {}
    exec(compile(code, "README.md:Use", "exec"), scope)       # noqa: S102 - the README's own code
    assert os.path.isfile(tmp_path / "masks.safetensors")
    assert scope["out"].logits.shape[:2] == scope["inputs"]["input_ids"].shape
    out = capsys.readouterr().out
    assert "hybrid" in out and ".version" in out                # the explain table and some PTX
    assert patchc.counters["linear_calls"] > 0
    assert tuple(scope["batches"][0].shape) == (1, 256)


def test_command_line_examples_parse():
    from patchc.cli import build_parser
    block = _block("## Command line", "")
    parser = build_parser()
    lines = block.replace("\\\n", " ").splitlines()
    seen = set()
    for line in lines:
        argv = shlex.split(line.split("#")[0])
        if not argv or argv[0] != "patchc":
            continue
        argv = [a for a in argv[1:] if not (a.startswith("[") or a.endswith("]"))]
        seen.add(argv[0])
        args = parser.parse_args(argv)
        assert args.func is not None
    assert {"demo", "inspect", "prune", "learn", "import-masks"} <= seen
