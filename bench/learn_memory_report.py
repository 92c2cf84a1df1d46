"""The report of ``learn_memory``: targets, the projection to 7B-8B models (every term) and its
check against the measured config, rendered as Markdown."""
from __future__ import annotations

MODELS = {   # hidden, MLP, layers, q heads, kv heads, vocabulary
    "LLaMA-2-7B": (4096, 11008, 32, 32, 32, 32000),
    "LLaMA-3-8B": (4096, 14336, 32, 32, 8, 128256),
}
GIB = 2 ** 30


def _shapes(m):
    h, i, layers, heads, kv, vocab = m
    d = h // heads
    block = [(h, h), (kv * d, h), (kv * d, h), (h, h), (i, h), (i, h), (h, i)]
    planned = layers * sum(a * b for a, b in block)
    params = planned + 2 * vocab * h + (2 * layers + 1) * h
    return planned, params, max(a * b for a, b in block), sum(a * b for a, b in block)


def _terms(m, r: dict, transient: float, ranks: int, offload: bool, tokens: int, reserve: float) -> dict:
    """Bytes per rank by term for model ``m`` given a measured 1-rank row ``r`` (see the report)."""
    h, i, layers, _, _, vocab = m
    planned, params, largest, block = _shapes(m)
    logit_bpw = r["state_bpw"] / 3
    fsdp = ranks > 1
    return {"weights": 2 * params / ranks,
            # with offload the Adam moments live on the CPU: only the logits stay on the GPU
            "state": (logit_bpw if offload else r["state_bpw"]) * planned / ranks,
            "fixed": r["fixed_bpw"] * planned / ranks,
            "layer_transient": transient * largest,
            # two blocks unsharded (weights + logits, prefetch), one block's logit gradient before its
            # reduce-scatter, and one embedding matrix (input embeddings, LM head: units of their own)
            "fsdp_gather": (2 * block * (2 + logit_bpw) + block * logit_bpw + 2 * vocab * h) if fsdp else 0,
            "activations": (layers * h * 2 + (6 * h + 4 * i) * 2) * tokens,
            "loss": tokens * vocab * 4 + 3 * 2 ** 20,
            "reserve": reserve}


def _measured_one_rank(rows):
    return {(r["mode"], r["state_dtype"]): r for r in rows
            if r["ranks"] == 1 and r["dtype"] == "bfloat16" and r["knobs"] == "memory" and r["mode"] != "plain"}


def _transients(transients):
    return {(t["mode"], t["state_dtype"]): t["transient_bpw_of_layer"] for t in transients
            if t["recompute"] or t["mode"] == "tile"}


def project(rows: list[dict], transients: list[dict], tokens: int = 4096) -> list[dict]:
    """Per-rank GiB for each model, mode, state dtype, ranks and offload: every term."""
    out = []
    trans = _transients(transients)
    for name, m in MODELS.items():
        planned = _shapes(m)[0]
        for (mode, sdt), r in sorted(_measured_one_rank(rows).items()):
            for ranks in (1, 4, 8):
                for offload in ((False,) if mode == "tile" else (False, True)):
                    t = _terms(m, r, trans[(mode, sdt)], ranks, offload, tokens, 3 * GIB)
                    total = sum(t.values())
                    out.append({"model": name, "mode": mode, "state_dtype": sdt, "ranks": ranks, "offload": offload,
                                "tokens": tokens, "planned_weights": planned,
                                "terms_gib": {k: round(v / GIB, 2) for k, v in t.items()},
                                "total_gib": round(total / GIB, 1),
                                "fits_80gb": total <= 80e9, "fits_141gb": total <= 141e9})
    return out


def check_model(rows: list[dict], transients: list[dict], config: dict) -> list[dict]:
    """The projection's terms applied to the measured config: predicted vs measured peak above the model."""
    c = config["llama"]
    tiny = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c["num_key_value_heads"], c["vocab_size"])
    trans, out = _transients(transients), []
    for (mode, sdt), r in sorted(_measured_one_rank(rows).items()):
        for got in rows:
            if (got["mode"], got["state_dtype"], got["dtype"], got["knobs"]) == (mode, sdt, "bfloat16", "memory"):
                t = _terms(tiny, r, trans[(mode, sdt)], got["ranks"], False, config["tokens"], 0)
                # measured above the whole model: fully_shard freed the other ranks' share of the blocks
                freed = 2 * r["planned_weights"] * (1 - 1 / got["ranks"])
                above = (sum(t.values()) - t["weights"] - freed) / r["planned_weights"]
                out.append({"mode": mode, "state_dtype": sdt, "ranks": got["ranks"], "predicted_bpw": round(above, 2),
                            "measured_bpw": got["peak_bpw_above_model"]})
    return out


# ---- report ---------------------------------------------------------------------------------------
def render(res: dict) -> str:
    TOKENS, STEPS = res["config"]["tokens"], res["config"]["steps"]
    L = ["# Mask learning memory", "",
         f"Measured {res['finished']} on {res['host']} (torch {res['torch']}); LlamaForCausalLM from a config "
         f"(hidden 512, MLP 1408, 4 layers, vocabulary 32 000: {res['rows'][0]['planned_weights'] / 1e6:.2f} M planned "
         f"weights), batch 1 × {TOKENS} tokens, {STEPS} steps, tile 128×128.  B/w = bytes per planned weight "
         "(1 B/w is 6.03 GiB at LLaMA-2-7B).  How each number is taken: `bench/learn_memory.py`'s docstring.  "
         f"Load average during the run: {res['load']}.", "",
         "## Measured", "",
         "| mode | weights | state dtype | knobs | ranks | learning state B/w (per rank) | fixed mask data B/w "
         "| peak above the model B/w (per rank) | before |",
         "|---|---|---|---|---|---|---|---|---|"]
    before = {(b["mode"], b["dtype"], b["state_dtype"], b["knobs"], b["ranks"]): b for b in res.get("before", [])}
    for r in res["rows"]:
        key = (r["mode"], r["dtype"], r["state_dtype"], r["knobs"], r["ranks"])
        b = before.get(key)
        L.append(f"| {r['mode']} | {r['dtype']} | {r['state_dtype'] if r['mode'] != 'plain' else '—'} | {r['knobs']} "
                 f"| {r['ranks']} | {r['state_bpw']:.2f} | {r['fixed_bpw']:.2f} | **{r['peak_bpw_above_model']:.2f}** "
                 f"| {b['peak_bpw_above_model']:.2f} |" if b else
                 f"| {r['mode']} | {r['dtype']} | {r['state_dtype'] if r['mode'] != 'plain' else '—'} | {r['knobs']} "
                 f"| {r['ranks']} | {r['state_bpw']:.2f} | {r['fixed_bpw']:.2f} | **{r['peak_bpw_above_model']:.2f}** | — |")
    if before:
        L += ["", f"*before*: the same measurement of the previous implementation ({res.get('before_code', '?')}: "
              "every layer's mask drawn before the forward, all kept for backward, one all-reduce after it; nothing "
              "sharded; no state-dtype or mask-recompute option).  Read without the warm-up step, every figure is "
              "~0.8-1 B/w higher (the runtime's one-time set-up for the shape)."]
    L += ["", "*knobs*: `none` = defaults (the fastest step: joint mode keeps every layer's 2:4 softmax for backward, "
          "tile mode keeps W ⊙ M_2:4, counted in its fixed mask data); "
          "`memory` = `grad_checkpointing=True, recompute_masks=True`.  2-rank rows (FSDP2, gloo) are above the whole "
          "model as each rank loads it before `fully_shard`; they hold two gathered blocks of a 4-layer model (half "
          "of it) and a 32 000 × 512 embedding matrix — terms that are a few percent of a 32-layer 7B model (see "
          "the projection)."]
    L += ["", "## One layer's mask rebuild", "",
          "| mode | state dtype | mask recompute | peak live tensors B per weight of the layer | its logits' gradient |",
          "|---|---|---|---|---|"]
    for t in res["layer_transient"]:
        L.append(f"| {t['mode']} | {t['state_dtype']} | {t['recompute']} | {t['transient_bpw_of_layer']:.1f} "
                 f"| {t['grad_bpw_of_layer']:.1f} |")
    L += ["", "## Targets", ""] + [f"- {line}" for line in res["targets"]]
    L += ["", "The projection's terms applied to the measured config (128 tokens, no reserve; on 2 ranks less the half "
          "of the blocks' weights `fully_shard` frees), against the measurement:",
          "", "| mode | state dtype | ranks | predicted peak above the model B/w | measured |", "|---|---|---|---|---|"]
    for c in res["model_check"]:
        L.append(f"| {c['mode']} | {c['state_dtype']} | {c['ranks']} | {c['predicted_bpw']:.2f} | {c['measured_bpw']:.2f} |")
    L += ["", "## Projection to 7B-8B (per rank, GiB, 4096-token micro-batch, bf16 weights)", "",
          "Per rank: weights = 2 B × parameters / ranks; state and fixed = the measured B/w (1 rank, `memory` "
          "knobs) × planned weights / ranks (FSDP2 shards them; with offload the Adam moments live on the CPU and "
          "only the logits count); layer transient = the measured rebuild B/w × the largest linear; FSDP gather "
          "(ranks > 1) = two decoder blocks unsharded (weights 2 B + logits) and one block's logit gradient before "
          "its reduce-scatter, plus one embedding matrix (the input embeddings and the LM head are FSDP units of their own, each gathered while it runs); activations = the checkpointed block inputs (layers × hidden × 2 B per token) + "
          "one block recomputed ((6·hidden + 4·MLP) × 2 B per token); loss = bf16 logits and their gradient "
          "(4 B × vocabulary per token) + the 1 MiB float32 chunks; reserve = 3 GiB (CUDA context, allocator).", "",
          "| model | mode | state | ranks | offload | weights | state | fixed | layer | FSDP gather | activations "
          "| loss | reserve | **total** | 80 GB | 141 GB |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["projection"]:
        t = p["terms_gib"]
        L.append(f"| {p['model']} | {p['mode']} | {p['state_dtype']} | {p['ranks']} | {'yes' if p['offload'] else 'no'} "
                 f"| {t['weights']} | {t['state']} | {t['fixed']} | {t['layer_transient']} | {t['fsdp_gather']} "
                 f"| {t['activations']} | {t['loss']} | {t['reserve']} | **{p['total_gib']}** "
                 f"| {'fits' if p['fits_80gb'] else '—'} | {'fits' if p['fits_141gb'] else '—'} |")
    return "\n".join(L) + "\n"


def targets(rows: list[dict], projection: list[dict], knobs) -> list[str]:
    def get(**kw):
        for r in rows:
            if all(r.get(k) == v for k, v in kw.items()):
                return r
        return None
    out = []
    for mode, sdt, limit in (("joint", "float32", 21.0), ("joint", "bfloat16", 14.0), ("tile", "float32", 6.0)):
        got = {k: get(mode=mode, dtype="bfloat16", state_dtype=sdt, knobs=k, ranks=1) for k in knobs}
        best = min((r["peak_bpw_above_model"] for r in got.values() if r), default=None)
        if best is not None:
            out.append(f"{mode}, bf16 weights, {sdt} state, 1 rank: "
                       + ", ".join(f"{r['peak_bpw_above_model']:.2f} B/w with knobs {k}" for k, r in got.items() if r)
                       + f" — target ≤ {limit:g}: {'met' if best <= limit else 'missed'}")
    for mode in ("tile", "joint"):
        for sdt in ("float32", "bfloat16"):
            a, b = get(mode=mode, dtype="bfloat16", state_dtype=sdt, knobs="memory", ranks=1), \
                get(mode=mode, dtype="bfloat16", state_dtype=sdt, knobs="memory", ranks=2)
            if a and b:
                # tile mode learns a few logits per tile: its state is the fixed 2:4 patterns
                key = "state_bpw" if mode == "joint" else "fixed_bpw"
                what = "learning state" if mode == "joint" else "mask state (2:4 patterns; the tile logits are ~0)"
                ratio = b[key] / a[key]
                out.append(f"{mode}, {sdt} state: 2-rank FSDP {what} per rank {b[key]:.3f} vs {a[key]:.3f} B/w on 1 "
                           f"rank = {ratio:.2f}× — target ≤ 0.55×: {'met' if ratio <= 0.55 else 'missed'}")
    for mode, ranks in (("joint", 4), ("tile", 1)):
        p = [x for x in projection if x["model"] == "LLaMA-2-7B" and x["mode"] == mode and x["ranks"] == ranks
             and x["state_dtype"] == "float32" and not x["offload"]]
        if p:
            out.append(f"LLaMA-2-7B {mode} on {ranks} × 80 GB, float32 state, 4096-token micro-batch: "
                       f"{p[0]['total_gib']} GiB per rank projected — {'fits' if p[0]['fits_80gb'] else 'does not fit'}")
    return out




def analyse(res: dict) -> None:
    """Targets, projection and model check of a result (in place)."""
    res["projection"] = project(res["rows"], res["layer_transient"])
    res["targets"] = targets(res["rows"], res["projection"], res["config"]["knobs"])
    res["model_check"] = check_model(res["rows"], res["layer_transient"], res["config"])
