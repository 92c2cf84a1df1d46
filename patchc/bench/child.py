"""One measurement per fresh interpreter: the parent runs ``python -m <module> --child <task>
<spec JSON>``, the child prints its JSON result on a line of its own after ``RESULT``.  Shared by
the compile-time and memory benchmarks (a fresh process is what "cold" and "resident memory"
mean)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Callable, Optional

RESULT = "PATCHC_BENCH_RESULT "          # prefix of the child's JSON line on stdout


def run_child(module: str, task: str, spec: dict, env: Optional[dict] = None, timeout: float = 1800) -> dict:
    """Run ``task`` of ``module`` in a fresh interpreter; its JSON result plus ``process_s``
    (the child's wall time, start-up included).  A failed child raises with its output's tail."""
    cmd = [sys.executable, "-m", module, "--child", task, json.dumps(spec)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    if p.returncode or not lines:
        raise RuntimeError(f"{module} child {task} {spec.get('backend', '')} failed (rc {p.returncode}):\n"
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
