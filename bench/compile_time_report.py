"""The compile-time benchmark's summary and markdown report (``bench.compile_time``)."""
from __future__ import annotations


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def summarize(result: dict) -> dict:
    runs, base = result["runs"], result["baseline"]

    def pick(backend, phase):
        return [r for r in runs if r["backend"] == backend and r["phase"] == phase]

    s = {}
    for b in (base, "patch"):
        for ph in ("cold", "warm"):
            rs = pick(b, ph)
            if rs:
                s[f"{b}_{ph}_s"] = _median([r["first_call_s"] for r in rs])
                s[f"{b}_{ph}_cpu_s"] = _median([r["cpu_s"] for r in rs])
    for ph in ("cold", "warm"):
        if f"{base}_{ph}_s" in s and f"patch_{ph}_s" in s:
            key = "overhead_pct" if ph == "cold" else "warm_overhead_pct"
            s[key] = 100.0 * (s[f"patch_{ph}_s"] / s[f"{base}_{ph}_s"] - 1.0)
            s[key.replace("pct", "cpu_pct")] = 100.0 * (s[f"patch_{ph}_cpu_s"] / s[f"{base}_{ph}_cpu_s"] - 1.0)
        rs = pick("patch", ph)
        if not rs:
            continue
        split = {k: _median([r["split"][k] for r in rs]) for k in rs[0]["split"]}
        s[f"patchc_{ph}"] = split
        s[f"patchc_{ph}_excl_packing_s"] = split["total"] - split["packing"]
        s[f"patchc_{ph}_excl_weight_prep_s"] = split["total"] - split["packing"] - split["reference weight"]
        s[f"per_pass_{ph}"] = {k: _median([r["per_pass"].get(k, 0.0) for r in rs]) for k in rs[0]["per_pass"]}
        pk = [r["pack_dense_bytes"] / r["split"]["packing"] for r in rs if r["split"]["packing"] > 0]
        if pk:
            s[f"packing_{ph}_gbps"] = _median(pk) / 1e9
        warm_mem = [r["pack_warm_memory"]["gbps"] for r in rs if r.get("pack_warm_memory")]
        if warm_mem:
            s[f"packing_{ph}_warm_memory_gbps"] = _median(warm_mem)
    s["trees"] = sorted({r.get("tree", "?") for r in runs})
    return s


# ---- report ----------------------------------------------------------------------------------
def _f(x, nd=2):
    if x is None:
        return "-"
    out = f"{x:.{nd}f}"
    return out[1:] if out.startswith("-") and not out.strip("-0.") else out      # no "-0"


def render_markdown(result: dict) -> str:
    s, env, m, base, pl = result["summary"], result["env"], result["model"], result["baseline"], result["plan"]
    lines = ["# Compile time: backend=\"patch\" vs inductor (CPU)", ""]
    if "overhead_pct" in s:
        lines += [f"overhead: {round(s['overhead_pct']) + 0} %", ""]          # + 0: no "-0"
    lines += [f"Wall time of patch's cold compile + first forward over {base}'s, minus one (goal: <= 20 %); "
              f"in CPU seconds (process + waited-for children): {_f(s.get('overhead_cpu_pct'), 0)} %. "
              f"Warm: {_f(s.get('warm_overhead_pct'), 0)} % wall, {_f(s.get('warm_overhead_cpu_pct'), 0)} % CPU.", "",
              f"patchc's own time, warm, excluding the weight preparation (packing, and on CPU the reference "
              f"path's W ⊙ M): {_f(s.get('patchc_warm_excl_weight_prep_s'))} s (goal: <= 1 s); excluding packing "
              f"only: {_f(s.get('patchc_warm_excl_packing_s'))} s.", "",
              "## Set-up", "",
              f"- {env['date']}; {env['cpu']}, {env['cores']} cores, torch threads {env['threads']}; torch "
              f"{env['torch']}, triton {env.get('triton')}, transformers {env.get('transformers')}, python "
              f"{env['python']}; code: {', '.join(s.get('trees', []))}",
              f"- model: LlamaForCausalLM from a config with random weights, {m['layers']} layers, hidden "
              f"{m['hidden']}, MLP {m['intermediate']}, {m['heads']} heads / {m['kv_heads']} KV, vocab {m['vocab']}: "
              f"{pl['params'] / 1e9:.3f} B parameters, {pl['planned_params'] / 1e9:.3f} B in the {pl['linears']} "
              f"planned linears; {result['dtype']} (inductor on CPU handles bf16; this CPU has AVX-512 BF16 / AMX)",
              f"- plan: magnitude_hybrid at {result['sparsity']:.0%}, tile {result['tile'][0]}x{result['tile'][1]}: "
              f"sparsity {pl['sparsity']:.4f}, 2:4 fraction per linear {pl['frac_sparse_min']:.2f}.."
              f"{pl['frac_sparse_max']:.2f}, {pl['without_24_tiles']} planned linears without 2:4 tiles; the LM "
              "head is not planned (plans leave it dense)",
              f"- time = torch.compile + the first forward (batch 1 x {result['seq']} tokens, "
              "torch.inference_mode()), after one eager forward; every run a fresh process; cold = empty "
              "TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR / PATCHC_CACHE_DIR, warm = a second process on them; "
              f"TORCHINDUCTOR_COMPILE_THREADS={result['runs'][0].get('compile_threads', '?')}",
              f"- patch: torch.compile(model, backend=\"patch\", options={{\"plan\": <file>, \"inner\": "
              f"\"{result['inner']}\"}}); on CPU the rewritten sites run the reference path (F.linear on W ⊙ M, "
              "built once per weight at the first call)",
              f"- shared machine: the load average of every run is listed (2 = both cores busy); "
              f"{len(result['runs']) // 4} repetition(s), medians; the whole benchmark took "
              f"{result['wall_s'] / 60:.1f} min",
              "", "## Runs", "",
              "| backend | phase | compile + first forward (s) | CPU s | steady forward (s) | patchc (s) | "
              "rest: dynamo + inductor (s) | load avg | FX graph cache |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        fx = ", ".join(f"{k.split('.', 1)[1].replace('fxgraph_cache_', '')} {v}"
                       for k, v in sorted(r["counters"].items()) if "fxgraph_cache" in k) or "-"
        ps = r.get("split", {}).get("total")
        lines.append(f"| {r['backend']} | {r['phase']} | {r['first_call_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['forward_s']:.2f} | {_f(ps, 1)} | {r['first_call_s'] - (ps or 0) - r['forward_s']:.1f} | "
                     f"{r['loadavg_before']:.1f} | {fx} |")
    if s.get("patchc_cold"):
        w = s.get("patchc_warm", {})
        lines += ["", "## patchc's own time by part (s)", "", "| part | cold | warm |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {_f(w.get(k))} |" for k, v in s["patchc_cold"].items()]
        pw = s.get("per_pass_warm", {})
        lines += ["", "Per pass (the passes include the cost model, codegen and packing):", "",
                  "| pass | cold | warm |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {_f(pw.get(k))} |" for k, v in s["per_pass_cold"].items()]
        r = next(x for x in result["runs"] if x["backend"] == "patch")
        pm = r.get("pack_warm_memory") or {}
        pa = r.get("pack_all") or {}
        if r["pack_dense_bytes"]:
            packing = (f"- packing in the compile: {r['pack_dense_bytes'] / 1e9:.3f} GB of dense weights -> "
                       f"{r['pack_packed_bytes'] / 1e9:.3f} GB packed, {_f(s.get('packing_cold_gbps'))} GB/s cold, "
                       f"{_f(s.get('packing_warm_gbps'))} GB/s warm")
        else:
            packing = ("- packing: the CPU compile packs nothing (the reference path reads the user's weights; the "
                       "packed form is built when a Triton kernel or `release_dense` needs it)")
        if pa:
            packing += (f"; packing all {pa['weights']} weights after the compile, as a GPU compile would: "
                        f"{pa['dense_bytes'] / 1e9:.3f} GB -> {pa['packed_bytes'] / 1e9:.3f} GB in {pa['seconds']:.2f} s "
                        f"({pa['gbps']:.2f} GB/s, fresh memory)")
        lines += ["", packing + f"; re-packing {pm.get('weights', '?')} weights on warm memory: "
                  f"{_f(s.get('packing_cold_warm_memory_gbps'))} GB/s (dense bytes / s)",
                  f"- sites: {r['decisions']}; graphs {r['graphs']}; distinct generated kernels "
                  f"{r['distinct_kernels']}; kernel cache, cold run: {r['kernel_cache']}",
                  "- `total` = passes (rest) + cost model + codegen + packing + loading + reference weight; "
                  "`render` is part of `codegen`; loading = the mask file (generated kernel modules are imported "
                  "at the first Triton launch, which never happens on CPU)"]
    lines += reading(result)
    lines += ["", "## Reproduce", "", "```", result.get("command", ""), "```", ""]
    return "\n".join(lines)


def reading(result: dict) -> list[str]:
    """How to read the numbers, computed from them."""
    s, base = result["summary"], result["baseline"]
    pc, pw = s.get("patchc_cold"), s.get("patchc_warm")
    if not pc or f"{base}_cold_s" not in s:
        return []
    ind = [r for r in result["runs"] if r["backend"] == base and r["phase"] == "cold"]
    pat = [r for r in result["runs"] if r["backend"] == "patch" and r["phase"] == "cold"]
    rest_ind = _median([r["first_call_s"] - r["forward_s"] for r in ind])
    rest_pat = _median([r["first_call_s"] - r["split"]["total"] - r["forward_s"] for r in pat])
    out = ["", "## Reading", "",
           f"- Cold, patchc's own {pc['total']:.1f} s ({100 * pc['total'] / s[f'{base}_cold_s']:.0f} % of {base}'s "
           f"cold time) is offset by the compiler behind it: dynamo + {base} took {rest_pat:.1f} s on the rewritten "
           f"graph vs {rest_ind:.1f} s on the original (the rewritten linears are opaque custom-op calls, "
           f"nothing for {base} to lower), so the net overhead is {_f(s.get('overhead_pct'), 0)} %."]
    ind_w = [r for r in result["runs"] if r["backend"] == base and r["phase"] == "warm"]
    pat_w = [r for r in result["runs"] if r["backend"] == "patch" and r["phase"] == "warm"]
    if pw and ind_w:
        rw_ind = _median([r["first_call_s"] - r["forward_s"] for r in ind_w])
        rw_pat = _median([r["first_call_s"] - r["split"]["total"] - r["forward_s"] for r in pat_w])
        prep = pw["packing"] + pw["reference weight"]
        out.append(f"- Warm, the caches cut dynamo + {base} to {rw_ind:.1f} s ({rw_pat:.1f} s on the rewritten graph) "
                   f"and patchc's own time to {pw['total']:.1f} s (cold {pc['total']:.1f} s): the cost model's plans "
                   f"and fusion predictions come from the disk cache ({pc['cost model']:.1f} -> {pw['cost model']:.2f} s), "
                   f"the mask file is read as bits and unpacked only where a mask is applied (loading "
                   f"{pw['loading']:.2f} s). Left: the weight preparation, {prep:.1f} s (packing {pw['packing']:.1f} s, "
                   f"the CPU reference weight {pw['reference weight']:.1f} s: per-byte work on 1.2 GB of weights, "
                   f"bound by this VM's memory bandwidth), and {s.get('patchc_warm_excl_weight_prep_s', 0):.2f} s of "
                   f"the rest (goal <= 1 s): passes {pw['passes (rest)']:.2f}, cost model {pw['cost model']:.2f}, "
                   f"loading {pw['loading']:.2f}, codegen {pw['codegen']:.2f}.")
    if s.get("packing_cold_gbps") and s.get("packing_cold_warm_memory_gbps"):
        out.append(f"- Packing runs at {s['packing_cold_warm_memory_gbps']:.2f} GB/s on memory the process has "
                   f"touched before and {s['packing_cold_gbps']:.2f} GB/s inside the compile, where every packed "
                   "buffer is fresh memory the OS must fault in (on this VM a first touch runs at ~0.2-3 GB/s) and "
                   "fused sibling groups concatenate their members' weights before packing.")
    return out
