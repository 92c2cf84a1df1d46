"""``patchc bench roofline`` (bench/roofline.py) from the shipped SASS counts (``--quick``, no
compile): the fields the issue lists, every prediction within the bandwidth bound, the decode
targets' loop demands met, and a missed speedup target explained by its fixed costs."""
import json

from bench import roofline


def test_roofline_quick_writes_the_rows_and_the_targets(tmp_path):
    assert roofline.main(["--quick", "--targets", "sm_90", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "roofline.json").read_text())["rows"]
    assert len(rows) == len(roofline.SHAPES) * len(roofline.DTYPES) * len(roofline.FRACS) * len(roofline.MS)
    need = {"shape", "dtype", "frac_24", "m", "target", "triton", "kernel", "loop_24_issue_demand",
            "loop_24_int_demand", "loop_24_lsu_demand", "programs", "sms", "predicted_speedup", "bound"}
    hybrid = [r for r in rows if r["strategy"] != "dense"]
    assert hybrid and all(need <= set(r) for r in hybrid)
    assert all(r["predicted_speedup"] <= r["bound"] + 1e-9 for r in rows)
    checks = roofline.check_targets(rows)
    assert len(checks) == 4                                        # 2 shapes x M = 1, 16
    for c in checks:
        assert c["loop_24_issue_demand"] and c["loop_24_int_demand"] and c["loop_24_lsu_demand"], c
        assert c["speedup_le_bound"] and c.get("programs_ge_sms", True), c
    md = (tmp_path / "roofline.md").read_text()
    assert "## Decode targets" in md and rows[0]["triton"] in md
    if not all(c["speedup_ge_0.85_bound"] for c in checks):
        assert "fixed costs decide" in md
