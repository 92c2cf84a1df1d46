"""What the benchmarks share: the environment line of a result, the code a result ran on, the
Llama-style test model built from a config, child processes, and writing reports."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(hidden=1536, intermediate=4096, layers=24, heads=12, kv_heads=4, vocab=32000)   # ~0.70 B
TINY = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
RESULT = "PATCHC_BENCH_RESULT "          # prefix of a child process's JSON line on stdout


def env_info(device=None) -> dict:
    """Date, versions, CPU / GPU and the code (``tree_state``) of a result."""
    import torch
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "code": tree_state()}
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as None
            info[mod] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = f"cpu ({info['cpu']})"
    return info


def tree_state() -> str:
    """The patchc version, HEAD and a hash of the uncommitted changes to the library: which code ran."""
    import hashlib

    import patchc
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "patchc", "passes", "codegen"], cwd=ROOT,
                              capture_output=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return f"patchc {patchc.__version__}"
    if not head:
        return f"patchc {patchc.__version__}"
    return f"patchc {patchc.__version__} {head}" + (f"+{hashlib.sha1(diff).hexdigest()[:8]}" if diff else "")


def build_model(model: dict, dtype: str = "bf16", seed: int = 0, device: str = "cpu"):
    """A ``LlamaForCausalLM`` with random (seeded, reproducible) weights in ``dtype``, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from patchc.dtypes import torch_dtype
    cfg = LlamaConfig(hidden_size=model["hidden"], intermediate_size=model["intermediate"],
                      num_hidden_layers=model["layers"], num_attention_heads=model["heads"],
                      num_key_value_heads=model["kv_heads"], vocab_size=model["vocab"],
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(dtype))      # built in place: no fp32 copy of a bf16 model
    try:
        with torch.device(device):
            m = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return m.eval()


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_child(module: str, task: str, spec: dict, env: Optional[dict] = None, timeout: float = 1800) -> dict:
    """Run ``task`` of ``bench.<module>`` in a fresh interpreter (``python -m bench.<module> --child
    <task> <spec JSON>``, from the checkout); its JSON result plus ``process_s`` (the child's wall
    time, start-up included).  A failed child raises with its output's tail."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", f"bench.{module}", "--child", task, json.dumps(spec)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    if p.returncode or not lines:
        raise RuntimeError(f"bench.{module} child {task} {spec.get('backend', '')} failed (rc {p.returncode}):\n"
                           f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    out = json.loads(lines[-1][len(RESULT):])
    out["process_s"] = time.perf_counter() - t
    return out


def child_main(argv: list[str], tasks: dict[str, Callable[[dict], dict]]) -> Optional[int]:
    """In the child (``argv`` starts with ``--child``): run the task, print its result, return 0.
    Otherwise None (the caller parses its own arguments)."""
    if argv[:1] != ["--child"]:
        return None
    if len(argv) != 3 or argv[1] not in tasks:
        raise SystemExit(f"usage: --child {{{','.join(tasks)}}} <spec JSON>")
    out = tasks[argv[1]](json.loads(argv[2]))
    print(RESULT + json.dumps(out), flush=True)
    return 0


def bench_main(argv, module: str, doc: str, tasks: dict, add_arguments, main_args) -> int:
    """The ``main(argv)`` of a benchmark module: a child task (``--child``), else parse the options
    (``add_arguments``) and run ``main_args``."""
    import argparse
    argv = list(sys.argv[1:] if argv is None else argv)
    rc = child_main(argv, tasks)
    if rc is not None:
        return rc
    p = argparse.ArgumentParser(prog=f"patchc bench {module.replace('_', '-')}", description=doc.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.cmdline = f"python -m bench.{module} " + " ".join(argv)
    return main_args(args)


def write_report(out: Optional[str], markdown: str, result: dict) -> None:
    """Print the report; with ``out``, write it there and the raw result as JSON beside it."""
    print(markdown)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(markdown)
        Path(out).with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
