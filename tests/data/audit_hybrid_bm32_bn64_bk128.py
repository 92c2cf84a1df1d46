# The first generated hybrid kernel, archived as generated (tests/test_sass.py reproduces the SASS
# counts of an audit of it: 524 warp-instructions per 2:4 iteration on sm_90 with triton 3.6).
# kernel: hybrid_n4096_k4096_bf16_bm32_bn64_bk128
# spec: {"activation": null, "bias": false, "block_k": 128, "block_m": 32, "block_n": 64, "dtype": "bf16", "input_precision": "", "interpret": false, "k": 4096, "n": 4096, "num_stages": 4, "num_warps": 8, "split_k": 1, "strategy": "hybrid", "tile": [128, 128]}
# computes Y[M, 4096] = X[M, 4096] . W^T from a PackedWeight with 128x128 tiles;
# per packed tile-row: its 2:4 tiles (compressed values + 2-bit indices, expanded in registers),
# then its dense tiles; fp32 accumulation; the store puts each row back at row_order[i].
import triton
import triton.language as tl

KERNEL_NAME = 'hybrid_n4096_k4096_bf16_bm32_bn64_bk128'
SIGNATURE = {'x_ptr': '*bf16', 'y_ptr': '*bf16', 'row_order_ptr': '*i32', 'sparse_off_ptr': '*i32', 'dense_off_ptr': '*i32', 'sparse_kidx_ptr': '*i32', 'dense_kidx_ptr': '*i32', 'sparse_vals_ptr': '*bf16', 'sparse_meta_ptr': '*i32', 'dense_vals_ptr': '*bf16', 'M': 'i32', 'stride_xm': 'i32', 'stride_xk': 'i32', 'stride_ym': 'i32'}
NUM_WARPS = 8
NUM_STAGES = 4

# N       = 4096   output features (rows of W)
# K       = 4096   input features
# TN      = 128    mask tile rows
# TK      = 128    mask tile columns
# META_W  = 4      int32 metadata words per tile row: 8 groups of 4 per word
# SV_ROW  = 64     kept 2:4 values per tile row
# SV_TILE = 8192   kept 2:4 values per tile
# SM_TILE = 512    metadata words per tile
# DV_TILE = 16384  values per dense tile
# BLOCK_M = 32     rows of X per program
# BLOCK_N = 64     output columns per program, divides TN
# BLOCK_K = 128    K per tl.dot, divides TK
# N_SUB   = 2      BLOCK_N blocks per tile-row
# K_STEPS = 1      BLOCK_K steps per tile
# SPLIT_K = 1      programs sharing one tile-row's tile list


@triton.jit
def hybrid_n4096_k4096_bf16_bm32_bn64_bk128(
    x_ptr,
    y_ptr,
    row_order_ptr,
    sparse_off_ptr,
    dense_off_ptr,
    sparse_kidx_ptr,
    dense_kidx_ptr,
    sparse_vals_ptr,
    sparse_meta_ptr,
    dense_vals_ptr,
    M,
    stride_xm,
    stride_xk,
    stride_ym,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    row = pid_n // 2  # packed tile-row
    rn = (pid_n % 2) * 64 + tl.arange(0, 64)  # rows inside the tile
    rm = pid_m * 32 + tl.arange(0, 32)
    rm64 = rm.to(tl.int64)
    m_ok = rm < M
    rk = tl.arange(0, 128)
    x_rows = x_ptr + rm64[:, None] * stride_xm
    s_lo = tl.load(sparse_off_ptr + row).to(tl.int64)
    s_hi = tl.load(sparse_off_ptr + row + 1).to(tl.int64)
    d_lo = tl.load(dense_off_ptr + row).to(tl.int64)
    d_hi = tl.load(dense_off_ptr + row + 1).to(tl.int64)  # int64: tile * tile size may pass 2**31
    acc = tl.zeros((32, 64), dtype=tl.float32)
    # ---- 2:4 tiles: column c of a tile is position c % 4 of group c // 4 ----
    pos = (rk % 4)[None, :]
    sv_rows = rn[:, None] * 64
    sm_rows = rn[:, None] * 4
    for t in range(s_lo, s_hi):  # sparse loop
        kk = 0
        kt = tl.load(sparse_kidx_ptr + t)  # K-tile index of this tile
        cols = kt * 128 + kk + rk
        xb = tl.load(x_rows + cols[None, :] * stride_xk, mask=m_ok[:, None] & (cols < 4096)[None, :], other=0.0)
        g = (kk + rk) // 4  # group inside the tile
        vals = sparse_vals_ptr + t * 8192 + sv_rows
        v0 = tl.load(vals + (2 * g)[None, :])  # duplicated addresses hit cache: DRAM bytes stay compressed
        v1 = tl.load(vals + (2 * g + 1)[None, :])
        word = tl.load(sparse_meta_ptr + t * 512 + sm_rows + (g // 8)[None, :])
        code = (word >> (4 * (g % 8))[None, :]) & 15  # i0 | i1 << 2
        w = tl.where((code & 3) == pos, v0, tl.where((code >> 2) == pos, v1, 0.0)).to(v0.dtype)
        acc = tl.dot(xb, tl.trans(w), acc=acc)
    # ---- dense tiles ----
    dv_rows = rn[:, None] * 128
    for t in range(d_lo, d_hi):  # dense loop
        kk = 0
        kt = tl.load(dense_kidx_ptr + t)  # K-tile index of this tile
        cols = kt * 128 + kk + rk
        xb = tl.load(x_rows + cols[None, :] * stride_xk, mask=m_ok[:, None] & (cols < 4096)[None, :], other=0.0)
        w = tl.load(dense_vals_ptr + t * 16384 + dv_rows + (kk + rk)[None, :])
        acc = tl.dot(xb, tl.trans(w), acc=acc)
    # ---- epilogue: bias, cast and store at the original rows (fused, no pass over Y) ----
    orig = tl.load(row_order_ptr + row)
    rn_out = orig * 128 + rn
    n_ok = rn_out < 4096
    y_offs = rm64[:, None] * stride_ym + rn_out[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
