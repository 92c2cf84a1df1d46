"""The body of a generated kernel, as lines of Triton source: prologue, the two strategies, epilogue.

Tensors are written over named axes (``_ix`` broadcasts a vector into them):

* T: the BLOCK_T consecutive slots (tiles) of one loop step -- more work per step amortises the
  loop's bookkeeping and lets a small program (BLOCK_N 16) still keep 4-8 warps busy;
* M, N: rows of X and of W owned by the program;
* W, G: a tile row of TK columns is TK / 4 groups = W metadata words of G groups (G = 8; a single
  word of TK / 4 groups below 32 columns), so a 2:4 tile is [N, W, G] value pairs (16 bit: one
  int32 each) plus [N, W] words: every word is loaded once and broadcast to its groups;
* P: the 2 values of a pair or the 4 of a group.

gemv accumulates [T, M, N, W, G] fp32 and reduces once at the end; mma expands [T, N, BK] and calls
a (batched) ``tl.dot`` per BLOCK_K step.  The ragged last tile-column (K % TK columns) is one masked
step after the loops, on 2-D [M, N] tensors; the loops are unmasked along K, so their loads stay
16-byte vectors.
"""
from __future__ import annotations

from . import tables


def _pow2_at_least(x: int, lo: int = 1) -> int:
    v = lo
    while v < x:
        v *= 2
    return v


def _words(width: int, min_cols: int = 4):
    """(W, G, groups) of a tile row ``width`` columns wide as power-of-two tensor dims [W, G]
    (W G >= width / 4 groups, and 4 W G >= ``min_cols``)."""
    g = width // 4
    gw = min(8, _pow2_at_least(g))
    w = _pow2_at_least(-(-g // gw))
    while 4 * w * gw < min_cols:
        if gw < 8:
            gw *= 2
        else:
            w *= 2
    return w, gw, g


def _ix(expr: str, axes: str, of: str) -> str:
    """``expr`` (a tensor over ``axes``, in that order) broadcast into the axes ``of``."""
    if axes == of or not axes:           # already laid out, or a scalar
        return expr
    return f"{expr}[{', '.join(':' if a in axes else 'None' for a in of)}]"


def _tile(tile, axes: str, of: str, per_row: int) -> str:
    """`` + tile * (nrows * per_row)`` (a stored tile's offset in its row's region); "" for None."""
    return "" if tile is None else f" + {_ix(tile, axes, of)} * (nrows * {per_row})"


def _and(*masks) -> str:
    return " & ".join(m for m in masks if m)


def _selectors(c, words: str, W: int, G: int, kind: str) -> list:
    """Lines computing byte-permute selectors over ``words + "G"`` (one per group) from the meta
    words ``wd`` over ``words``: the pattern ids of 4 groups sit in a half-word, one ``prmt``
    looks a table byte up for all 4, one more per group pairs two looked-up bytes.
    ``kind`` "pick": ``sel`` (pick x[i0], x[i1]); "expand": ``sel_lo``, ``sel_hi``."""
    H, Q = max(1, G // 4), min(4, G)
    sizes = {"T": c["BT"], "N": c["BN"], "W": W, "G": G}
    shape = ", ".join(str(sizes[a]) for a in words + "G")
    axh, axq = words + "H", words + "HQ"
    out = [f"h = {_ix('wd', words, axh)} >> {_ix(f'(tl.arange(0, {H}) * 16)', 'H', axh)}  # 4 pattern ids per half-word"]
    comb = f"(tl.arange(0, {Q}) | ((tl.arange(0, {Q}) + 4) << 4))"     # tables.combine(q)

    def sel(name, tab_a, tab_b):
        look = lambda tab: _ix(f"_prmt({tab[0]}, h, {tab[1]})", axh, axq)  # noqa: E731
        return f"{name} = tl.reshape(_prmt({look(tab_a)}, {_ix(comb, 'Q', axq)}, {look(tab_b)}), ({shape}))"
    if kind == "pick":
        return out + [sel("sel", tables.PICK_LO, tables.PICK_HI)]
    return out + [sel("sel_lo", tables.EXPAND[0], tables.EXPAND[1]), sel("sel_hi", tables.EXPAND[2], tables.EXPAND[3])]


def _edge_bases(c, sv_unit: int, dv_unit: int) -> list:
    return [f"sve = sparse_vals_ptr + tl.load(rec + {c['R_S_EVALS']}).to(tl.int64) * {sv_unit}  # the ragged tile",
            f"sme = sparse_meta_ptr + tl.load(rec + {c['R_S_EMETA']}).to(tl.int64) * {c['UNIT_I32']}",
            f"dve = dense_vals_ptr + tl.load(rec + {c['R_D_EVALS']}).to(tl.int64) * {dv_unit}"]


def _meta(spec, c, b: str, tile, base: str, wpr: int, off: int, W: int, G: int, masked: bool, kind: str) -> list:
    """``grp`` [W, G], the metadata words ``wd`` of a step (over ``b`` + "NW"; ``b`` = "T" or "")
    and from them the selectors (16 bit: ``kind`` "pick" / "expand") or the pattern ids ``t``
    (fp32); ``off`` words into the tile row."""
    t_ok = _ix("t_ok", "T", b + "NW") if masked else ""
    out = [f"grp = tl.arange(0, {W})[:, None] * {G} + tl.arange(0, {G})[None, :]  # group of a tile row",
           f"wd = tl.load({base}{_tile(tile, b, b + 'NW', -(-c['TK'] // 32))} + {_ix('rl', 'N', b + 'NW')} * {wpr}"
           f"{f' + {off}' if off else ''} + {_ix(f'tl.arange(0, {W})', 'W', b + 'NW')},",
           f"             mask={_and(t_ok, _ix('n_ok', 'N', b + 'NW'))}, other=0)"]
    if spec.dtype == "fp32":
        return out + [f"t = {_ix('wd', b + 'NW', b + 'NWG')} >> {_ix(f'(tl.arange(0, {G}) * 4)', 'G', b + 'NWG')}"
                      "  # pattern id in nibble 0"]
    return out + _selectors(c, b + "NW", W, G, kind)


def prologue(spec, c) -> list:
    out = [
        "pid_n = tl.program_id(0)",
        "pid_m = tl.program_id(1)",
        f"row = pid_n // {c['N_SUB']}  # packed tile-row",
        f"rl = (pid_n % {c['N_SUB']}) * {c['BN']} + tl.arange(0, {c['BN']})  # its rows owned by this program",
        f"rec = rows_ptr + row * {c['ROWF']}",
        "# the record and the K-tile indices sit at addresses known from the program id: loaded together",
        f"orig = tl.load(rec + {c['R_ORIG']})",
        f"nrows = tl.load(rec + {c['R_ROWS']})",
        f"n_s = tl.load(rec + {c['R_N_S']})",
        f"n_d = tl.load(rec + {c['R_N_D']})",
        f"edge = tl.load(rec + {c['R_EDGE']})",
        f"s_vals = tl.load(rec + {c['R_S_VALS']}).to(tl.int64)",
        f"s_meta = tl.load(rec + {c['R_S_META']}).to(tl.int64)",
        f"d_vals = tl.load(rec + {c['R_D_VALS']}).to(tl.int64)",
        f"slots = tl.arange(0, {c['NKP']})",
        f"kv = tl.load(kidx_ptr + row * {c['NK']} + slots, mask=slots < {c['NK']}, other=0)  # K tile per slot",
        f"rm = pid_m * {c['BM']} + tl.arange(0, {c['BM']})",
        "rm64 = rm.to(tl.int64)  # int64: M * K may pass 2**31",
        "m_ok = rm < M",
        "n_ok = rl < nrows",
        "ns_full = n_s - (edge & 1)  # the ragged tile-column (edge 1: 2:4, 2: dense) is the last of its kind",
        "nd_full = n_d - ((edge >> 1) & 1)",
    ]
    if c["SK"] > 1:
        out += ["pid_s = tl.program_id(2)",
                "# this program's even slice [t0, t1) of the row's slots (2:4 tiles, then dense)",
                "total = n_s + n_d",
                f"t0 = total * pid_s // {c['SK']}",
                f"t1 = total * (pid_s + 1) // {c['SK']}"]
    else:
        out += ["t0 = 0", "t1 = n_s + n_d"]
    out += ["s_lo = tl.minimum(t0, ns_full)",
            "s_hi = tl.maximum(tl.minimum(t1, ns_full), s_lo)",
            "d_lo = tl.minimum(tl.maximum(t0 - n_s, 0), nd_full)",
            "d_hi = tl.maximum(tl.minimum(t1 - n_s, nd_full), d_lo)"]
    if c["WR"] != c["TK"]:
        out += ["edge_s = ((edge & 1) != 0) & (t0 <= n_s - 1) & (n_s - 1 < t1)",
                "edge_d = ((edge & 2) != 0) & (t0 <= n_s + nd_full) & (n_s + nd_full < t1)"]
    return out


def _step(c, lo: str, hi: str, slot0: str) -> list:
    """Loop header over [lo, hi) in steps of BLOCK_T slots: ``tj`` [T] the step's slots,
    ``t_ok`` which exist, ``kt`` [T] their K tiles (picked from ``kv``: no load feeds an address,
    so the walk stays affine and the pipeliner multi-buffers every load)."""
    return [f"for j in tl.range({lo}, {hi}, {c['BT']}, num_stages={c['NS']}):",
            f"    tj = j + tl.arange(0, {c['BT']})",
            f"    t_ok = tj < {hi}",
            f"    kt = tl.gather(kv, tl.minimum({slot0}tj, {c['NKP'] - 1}), 0)"]


def _step1(c, lo: str, hi: str, slot0: str) -> list:
    """``_step`` with one slot per step: scalar ``j`` and ``kt``."""
    return [f"for j in tl.range({lo}, {hi}, num_stages={c['NS']}):",
            f"    kt = tl.sum(tl.where(slots == {slot0}j, kv, 0))  # K tile of slot j (no load feeds an address)"]


# ---- gemv ------------------------------------------------------------------------------------------
def _gemv_sparse(spec, c, ragged: bool) -> list:
    """A 2:4 step of the gemv strategy, computed straight from the compressed form."""
    tk, wr = c["TK"], c["WR"]
    width = wr if ragged else tk
    W, G, ng = _words(width)
    wpr, gpr = -(-width // 32), width // 4                       # words / groups per stored row
    # axes: a step over T tiles, or one ragged tile (no T)
    ax = "MNWG" if ragged else "TMNWG"
    sv_t = "" if ragged else "T"
    tile = None if ragged else "tj"
    sm, sv = ("sme", "sve") if ragged else ("sm", "sv")          # the ragged tile has its own region
    kt = str(c["NK"] - 1) if ragged else "kt"
    gm = f"(grp < {ng})" if W * G != ng else ""
    out = _meta(spec, c, sv_t, tile, sm, wpr, 0, W, G, not ragged, "pick")
    vmask = _and(_ix("t_ok", "T", sv_t + "NWG") if not ragged else "", _ix("n_ok", "N", sv_t + "NWG"),
                 _ix(gm, "WG", sv_t + "NWG") if gm else "")
    xmask = _and(_ix("t_ok", "T", sv_t + "MWGP") if not ragged else "", _ix("m_ok", "M", sv_t + "MWGP"),
                 _ix(gm, "WG", sv_t + "MWGP") if gm else "")
    vmask4 = _and(_ix("t_ok", "T", sv_t + "NWGP") if not ragged else "", _ix("n_ok", "N", sv_t + "NWGP"),
                  _ix(gm, "WG", sv_t + "NWGP") if gm else "")
    acc = "acc_r" if ragged else "acc"
    done = (lambda e: f"{acc} += tl.sum(tl.sum({e}, axis=3), axis=2)") if ragged else (lambda e: f"{acc} += {e}")
    if spec.dtype != "fp32":
        out += [f"vp = tl.load({sv}{_tile(tile, sv_t, sv_t + 'NWG', tk // 4)} + {_ix('rl', 'N', sv_t + 'NWG')}"
                f" * {gpr} + {_ix('grp', 'WG', sv_t + 'NWG')},",
                f"             mask={vmask}, other=0)  # kept value pairs",
                f"xq = tl.load(x_ptr + {_ix('rm64', 'M', sv_t + 'MWGP')} * {c['K'] // 2} + {_ix(kt, sv_t, sv_t + 'MWGP')}"
                f" * {tk // 2} + {_ix('grp', 'WG', sv_t + 'MWGP')} * 2 + {_ix('tl.arange(0, 2)', 'P', sv_t + 'MWGP')},",
                f"             mask={xmask}, other=0)  # X as pairs (x0 | x1 << 16, x2 | x3 << 16)",
                "x01, x23 = tl.split(xq)",
                f"xp = _prmt({_ix('x01', sv_t + 'MWG', ax)}, {_ix('sel', sv_t + 'NWG', ax)},"
                f" {_ix('x23', sv_t + 'MWG', ax)})  # x[i0] | x[i1] << 16"]
        vp = _ix("{}(vp)", sv_t + "NWG", ax)
        if ragged:
            return out + [done(f"{vp.format('_lo')} * _lo(xp) + {vp.format('_hi')} * _hi(xp)")]
        return out + [done(f"{vp.format('_lo')} * _lo(xp)"), done(f"{vp.format('_hi')} * _hi(xp)")]
    out += [f"v = tl.load({sv}{_tile(tile, sv_t, sv_t + 'NWGP', tk // 2)} + {_ix('rl', 'N', sv_t + 'NWGP')}"
            f" * {2 * gpr} + {_ix('grp', 'WG', sv_t + 'NWGP')} * 2 + {_ix('tl.arange(0, 2)', 'P', sv_t + 'NWGP')},",
            f"            mask={vmask4}, other=0.0)",
            "v0, v1 = tl.split(v)",
            f"xq = tl.load(x_ptr + {_ix('rm64', 'M', sv_t + 'MWGP')} * {c['K']} + {_ix(kt, sv_t, sv_t + 'MWGP')} * {tk}"
            f" + {_ix('grp', 'WG', sv_t + 'MWGP')} * 4 + {_ix('tl.arange(0, 4)', 'P', sv_t + 'MWGP')},",
            f"             mask={xmask}, other=0.0)",
            f"xa, xb = tl.split(tl.reshape(xq, ({'' if ragged else str(c['BT']) + ', '}{c['BM']}, {W}, {G}, 2, 2)))",
            "x0, x2 = tl.split(xa)",
            "x1, x3 = tl.split(xb)",
            f"a = {_ix('_i0(t & 15)', sv_t + 'NWG', ax)}",
            f"b = {_ix('_i1(t & 15)', sv_t + 'NWG', ax)}",
            "xi0 = tl.where(a == 0, {x0}, tl.where(a == 1, {x1}, {x2}))".format(
                **{f"x{i}": _ix(f"x{i}", sv_t + "MWG", ax) for i in range(3)}),
            "xi1 = tl.where(b == 3, {x3}, tl.where(b == 2, {x2}, {x1}))".format(
                **{f"x{i}": _ix(f"x{i}", sv_t + "MWG", ax) for i in range(1, 4)}),
            done(f"{_ix('v0', sv_t + 'NWG', ax)} * xi0 + {_ix('v1', sv_t + 'NWG', ax)} * xi1")]
    return out


def _gemv_dense(spec, c, ragged: bool) -> list:
    """A dense step of the gemv strategy (16 bit: value pairs against X pairs)."""
    tk, wr = c["TK"], c["WR"]
    per = 2 if spec.dtype != "fp32" else 1                        # elements per loaded value
    if ragged:                                                    # 2-D: [N, cols] against [M, cols]
        n = wr // per
        pn = _pow2_at_least(n)
        cm = f" & (cols < {n})[None, :]" if pn != n else ""
        out = [f"cols = tl.arange(0, {pn})",
               f"wq = tl.load(dve + rl[:, None] * {n} + cols[None, :],"
               f" mask=n_ok[:, None]{cm}, other=0)",
               f"xq = tl.load(x_ptr + rm64[:, None] * {c['K'] // per} + {(c['NK'] - 1) * tk // per} + cols[None, :],"
               f" mask=m_ok[:, None]{cm}, other=0)"]
        if per == 2:
            return out + ["acc_r += tl.sum(_lo(wq)[None, :, :] * _lo(xq)[:, None, :] + _hi(wq)[None, :, :]"
                          " * _hi(xq)[:, None, :], axis=2)"]
        return out + ["acc_r += tl.sum(wq[None, :, :] * xq[:, None, :], axis=2)"]
    W, G, _ = _words(tk)
    out = [f"wq = tl.load(dv + {_ix('tj', 'T', 'TNWGP')} * (nrows * {tk // per}) + {_ix('rl', 'N', 'TNWGP')} * {tk // per}"
           f" + {_ix('g_offs', 'WGP', 'TNWGP')},",
           f"             mask={_and(_ix('t_ok', 'T', 'TNWGP'), _ix('n_ok', 'N', 'TNWGP'))}, other=0)",
           f"xq = tl.load(x_ptr + {_ix('rm64', 'M', 'TMWGP')} * {c['K'] // per} + {_ix('kt', 'T', 'TMWGP')} * {tk // per}"
           f" + {_ix('g_offs', 'WGP', 'TMWGP')},",
           f"             mask={_and(_ix('t_ok', 'T', 'TMWGP'), _ix('m_ok', 'M', 'TMWGP'))}, other=0)"]
    if per == 2:
        out += ["w01, w23 = tl.split(wq)", "x01, x23 = tl.split(xq)"]
        pairs = [("w01", "x01"), ("w23", "x23")]
        for wv, xv in pairs:
            for f in ("_lo", "_hi"):
                out.append(f"acc += {_ix(f'{f}({wv})', 'TNWG', 'TMNWG')} * {_ix(f'{f}({xv})', 'TMWG', 'TMNWG')}")
        return out
    out += [f"wa, wb = tl.split(tl.reshape(wq, ({c['BT']}, {c['BN']}, {W}, {G}, 2, 2)))",
            f"xa, xb = tl.split(tl.reshape(xq, ({c['BT']}, {c['BM']}, {W}, {G}, 2, 2)))",
            "w0, w2 = tl.split(wa)", "w1, w3 = tl.split(wb)", "x0, x2 = tl.split(xa)", "x1, x3 = tl.split(xb)"]
    for i in range(4):
        out.append(f"acc += {_ix(f'w{i}', 'TNWG', 'TMNWG')} * {_ix(f'x{i}', 'TMWG', 'TMNWG')}")
    return out


def gemv(spec, c) -> list:
    W, G, _ = _words(c["TK"])
    per = 2 if spec.dtype != "fp32" else 1
    q = 2 if per == 2 else 4                                      # loaded values per group
    out = [f"sv = sparse_vals_ptr + s_vals * {c['UNIT'] // per}  # this row's regions (16 bit: in value pairs)",
           f"sm = sparse_meta_ptr + s_meta * {c['UNIT_I32']}",
           f"dv = dense_vals_ptr + d_vals * {c['UNIT'] // per}",
           *(_edge_bases(c, c['UNIT'] // per, c['UNIT'] // per) if c["WR"] != c["TK"] else []),
           f"acc = tl.zeros(({c['BT']}, {c['BM']}, {c['BN']}, {W}, {G}), dtype=tl.float32)",
           f"acc_r = tl.zeros(({c['BM']}, {c['BN']}), dtype=tl.float32)",
           f"g_offs = (tl.arange(0, {W})[:, None] * {G} + tl.arange(0, {G})[None, :])[:, :, None] * {q}"
           f" + tl.arange(0, {q})[None, None, :]  # a group's values in a tile row [W, G, P]",
           "# ---- 2:4 tiles: straight from the compressed form (pick x[i0], x[i1]; two FMAs per group) ----"]
    out += _step(c, "s_lo", "s_hi", "")
    out += ["    " + ln for ln in _gemv_sparse(spec, c, False)]
    out += ["# ---- dense tiles ----"] + _step(c, "d_lo", "d_hi", "n_s + ")
    out += ["    " + ln for ln in _gemv_dense(spec, c, False)]
    if c["WR"] != c["TK"]:
        out += ["# ---- the ragged tile-column (masked, once) ----"]
        if c["WR"] % 4 == 0:
            out += ["if edge_s:"] + ["    " + ln for ln in _gemv_sparse(spec, c, True)]
        out += ["if edge_d:"] + ["    " + ln for ln in _gemv_dense(spec, c, True)]
    return out + ["out = tl.sum(tl.sum(tl.sum(acc, axis=4), axis=3), axis=0) + acc_r"]


# ---- mma -------------------------------------------------------------------------------------------
def _dot(spec, acc: str, batched: bool) -> str:
    w = "tl.trans(w, 0, 2, 1)" if batched else "tl.trans(w)"
    if spec.upcast:   # the interpreter has no bf16 dot: upcast both operands (exact products)
        return f"{acc} = tl.dot(xb.to(tl.float32), {w}.to(tl.float32), acc={acc}, input_precision=\"ieee\")"
    if spec.dtype == "fp32":
        return f"{acc} = tl.dot(xb, {w}, acc={acc}, input_precision=\"{spec.input_precision}\")"
    return f"{acc} = tl.dot(xb, {w}, acc={acc})"


def _mma_sparse(spec, c, kk: int, ragged: bool) -> list:
    """One BLOCK_K step (columns kk.. of the tile) of 2:4 tiles: expand in registers, dot
    (batched over the T tiles of a step when BLOCK_T > 1)."""
    tk, wr = c["TK"], c["WR"]
    width = wr if ragged else c["BK"]
    W, G, ng = _words(width, 16)
    bk = 4 * W * G
    wpr, gpr = -(-(wr if ragged else tk) // 32), (wr if ragged else tk) // 4
    batched = not ragged and c["BT"] > 1
    b = "T" if batched else ""
    tile = None if ragged else "tj" if batched else "j"
    sm, sv = ("sme", "sve") if ragged else ("sm", "sv")          # the ragged tile has its own region
    kt = str(c["NK"] - 1) if ragged else "kt"
    lead = f"{c['BT']}, " if batched else ""
    gm = f"(grp < {ng})" if W * G != ng else ""
    cm = f"(tl.arange(0, {bk}) < {width})" if bk != width else ""
    t_ok = (lambda axes: _ix("t_ok", "T", axes)) if batched else (lambda axes: "")
    out = [f"xb = tl.load(x_ptr + {_ix('rm64', 'M', b + 'MK')} * {c['K']} + {_ix(kt, b, b + 'MK')} * {tk} + {kk}"
           f" + {_ix(f'tl.arange(0, {bk})', 'K', b + 'MK')},",
           f"             mask={_and(t_ok(b + 'MK'), _ix('m_ok', 'M', b + 'MK'), _ix(cm, 'K', b + 'MK') if cm else '')},"
           " other=0.0)"] + _meta(spec, c, b, tile, sm, wpr, kk // 32, W, G, batched, "expand")
    if spec.dtype != "fp32":
        out += [f"vp = tl.load({sv}{_tile(tile, b, b + 'NWG', tk // 4)} + {_ix('rl', 'N', b + 'NWG')} * {gpr}"
                f" + {kk // 4} + {_ix('grp', 'WG', b + 'NWG')},",
                f"             mask={_and(t_ok(b + 'NWG'), _ix('n_ok', 'N', b + 'NWG'), _ix(gm, 'WG', b + 'NWG') if gm else '')},"
                " other=0)",
                "lo = _prmt(vp, sel_lo, 0)  # dense positions 0, 1",
                "hi = _prmt(vp, sel_hi, 0)  # dense positions 2, 3",
                f"w = _opaque(tl.reshape(_dense_tile(lo, hi), ({lead}{c['BN']}, {bk})))"]
    else:
        out += [f"v = tl.load({sv}{_tile(tile, b, b + 'NWGP', tk // 2)} + {_ix('rl', 'N', b + 'NWGP')}"
                f" * {2 * gpr} + {kk // 2} + {_ix('grp', 'WG', b + 'NWGP')} * 2 + {_ix('tl.arange(0, 2)', 'P', b + 'NWGP')},",
                f"            mask={_and(t_ok(b + 'NWGP'), _ix('n_ok', 'N', b + 'NWGP'), _ix(gm, 'WG', b + 'NWGP') if gm else '')},"
                " other=0.0)",
                "v0, v1 = tl.split(v)",
                "a = _i0(t & 15)",
                "b = _i1(t & 15)",
                "e0 = tl.where(a == 0, v0, 0.0)",
                "e1 = tl.where(a == 1, v0, tl.where(b == 1, v1, 0.0))",
                "e2 = tl.where(a == 2, v0, tl.where(b == 2, v1, 0.0))",
                "e3 = tl.where(b == 3, v1, 0.0)",
                f"w = tl.reshape(tl.join(tl.join(e0, e2), tl.join(e1, e3)), ({lead}{c['BN']}, {bk}))"]
    return out + [_dot(spec, "acc_r" if ragged else "acc", batched)]


def _mma_dense(spec, c, kk: int, ragged: bool) -> list:
    tk, wr = c["TK"], c["WR"]
    width = wr if ragged else c["BK"]
    bk = _pow2_at_least(width, 16)
    batched = not ragged and c["BT"] > 1
    b = "T" if batched else ""
    tile = None if ragged else "tj" if batched else "j"
    kt = str(c["NK"] - 1) if ragged else "kt"
    cm = f"(tl.arange(0, {bk}) < {width})" if bk != width else ""
    t_ok = (lambda axes: _ix("t_ok", "T", axes)) if batched else (lambda axes: "")
    return [f"xb = tl.load(x_ptr + {_ix('rm64', 'M', b + 'MK')} * {c['K']} + {_ix(kt, b, b + 'MK')} * {tk} + {kk}"
            f" + {_ix(f'tl.arange(0, {bk})', 'K', b + 'MK')},",
            f"             mask={_and(t_ok(b + 'MK'), _ix('m_ok', 'M', b + 'MK'), _ix(cm, 'K', b + 'MK') if cm else '')},"
            " other=0.0)",
            f"w = tl.load({'dve' if ragged else 'dv'}{_tile(tile, b, b + 'NK', tk)} + {_ix('rl', 'N', b + 'NK')} * {width if ragged else tk}"
            f" + {kk} + {_ix(f'tl.arange(0, {bk})', 'K', b + 'NK')},",
            f"            mask={_and(t_ok(b + 'NK'), _ix('n_ok', 'N', b + 'NK'), _ix(cm, 'K', b + 'NK') if cm else '')},"
            " other=0.0)",
            _dot(spec, "acc_r" if ragged else "acc", batched)]


def mma(spec, c) -> list:
    pairs = spec.dtype != "fp32"
    out = [f"sv = sparse_vals_ptr + s_vals * {c['UNIT'] // 2 if pairs else c['UNIT']}  # this row's regions",
           f"sm = sparse_meta_ptr + s_meta * {c['UNIT_I32']}",
           f"dv = dense_vals_ptr + d_vals * {c['UNIT']}",
           *(_edge_bases(c, c['UNIT'] // 2 if pairs else c['UNIT'], c['UNIT']) if c["WR"] != c["TK"] else []),
           f"acc = tl.zeros(({str(c['BT']) + ', ' if c['BT'] > 1 else ''}{c['BM']}, {c['BN']}), dtype=tl.float32)",
           f"acc_r = tl.zeros(({c['BM']}, {c['BN']}), dtype=tl.float32)",
           "# ---- 2:4 tiles: expanded in registers (two byte permutes per group), tensor cores ----"]
    step = _step if c["BT"] > 1 else _step1
    out += step(c, "s_lo", "s_hi", "")
    for kk in range(0, c["TK"], c["BK"]):
        out += ["    " + ln for ln in _mma_sparse(spec, c, kk, False)]
    out += ["# ---- dense tiles ----"] + step(c, "d_lo", "d_hi", "n_s + ")
    for kk in range(0, c["TK"], c["BK"]):
        out += ["    " + ln for ln in _mma_dense(spec, c, kk, False)]
    if c["WR"] != c["TK"]:
        out += ["# ---- the ragged tile-column (masked, once) ----"]
        if c["WR"] % 4 == 0:
            out += ["if edge_s:"] + ["    " + ln for ln in _mma_sparse(spec, c, 0, True)]
        out += ["if edge_d:"] + ["    " + ln for ln in _mma_dense(spec, c, 0, True)]
    return out + ["out = " + ("tl.sum(acc, axis=0)" if c["BT"] > 1 else "acc") + " + acc_r"]


def epilogue(spec, c) -> list:
    out = ["# ---- epilogue: bias, cast and store at the original rows (fused, no pass over Y) ----",
           f"rn_out = orig * {c['TN']} + rl",
           f"y_offs = rm64[:, None] * {c['N']} + rn_out[None, :]",
           "y_mask = m_ok[:, None] & n_ok[None, :]"]
    if spec.bias:
        cond = "n_ok & (pid_s == 0)" if c["SK"] > 1 else "n_ok"
        out += [f"out = out + tl.load(b_ptr + rn_out, mask={cond}, other=0.0).to(tl.float32)[None, :]"]
    if c["SK"] > 1:
        out.append("tl.atomic_add(y_ptr + y_offs, out, mask=y_mask)  # fp32 workspace, zeroed by the launcher")
    else:
        out.append("tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=y_mask)")
    return out
