"""The kernel cache: layout, hits, memo, atomic writes under a race, corrupt entries, cache dir."""
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from patchc.codegen import cache
from patchc.codegen.cache import clear_memo, get_kernel, kernel_dir
from patchc.files import cache_root
from patchc.codegen.spec import KernelSpec

SPEC = KernelSpec(n=96, k=80, dtype="fp16", tile=(32, 32), block_m=16, block_n=32, block_k=32, bias=True)


@pytest.fixture
def fresh():
    clear_memo()
    yield
    clear_memo()


def test_entry_layout_and_spec_json(tmp_path, fresh):
    gk = get_kernel(SPEC, tmp_path)
    assert gk.path == tmp_path / "kernels" / SPEC.name / SPEC.key() / "kernel.py"
    meta = json.loads((gk.path.parent / "spec.json").read_text())
    assert meta["key"] == gk.key == SPEC.key() and meta["name"] == gk.name
    assert KernelSpec.from_dict(meta["spec"]) == SPEC
    assert meta["sha256"] == cache.sha256(gk.path.read_bytes())
    assert set(meta["versions"]) == {"patchc", "torch", "triton"}
    assert gk.path.read_text() == gk.source and "@triton.jit" in gk.source


def test_second_generation_is_a_cache_hit_with_identical_source(tmp_path, fresh):
    first = get_kernel(SPEC, tmp_path)
    clear_memo()                                   # as in a new process: only the disk remains
    hits = cache.stats["hits"]
    second = get_kernel(SPEC, tmp_path)
    assert not first.cache_hit and second.cache_hit and cache.stats["hits"] == hits + 1
    assert second.source == first.source and second.path == first.path


def test_one_render_per_spec_in_process(tmp_path, fresh, monkeypatch):
    calls = []
    real = cache.render
    monkeypatch.setattr(cache, "render", lambda s: calls.append(s) or real(s))
    kernels = [get_kernel(SPEC, tmp_path) for _ in range(5)]
    assert len(calls) == 1 and all(k is kernels[0] for k in kernels)


@pytest.mark.parametrize("damage", ["truncate", "delete", "spec_json"])
def test_corrupt_entry_is_regenerated(tmp_path, fresh, damage):
    gk = get_kernel(SPEC, tmp_path)
    good = gk.path.read_text()
    if damage == "truncate":
        gk.path.write_text(good[: len(good) // 2])
    elif damage == "delete":
        gk.path.unlink()
    else:
        (gk.path.parent / "spec.json").write_text("{not json")
    again = get_kernel(SPEC, tmp_path)           # the memo re-checks the disk entry as well
    assert not again.cache_hit and again.path.read_text() == good == again.source
    clear_memo()
    assert get_kernel(SPEC, tmp_path).cache_hit


def test_entry_state_is_classified_from_one_read(tmp_path, fresh):
    """What a miss counts as comes from the files the reader saw: a kernel.py without its
    spec.json is being written (incomplete), both with a wrong checksum is torn (regenerated)."""
    gk = get_kernel(SPEC, tmp_path)
    d, key = gk.path.parent, gk.key
    assert cache._read_entry(d, key) == (gk.source, "valid")
    assert cache._read_entry(d, "other key") == (None, "invalid")
    (d / "spec.json").unlink()
    assert cache._read_entry(d, key) == (None, "incomplete")
    assert cache._read_entry(tmp_path / "nowhere", key) == (None, "absent")
    before = dict(cache.stats)
    clear_memo()
    get_kernel(SPEC, tmp_path)
    assert cache.stats["incomplete"] == before.get("incomplete", 0) + 1
    assert cache.stats["regenerated"] == before.get("regenerated", 0)


def test_generated_module_is_imported_from_its_file(tmp_path, fresh):
    """GeneratedKernel is plain data (listing needs no Triton); launch imports the file once."""
    from patchc.codegen.launch import kernel_fn
    from patchc.codegen.load import load_module
    gk = get_kernel(SPEC, tmp_path)
    other = get_kernel(SPEC, tmp_path / "elsewhere")
    mod, mod2 = load_module(gk.path), load_module(other.path)
    assert Path(inspect.getsourcefile(mod)) == gk.path
    assert mod is not mod2 and mod.__name__ != mod2.__name__ and load_module(gk.path) is mod
    fn = kernel_fn(gk)
    assert getattr(fn, "fn", fn).__name__ == gk.name and kernel_fn(gk) is fn
    code = ("import sys; from patchc.codegen.cache import get_kernel; from patchc.codegen.spec import KernelSpec;"
            f"gk = get_kernel(KernelSpec.from_dict({SPEC.to_dict()!r}), {str(tmp_path)!r}); gk.summary(); repr(gk);"
            "assert 'triton' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


RACE = textwrap.dedent("""
    import sys, time
    from patchc.codegen import cache
    from patchc.codegen.render import render
    from patchc.codegen.spec import KernelSpec
    specs = [KernelSpec(n=32 * i, k=64, dtype="bf16", tile=(32, 32), block_m=16, block_n=32, block_k=32)
             for i in range(1, 5)]
    root = sys.argv[1]
    while time.time() < float(sys.argv[2]):
        time.sleep(0.001)
    for _ in range(25):                              # rewrite the same entries over and over
        for s in specs:
            cache.clear_memo()
            gk = cache.get_kernel(s, root)
            assert gk.source == render(s)
            cache._write_entry(gk.path.parent, s, s.key(), gk.source)
    # a reader that saw a half-written file would have re-rendered the entry ("regenerated")
    print("ok regenerated=%d" % cache.stats["regenerated"])
""")


def test_processes_racing_on_an_empty_cache_all_succeed(tmp_path):
    import time
    script = tmp_path / "race.py"
    script.write_text(RACE)
    root = tmp_path / "cache"
    start = str(time.time() + 3.0)                   # both start writing at the same moment
    procs = [subprocess.Popen([sys.executable, str(script), str(root), start], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert all("ok regenerated=0" in o[0] for o in outs), [o[0] for o in outs]
    entries = list(root.glob("kernels/*/*/kernel.py"))
    assert len(entries) == 4
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]      # no temp file left behind
    clear_memo()
    for e in entries:
        meta = json.loads((e.parent / "spec.json").read_text())
        assert get_kernel(KernelSpec.from_dict(meta["spec"]), root).cache_hit


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("PATCHC_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert kernel_dir() == Path.home() / ".cache" / "patchc" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_dir() == tmp_path / "xdg" / "patchc" / "kernels"
    monkeypatch.setenv("PATCHC_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" and kernel_dir() == tmp_path / "env" / "kernels"
    assert kernel_dir(tmp_path / "opt") == tmp_path / "opt" / "kernels"        # the option wins
    assert os.fspath(cache_root(str(tmp_path / "opt"))) == str(tmp_path / "opt")


def test_second_compile_of_a_model_hits_the_cache_and_exposes_the_source(tmp_path, fresh):
    import torch
    import patchc
    from patchc.prune import magnitude_hybrid
    from conftest import MLP

    def compile_once():
        torch._dynamo.reset()
        clear_memo()
        model = MLP().eval()
        plan = magnitude_hybrid(model, 0.4, (16, 16))
        compiled = torch.compile(model, backend="patch", options={"plan": plan, "inner": "eager",
                                                                   "cache_dir": str(tmp_path)})
        with torch.inference_mode():
            compiled(torch.randn(3, 64))
        return patchc.kernels(compiled), patchc.explain(compiled)

    torch.manual_seed(0)
    first, rep = compile_once()
    torch.manual_seed(0)
    second, _ = compile_once()
    assert first and not any(k.cache_hit for k in first) and all(k.cache_hit for k in second)
    assert [(k.name, k.source, k.path) for k in first] == [(k.name, k.source, k.path) for k in second]
    assert all("@triton.jit" in k.source and not k.spec.interpret for k in second)   # GPU kernels, on CPU
    names = {k.name for k in second}
    # the kernel for the example M, or "dense" where the cost model dispatches this M to dense
    assert all(d.kernel in names | {"dense"} for d in rep.decisions if d.action == "hybrid")
