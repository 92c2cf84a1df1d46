"""The cost model read from the compiled kernels (codegen/cost.py, counts.py) and the device table
(codegen/devices.py): CPU only; the tests that compile a kernel skip without the Triton tools."""
import json
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchc.codegen import counts, devices, sass
from patchc.codegen.candidates import GEMV, MMA, Candidate
from patchc.codegen.cost import HybridModel, Weight, dense_us, occupancy, predict_dense
from patchc.codegen.devices import get_device, load_device, save_calibration
from patchc.codegen.layout import candidates_for, choose_layout, plan_dispatch
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
        rates = d.pipe_rates()
        assert rates["issue"] == 2 * rates["int"] and rates["lsu"] <= rates["int"] and d.arch in (80, 86, 89, 90)
    assert "Programming Guide" in devices.PIPE_SOURCES
    assert load_device("a100").fp_per_clk == 2 and load_device("h200").fp_per_clk == 4
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
    save_calibration("h200", {"warp_ipc": 0.4})
    assert load_device("h200").bw_eff == 0.8 and load_device("h200").warp_ipc == 0.4
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
    assert lay.strategy == "hybrid" and lay.bound == pytest.approx(BOUND(1.0), rel=1e-3)
    assert 1.25 < lay.speedup < lay.bound


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 90), st.integers(4, 90), st.floats(0, 1), st.integers(0, 2**31),
       st.sampled_from(["bf16", "fp16"]), st.sampled_from([1, 2, 16, 64, 300]))
def test_no_prediction_beats_the_bandwidth_bound(n_n, n_k, f, seed, dtype, m):
    """Every candidate, every M: hybrid time >= its bytes over the same bandwidth + one more
    latency than dense, so the predicted speedup never exceeds dense bytes / packed bytes."""
    g = torch.Generator().manual_seed(seed)
    kind = (torch.rand(n_n, n_k, generator=g) < f).to(torch.uint8)
    tm = tile_map(kind)
    w = Weight(kind, tm.shape, tm.tile, dtype, balanced_row_order(kind))
    dev = load_device("h200")
    d = float(dense_us(tm.shape, dtype, [m], dev)[0])
    for c in candidates_for(tm.shape, dtype, tm.tile):
        lc = counts.get_counts(c.spec(*tm.shape, dtype, tm.tile), dev.arch)
        t = float(HybridModel(w, c, dev, lc)([m])[0])
        assert d / t <= w.bound() + 1e-9, (c, m)


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


def test_terms_and_launch_shape():
    """The prediction is launch + 2 latencies + its largest term; decode fills the SMs."""
    kind = torch.ones(32, 32, dtype=torch.uint8)
    tm = tile_map(kind)
    dev = load_device("h200")
    w = Weight(kind, tm.shape, tm.tile, "bf16")
    c = Candidate("gemv", 1, 16, 4, 4, 4)
    model = HybridModel(w, c, dev, counts.get_counts(c.spec(4096, 4096, "bf16", (128, 128)), 90))
    p = model.terms(1)
    terms = {k: v for k, v in p.terms.items() if k.endswith("_us") and k != "fixed_us"}
    assert p.us == pytest.approx(p.terms["fixed_us"] + max(terms.values()))
    assert p.terms["fixed_us"] == pytest.approx(dev.launch_us + 2 * dev.mem_latency_ns * 1e-3)
    assert p.terms["programs"] == 32 * 8 >= dev.sm_count and p.terms["counts"] == "shipped"
    ms = np.array([1, 2, 5, 64, 4096])
    assert (np.diff(model(ms)) >= 0).all()                         # more rows never cheaper
    assert model([1])[0] == pytest.approx(p.us)
    assert predict_dense((4096, 4096), "bf16", 1, dev).terms["bound_by"] == "dram"
    assert predict_dense((4096, 4096), "bf16", 8192, dev).terms["bound_by"] == "tensor"


def test_what_does_not_fit_is_never_chosen():
    dev = load_device("a100")                                     # 163 KB of shared memory per program
    lc = counts.LoopCounts(s={"instructions": 100, "pipes": {}}, d={"instructions": 100, "pipes": {}}, other=0,
                           registers=128, shared_bytes=200_000, spills=0, depth=2)
    assert occupancy(dev, lc, 4) == 0
    assert occupancy(dev, counts.LoopCounts(**{**lc.to_dict(), "shared_bytes": 40_000, "spills": 8}), 4) == 0
    assert occupancy(dev, counts.LoopCounts(**{**lc.to_dict(), "shared_bytes": 40_000}), 4) == 4
    tm = tile_map(torch.ones(32, 32))
    for name in ("a100", "h200"):
        plan = plan_dispatch(tm, "bf16", name)
        for c in plan.candidates:
            if c != "dense":
                lc = counts.get_counts(c.spec(4096, 4096, "bf16", (128, 128)), load_device(name).arch)
                assert occupancy(load_device(name), lc, c.num_warps) > 0


def test_balanced_row_order_helps_imbalanced_maps():
    kind = torch.zeros(64, 32, dtype=torch.uint8)
    kind[::2] = 1                                           # alternate all-2:4 and all-dense tile-rows
    shape, dev = (64 * 128, 32 * 128), load_device("h200")
    c = Candidate("gemv", 1, 32, 2, 4, 4)
    lc = counts.get_counts(c.spec(*shape, "bf16", (128, 128)), 90)
    ident = HybridModel(Weight(kind, shape, (128, 128), "bf16"), c, dev, lc)
    bal = HybridModel(Weight(kind, shape, (128, 128), "bf16", balanced_row_order(kind)), c, dev, lc)
    assert bal([1])[0] <= ident([1])[0]


# ---- SASS counts: shipped, estimated, re-derived ------------------------------------------------------
def test_counts_are_shipped_for_the_planner_candidates():
    """bf16 / fp16, 128x128 tiles, sm_80 / sm_90, for the Triton versions patchc supports: the
    planner reads them without compiling anything."""
    table = counts.shipped()
    for version in ("3.6", "3.7"):
        for arch in (80, 90):
            for dtype in ("bf16", "fp16"):
                for c in GEMV + MMA:
                    k = counts.key(c.spec(256, 512, dtype, (128, 128)), arch, version)
                    assert k in table, k
                    v = table[k]
                    assert v["s"]["instructions"] > 0 and v["d"]["instructions"] > 0 and v["spills"] == 0


def test_unshipped_configs_are_estimated_not_compiled(monkeypatch):
    monkeypatch.setattr(counts, "compile_counts", lambda *a, **k: pytest.fail("compiled while planning"))
    monkeypatch.delenv(counts.ENV, raising=False)
    for spec in (Candidate("gemv", 1, 16, 4, 4, 4).spec(640, 640, "bf16", (64, 64)),
                 Candidate("mma", 16, 32, 2, 4, 3).spec(512, 512, "fp32", (128, 128)),
                 Candidate("mma", 16, 16, 4, 4, 3).spec(4096, 4096, "bf16", (128, 128))):
        lc = counts.get_counts(spec, 89)                          # sm_89 (Ada): nothing shipped
        assert lc.source == "estimated" and lc.s["instructions"] > 0 and lc.registers > 0


@pytest.mark.skipif(sass.cuobjdump_path() is None, reason="cuobjdump is not in the Triton wheel")
@pytest.mark.parametrize("cand", [GEMV[0], MMA[1]])
def test_shipped_counts_are_re_derived_by_a_compile(cand, tmp_path):
    """A shipped entry equals a fresh AOT compile of its representative kernel (this Triton)."""
    spec = cand.spec(4096, 4096, "bf16", (128, 128))
    k = counts.key(spec, 90)
    if k not in counts.shipped():
        pytest.skip(f"no shipped counts for triton {counts.triton_minor()}")
    fresh = counts.compile_counts(spec, 90, tmp_path)
    shipped = {f: v for f, v in counts.shipped()[k].items() if f != "meta"}
    assert fresh.to_dict() | {"source": "compiled"} == shipped | {"source": "compiled"}


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
            c = GEMV[0] if m == 1 else MMA[1] if m < 64 else MMA[5]
            pts.append(dict(kind="dense", n=n, k=k, m=m, dtype="bf16", frac=f, tile_kind=None, candidate=None))
            pts.append(dict(kind="hybrid", n=n, k=k, m=m, dtype="bf16", frac=f, tile_kind=kind.tolist(),
                            candidate=c.to_dict()))
    return pts


def test_calibration_fit_reduces_the_error_and_is_stored():
    import dataclasses
    from patchc.calibrate import fit, predict, run
    truth = dataclasses.replace(load_device("h200"), bw_eff=0.7, launch_us=4.5, mma_eff=0.55, warp_ipc=0.35)
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


def test_calibration_predicts_each_point_with_its_tile():
    """A point naming its tile (bench/gpu_check.py's finer tiles) is predicted with that tile's
    weight and kernel, not 128 x 128's."""
    from patchc.calibrate import predict
    from patchc.codegen.cost import HybridModel, Weight
    from patchc.codegen.counts import get_counts
    from patchc.packing import balanced_row_order
    spec, (n, k) = load_device("h200"), (1024, 1024)
    kind = (torch.rand(n // 64, k // 64, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.uint8)
    pt = dict(kind="hybrid", n=n, k=k, m=1, dtype="bf16", frac=0.5, tile_kind=kind.tolist(), tile=[64, 64],
              candidate=GEMV[0].to_dict())
    w = Weight(kind, (n, k), (64, 64), "bf16", balanced_row_order(kind))
    want = float(HybridModel(w, GEMV[0], spec, get_counts(GEMV[0].spec(n, k, "bf16", (64, 64)), int(spec.arch)))([1])[0])
    assert predict([pt], spec)[0] == pytest.approx(want)
    kind128 = kind[::2, ::2].contiguous()              # the same point without a tile: 128 x 128
    pt128 = dict(pt, tile_kind=kind128.tolist())
    del pt128["tile"]
    w128 = Weight(kind128, (n, k), (128, 128), "bf16", balanced_row_order(kind128))
    want128 = float(HybridModel(w128, GEMV[0], spec,
                                get_counts(GEMV[0].spec(n, k, "bf16", (128, 128)), int(spec.arch)))([1])[0])
    assert predict([pt128], spec)[0] == pytest.approx(want128) and want128 != pytest.approx(want)


def test_calibrate_command_without_gpu_says_so(capsys):
    from patchc.calibrate import main
    assert main(["--budget", "5"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
