"""The analytic cost model (codegen/cost.py) and the device table (codegen/devices.py): CPU only."""
import itertools
import json
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchc.codegen import devices
from patchc.codegen.cost import CostModel, KernelParams, lower_envelope
from patchc.codegen.devices import get_device, load_device, save_calibration
from patchc.codegen.layout import choose_layout
from patchc.packing import balanced_row_order

SLOW_OK = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BOUND = lambda f: 1 / (1 - 0.4375 * f)          # noqa: E731  bandwidth bound of a weight with f 2:4 tiles


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("PATCHC_DEVICE", raising=False)
    monkeypatch.setenv("PATCHC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def tile_map(kind, tile=(128, 128)):
    """A TileMask-like tile map (no mask needed by the model)."""
    kind = torch.as_tensor(kind, dtype=torch.uint8)
    return types.SimpleNamespace(tile=tile, tile_kind=kind, shape=(kind.shape[0] * tile[0], kind.shape[1] * tile[1]))


# ---- devices -----------------------------------------------------------------------------------
def test_device_table():
    for name in ("h200", "h100", "a100", "a6000", "rtx4090", "l40s"):
        d = load_device(name)
        assert d.mem_bw_gbs > 500 and d.sm_count > 80 and d.tflops_bf16 > 100 and d.l2_mb > 0
    h200 = load_device("h200")
    assert (h200.mem_bw_gbs, h200.sm_count, round(h200.tflops_bf16)) == (4800, 132, 989)
    assert load_device("a100").mem_bw_gbs == 2039 and load_device("H100").mem_bw_gbs == 3350
    assert load_device("RTX 4090").name == "rtx4090"


def test_device_selection_default_env_option(monkeypatch):
    assert get_device().name == "h200"                         # no GPU, no env: h200
    assert get_device(torch.device("cpu")).name == "h200"
    monkeypatch.setenv("PATCHC_DEVICE", "a100")
    assert get_device().name == "a100"                         # env var
    assert get_device("l40s").name == "l40s"                   # the option wins over the env var
    monkeypatch.setenv("PATCHC_DEVICE", "tpu9")
    with pytest.raises(ValueError, match="h200.*"):
        get_device()


def test_unknown_device_lists_known_names():
    with pytest.raises(ValueError) as e:
        load_device("b300x")
    for name in ("a100", "a6000", "h100", "h200", "l40s", "rtx4090"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="known devices"):
        choose_layout(tile_map(torch.ones(2, 2)), 1, "bf16", device="v100-ish")


def test_current_cuda_device_is_planned_for(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                                  L2_cache_size=50 * 2**20)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setenv("PATCHC_DEVICE", "a100")
    assert get_device().name == "h100" and get_device("cuda").name == "h100"
    assert get_device("a6000").name == "a6000"


def test_calibration_overrides_datasheet(tmp_path):
    base = load_device("h200")
    path = save_calibration("H200", {"bw_eff": 0.8, "launch_us": 3})
    assert path.parent == tmp_path / "cache" and json.loads(path.read_text())["h200"]["bw_eff"] == 0.8
    cal = load_device("h200")
    assert (cal.bw_eff, cal.launch_us, cal.mem_bw_gbs) == (0.8, 3.0, base.mem_bw_gbs)
    assert load_device("h100").bw_eff == devices.DEVICES["h100"].bw_eff
    save_calibration("h200", {"expand_ops": 2})
    assert load_device("h200").bw_eff == 0.8 and load_device("h200").expand_ops == 2
    with pytest.raises(ValueError, match="unknown calibration fields"):
        save_calibration("h200", {"warp_drive": 1})


def test_calibration_file_follows_the_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("PATCHC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert devices.calibration_path() == tmp_path / "patchc" / "calibration.json"
    # the cache_dir option moves the calibration file with the kernels and plans
    opt = tmp_path / "opt"
    save_calibration("h200", {"bw_eff": 0.5}, cache_dir=opt)
    assert (opt / "calibration.json").is_file() and not devices.calibration_path().exists()
    assert load_device("h200", cache_dir=opt).bw_eff == 0.5
    assert load_device("h200").bw_eff == devices.DEVICES["h200"].bw_eff
    assert get_device(None, cache_dir=opt).bw_eff == 0.5


def test_fp32_uses_tf32_unless_highest():
    d, old = load_device("h200"), torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert d.tflops("fp32") == d.tflops_tf32
        torch.set_float32_matmul_precision("highest")
        assert d.tflops(torch.float32) == d.tflops_fp32
    finally:
        torch.set_float32_matmul_precision(old)
    assert d.tflops(torch.bfloat16) == d.tflops_bf16


# ---- the model's sanity --------------------------------------------------------------------------
def test_decode_speedup_all_24_within_bandwidth_bound():
    tm = tile_map(torch.ones(32, 32))
    lay = choose_layout(tm, 1, torch.bfloat16, "h200")
    assert lay.strategy == "hybrid"
    assert 1.3 < lay.dense_us / lay.predicted_us < BOUND(1.0) < 1.78 + 1e-3
    assert lay.breakdown["weight_bytes"] < 0.57 * 4096 * 4096 * 2       # 56.25 % of the dense bytes


@pytest.mark.parametrize("f", [0.25, 0.5, 0.75])
def test_decode_speedup_under_bound_for_mixed_maps(f):
    g = torch.Generator().manual_seed(0)
    kind = (torch.rand(32, 32, generator=g) < f).to(torch.uint8)
    lay = choose_layout(tile_map(kind), 1, "bf16", "h200")
    assert lay.dense_us / lay.predicted_us <= BOUND(float(kind.float().mean()))


DECODE = [KernelParams(16, bn, bk, s, w, stg) for bn, bk, s, w, stg in
          itertools.product((32, 64), (64, 128), (1, 2, 4, 8), (4, 8), (3, 5))]


def _best_decode(kind, m, dtype):
    model = CostModel(kind, (128, 128), (kind.shape[0] * 128, kind.shape[1] * 128), dtype, "h200",
                      balanced_row_order(kind))
    return min(model.predict_us(m, p) for p in DECODE if p.split_k <= kind.shape[1])


@SLOW_OK
@given(st.integers(32, 64), st.integers(16, 32), st.floats(0, 1), st.integers(0, 2**31),
       st.sampled_from(["bf16", "fp16"]))
def test_more_24_tiles_never_slower_at_small_m(n_n, n_k, f, seed, dtype):
    """Memory-bound decode (weights from 4096 x 2048 up, i.e. >= 16 MB, what LLM linears are): a
    2:4 tile only saves bytes.  (Deliberately not claimed for tiny weights: a program alone on an
    SM streams ~64 B/clk and can be ALU-bound by the expansion, and the model says so.)"""
    g = torch.Generator().manual_seed(seed)
    kind = (torch.rand(n_n, n_k, generator=g) < f).to(torch.uint8)
    dense_at = (kind == 0).nonzero()
    if not len(dense_at):
        return
    more = kind.clone()
    i, j = dense_at[int(torch.randint(len(dense_at), (1,), generator=g))].tolist()
    more[i, j] = 1
    for m in (1, 8, 16):
        assert _best_decode(more, m, dtype) <= _best_decode(kind, m, dtype) * (1 + 1e-12)


def test_planner_prediction_falls_as_tiles_turn_24():
    g = torch.Generator().manual_seed(7)
    rank = torch.rand(32, 32, generator=g)
    for m in (1, 16):
        times = [choose_layout(tile_map((rank < f).to(torch.uint8)), m, "bf16", "h200").predicted_us
                 for f in (0.0, 0.25, 0.5, 0.75, 1.01)]
        assert all(b < a for a, b in zip(times, times[1:])), times


@settings(max_examples=6, deadline=None)
@given(st.integers(8, 32), st.integers(8, 32), st.floats(0, 1), st.integers(0, 2**31), st.sampled_from([4096, 16384]))
def test_large_m_flop_bound_never_hybrid(n_n, n_k, f, seed, m):
    g = torch.Generator().manual_seed(seed)
    kind = (torch.rand(n_n, n_k, generator=g) < f).to(torch.uint8)
    lay = choose_layout(tile_map(kind), m, "bf16", "h200")
    assert lay.strategy == "dense"
    assert all(t >= lay.dense_us for p, t in lay.alternatives if p.get("strategy") != "dense")


def test_costs_have_the_expected_shape():
    model = CostModel(torch.ones(32, 32, dtype=torch.uint8), (128, 128), (4096, 4096), "bf16", "h200")
    p = KernelParams(16, 64, 128, 1, 4, 4)
    c = model.curve(p)
    # flat in M while the programs fit in one wave; a second wave costs a whole program time
    ms = np.arange(1, 4097)
    assert (np.diff(c(ms)) >= 0).all() and c(16)[0] - c(1)[0] < 0.1
    one_wave = 16 * (c.C // 64)
    assert c(one_wave + 1)[0] > c(one_wave)[0] + 1
    b = c.breakdown(1)
    assert b["programs"] == 64 and b["waves"] == 1 and b["total_us"] == pytest.approx(
        b["fixed_us"] + max(b["dram_us"], b["l2_us"], b["crit_us"]))
    # waves: programs over SMs x occupancy, and a partial last wave costs a full one
    assert c.breakdown(16 * 1024)["waves"] == -(-1024 * 64 // (132 * c.occ))
    # a split-K config pays the workspace; the dense twin moves more weight bytes
    assert model.curve(KernelParams(16, 64, 128, 4, 4, 4)).const > c.const
    assert model.curve(p, hybrid=False).w_bytes > 1.7 * c.w_bytes
    assert model.predict_us(1, KernelParams(256, 128, 128, 1, 4, 6)) == float("inf")   # does not fit


def test_split_k_fills_the_gpu_at_decode():
    # 1024 x 16384: 8 tile-rows -> too few programs for 132 SMs without splitting K
    lay = choose_layout(tile_map(torch.ones(8, 128)), 1, "bf16", "h200")
    assert lay.strategy == "hybrid" and lay.split_k > 1


def test_balanced_row_order_helps_imbalanced_maps():
    kind = torch.zeros(64, 32, dtype=torch.uint8)
    kind[::2] = 1                                           # alternate all-2:4 and all-dense tile-rows
    shape = (64 * 128, 32 * 128)
    ident = CostModel(kind, (128, 128), shape, "bf16", "h200")
    bal = CostModel(kind, (128, 128), shape, "bf16", "h200", balanced_row_order(kind))
    crit = [(ident.curve(p).crit_us([1])[0], bal.curve(p).crit_us([1])[0])
            for p in (KernelParams(16, 32, 128, 1, 4, 3), KernelParams(64, 16, 128, 1, 4, 6))]   # 1 and 4 waves
    assert all(b <= a for a, b in crit) and any(b < a for a, b in crit)


def test_lower_envelope_matches_brute_force():
    model = CostModel(torch.ones(16, 16, dtype=torch.uint8), (128, 128), (2048, 2048), "bf16", "h200")
    curves = [model.curve(KernelParams(bm, 64, 128, s, 4, 4), hyb) for bm, s, hyb in
              [(16, 1, True), (64, 1, True), (16, 2, False), (128, 1, False), (32, 4, True)]]
    m_max = 3000
    ranges = lower_envelope(curves, m_max)
    ms = np.arange(1, m_max + 1)
    brute = np.argmin(np.stack([c(ms) for c in curves]), axis=0)
    got = np.concatenate([np.full(hi - lo + 1, i) for lo, hi, i in ranges])
    assert ranges[0][0] == 1 and ranges[-1][1] == m_max and (got == brute).all()


# ---- the generated kernel's resources (fitted to ptxas on sm_90) -----------------------------------
# measured on sm_90 (AOT compile of the rendered kernels, ptxas -v; Triton 3.7.1): configs the planner
# once picked that spill, other spilling ones, and neighbours that fit
SPILLS_SM90 = [("bf16", 32, 128, 128, 4, 3), ("bf16", 16, 128, 128, 8, 3), ("fp16", 32, 128, 128, 4, 3),
               ("bf16", 64, 128, 128, 4, 2), ("bf16", 128, 64, 64, 4, 3), ("fp32", 16, 64, 64, 4, 3),
               ("fp32", 32, 64, 64, 8, 2), ("fp32", 64, 64, 64, 8, 3)]
FITS_SM90 = [("bf16", 16, 128, 128, 4, 3), ("bf16", 16, 128, 128, 8, 2), ("bf16", 32, 128, 128, 8, 3),
             ("bf16", 64, 128, 64, 4, 3), ("bf16", 16, 64, 128, 4, 6), ("fp32", 16, 32, 32, 4, 3),
             ("fp32", 16, 64, 32, 4, 2), ("fp32", 16, 64, 64, 8, 3), ("fp32", 64, 64, 32, 8, 3)]


@pytest.fixture
def ieee():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def test_spilling_configs_are_infeasible(ieee):
    from patchc.codegen.cost import ELT_BYTES, hybrid_spills, occupancy
    h200 = load_device("h200")
    for dt, bm, bn, bk, w, st in SPILLS_SM90:
        p = KernelParams(bm, bn, bk, 1, w, st)
        assert hybrid_spills(p, ELT_BYTES[dt]) and occupancy(h200, p, ELT_BYTES[dt], True) == 0, (dt, p)
    for dt, bm, bn, bk, w, st in FITS_SM90:
        p = KernelParams(bm, bn, bk, 1, w, st)
        assert not hybrid_spills(p, ELT_BYTES[dt]) and occupancy(h200, p, ELT_BYTES[dt], True) > 0, (dt, p)
    # fp32 "ieee" at 4 warps: every BN x BK >= 64 x 64 spills
    assert all(hybrid_spills(KernelParams(bm, bn, bk, 1, 4, 3), 4)
               for bm in (16, 32, 64, 128) for bn in (64, 128) for bk in (64, 128))


def test_shared_memory_matches_triton():
    from patchc.codegen.cost import hybrid_smem_bytes
    # Triton's metadata.shared of the rendered kernels (sm_90): 16-bit pipelines the two gathered
    # 2:4 value blocks per stage; fp32 is not pipelined through shared memory
    assert hybrid_smem_bytes(KernelParams(32, 128, 128, 1, 4, 3), 2) == 172032
    assert hybrid_smem_bytes(KernelParams(16, 128, 128, 1, 8, 3), 2) == 167936
    assert hybrid_smem_bytes(KernelParams(16, 64, 64, 1, 4, 5), 2) == 75776
    assert hybrid_smem_bytes(KernelParams(64, 64, 64, 1, 8, 2), 4) == 81920
    assert occupancy_of(KernelParams(16, 128, 128, 1, 4, 4), "bf16") == 0      # 233472 B > 227 KiB


def occupancy_of(p, dt):
    from patchc.codegen.cost import ELT_BYTES, occupancy
    return occupancy(load_device("h200"), p, ELT_BYTES[dt], True)


@pytest.mark.parametrize("f", [0.5, 0.9, 1.0])
def test_plans_never_choose_a_spilling_config(f):
    """11008 x 4096 (gate/up of LLaMA-7B), where the model used to pick 32x128x128 at 4 warps
    (f = 0.5) and 16x128x128 at 8 warps 3 stages (f = 0.9, 1.0)."""
    from patchc.codegen.cost import hybrid_spills
    from patchc.codegen.layout import plan_dispatch
    g = torch.Generator().manual_seed(int(f * 10))
    kind = (torch.rand(86, 32, generator=g) < f).to(torch.uint8)
    plan = plan_dispatch(tile_map(kind), "bf16", "h200")
    hyb = [c for c in plan.candidates if c != "dense"]
    assert hyb, plan.reason
    for c in hyb:
        p = KernelParams(c.block_m, plan.block_n, plan.block_k, c.split_k, c.num_warps, c.num_stages)
        assert not hybrid_spills(p, 2), p
        assert (p.block_m, p.block_n, p.block_k, p.num_warps) != (32, 128, 128, 4)
        assert (p.block_m, p.block_n, p.block_k, p.num_warps, p.num_stages) != (16, 128, 128, 8, 3)


# ---- calibration (patchc.calibrate): the fit and the rank check, on synthetic measurements ----
def test_spearman_without_scipy():
    from patchc.calibrate import ranks, spearman
    assert ranks([3, 1, 2, 2]).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    x, y = [1, 2, 2, 5, 7, 3], [2, 1, 4, 4, 9, 3]
    rx, ry = ranks(x), ranks(y)                       # Pearson of the ranks, by hand
    want = np.corrcoef(rx, ry)[0, 1]
    assert spearman(x, y) == pytest.approx(want)


def _synthetic_points():
    from patchc.calibrate import TILE
    pts = []
    for (n, k), f in (((1024, 2048), 0.5), ((2048, 1024), 1.0)):
        g = torch.Generator().manual_seed(n)
        kind = (torch.rand(n // TILE[0], k // TILE[1], generator=g) < f).to(torch.uint8)
        for m in (1, 16, 512):
            pts.append(dict(kind="dense", n=n, k=k, m=m, dtype="bf16", frac=f, tile_kind=None, params=None))
            pts.append(dict(kind="hybrid", n=n, k=k, m=m, dtype="bf16", frac=f, tile_kind=kind.tolist(),
                            params=[16 if m < 64 else 64, 64, 128, 2 if m < 64 else 1, 4, 3]))
    return pts


def test_calibration_fit_reduces_the_error_and_is_stored():
    import dataclasses
    from patchc.calibrate import fit, predict, run
    truth = dataclasses.replace(load_device("h200"), bw_eff=0.7, launch_us=4.5, mma_eff=0.55)
    pts = _synthetic_points()
    for p, us in zip(pts, predict(pts, truth)):
        p["us"] = float(us)
    spec, values, before, after = fit(pts, load_device("h200"), budget_s=30, sweeps=1)
    assert before > 0.01 and after < 0.25 * before
    assert abs(values["launch_us"] - 4.5) < abs(2.0 - 4.5)          # moved towards the truth
    res = run(budget_s=30, save=True, points=pts)                   # the same, stored for h200
    assert res["saved"] and res["loss_after"] < res["loss_before"] and res["points"] == len(pts)
    assert load_device("h200").launch_us == pytest.approx(res["values"]["launch_us"])
    assert res["spearman_after"] >= res["spearman_before"] - 1e-9


def test_calibrate_command_without_gpu_says_so(capsys):
    from patchc.calibrate import main
    assert main(["--budget", "5"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
