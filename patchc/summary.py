"""Readable summaries of a plan: layers grouped by block and kind, tables that fit 100 columns, a
short header of the plan's metadata.  Used by ``patchc inspect | prune | learn | demo``."""
from __future__ import annotations

import json
import re
from collections import OrderedDict

WIDTH = 100
_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<kind>.+)$")


def split_block(name: str) -> tuple[str, int, str]:
    """``model.layers.3.mlp.up_proj`` -> ("model.layers", 3, "mlp.up_proj"); a name with no
    numeric component -> ("", -1, name)."""
    m = _BLOCK.match(name)
    return (m["prefix"], int(m["index"]), m["kind"]) if m else ("", -1, name)


def blocks(names) -> tuple[list[tuple[str, int]], list[str], dict]:
    """(rows, kinds, where): one row per block (``(prefix, index)``; names outside blocks share a
    last row ``("", -1)``), the kinds in first-seen order, and ``where[name] = (row, kind)``."""
    rows, kinds, where = OrderedDict(), OrderedDict(), {}
    for n in names:
        prefix, idx, kind = split_block(n)
        rows.setdefault((prefix, idx), None)
        kinds.setdefault(kind, None)
        where[n] = ((prefix, idx), kind)
    order = [r for r in rows if r[1] >= 0] + [r for r in rows if r[1] < 0]
    return order, list(kinds), where


def format_table(rows: list[tuple], width: int = WIDTH, indent: str = "  ") -> list[str]:
    """Left-aligned columns (numbers right-aligned); the first column is shortened from the left
    (``…``) so that every line fits ``width``."""
    rows = [tuple(str(c) for c in r) for r in rows]
    if not rows:
        return []
    ncol = len(rows[0])
    w = [max(len(r[i]) for r in rows) for i in range(ncol)]
    rest = sum(w[1:]) + 2 * (ncol - 1) + len(indent)
    if w[0] + rest > width:
        w[0] = max(8, width - rest)
    out = []
    for r in rows:
        first = r[0] if len(r[0]) <= w[0] else "…" + r[0][-(w[0] - 1):]
        cells = [first.ljust(w[0])] + [c.rjust(x) if _numeric(c) else c.ljust(x) for c, x in zip(r[1:], w[1:])]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def _numeric(s: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.,/%x ]+[%]?", s)) and any(ch.isdigit() for ch in s)


def kind_rows(plan) -> list[tuple]:
    """One row per kind of layer (``self_attn.q_proj``...): layers, weights, 2:4 tiles, sparsity."""
    _, kinds, where = blocks(plan)
    acc = {k: [0, 0, 0, 0, 0] for k in kinds}          # layers, weights, pruned, tiles, 2:4 tiles
    for name, m in plan.items():
        a = acc[where[name][1]]
        a[0] += 1
        a[1] += m.shape[0] * m.shape[1]
        a[2] += m.pruned()
        a[3] += m.tile_kind.numel()
        a[4] += m.num_sparse_tiles()
    rows = [("layer kind", "layers", "shape", "2:4 tiles", "sparsity")]
    shapes = {}
    for name, m in plan.items():
        shapes.setdefault(where[name][1], set()).add("x".join(map(str, m.shape)))
    for k, (n, w, p, t, s) in acc.items():
        shape = next(iter(shapes[k])) if len(shapes[k]) == 1 else "mixed"
        rows.append((k, str(n), shape, f"{s}/{t}", f"{p / max(1, w):.4f}"))
    return rows


def layer_rows(plan) -> list[tuple]:
    """One row per layer: shape, tiles, 2:4 tiles, fraction of the weight in 2:4 tiles, sparsity."""
    rows = [("layer", "shape", "2:4 tiles", "2:4 frac", "sparsity")]
    for name, st in plan.per_layer().items():
        rows.append((name, "x".join(map(str, st["shape"])), f"{st['sparse_tiles']}/{st['tiles']}",
                     f"{st['frac_sparse']:.3f}", f"{st['sparsity']:.4f}"))
    return rows


def headline(plan) -> str:
    """``210 layers, sparsity 0.2500, 2:4 tiles 3360/6720 (50.0 % of the weights)``."""
    tiles = sum(m.tile_kind.numel() for m in plan.values())
    sparse = sum(m.num_sparse_tiles() for m in plan.values())
    weights = sum(m.shape[0] * m.shape[1] for m in plan.values())
    in24 = sum(m.fraction_sparse_tiles() * m.shape[0] * m.shape[1] for m in plan.values())
    return (f"{len(plan)} layers, sparsity {plan.sparsity():.4f}, 2:4 tiles {sparse}/{tiles} "
            f"({in24 / max(1, weights):.1%} of the weights)")


def meta_lines(meta: dict, width: int = WIDTH, verbose: bool = False) -> list[str]:
    """The plan's metadata as ``key: value`` lines; long values (a learning config, a layer
    fingerprint) are summarised unless ``verbose``."""
    out = []
    for k, v in meta.items():
        if verbose:
            out.append(f"  {k}: {json.dumps(v)}")
            continue
        if k == "fingerprint" and isinstance(v, dict):
            out.append(f"  made for: {len(v)} linears (fingerprint of names and shapes)")
            continue
        if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()):
            text = ", ".join(f"{a}={json.dumps(b)}" for a, b in v.items())
        elif isinstance(v, (dict, list)) and len(json.dumps(v)) > 60:
            text = f"<{type(v).__name__} of {len(v)} entries; --verbose shows it>"
        else:
            text = json.dumps(v) if not isinstance(v, str) else v
        line = f"  {k}: {text}"
        out.append(line if len(line) <= width else line[: width - 1] + "…")
    return out
