"""The measurement scripts of calibration at scale, on the tiny model."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import calibration_cost  # noqa: E402


def test_calibration_cost_times_each_phase_and_plans_the_statistics_exactly(tmp_path):
    out = tmp_path / "cost.json"
    argv = ["--model", "tiny", "--prompts", "2", "--steps", "2", "--batch-size", "1", "--groups", "4"]
    assert calibration_cost.main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["slots"] == 2 and r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["statistics_bytes"] == 2 * r["statistics_bytes_per_step_planned"] > 0
    assert r["weight_search_s"] is not None and r["group_search_s"] > 0
    projected = r["projected_64x25"]
    # 4 (prompt x step) calls scaled to 64 x 25; statistics_s is rounded to 0.1 s in the JSON
    assert abs(projected["statistics_s"] - r["statistics_s"] / 4 * 64 * 25) <= 0.05 / 4 * 64 * 25 + 0.5
    assert (
        projected["total_s"] == projected["statistics_s"] + projected["group_search_s"] + projected["weight_search_s"]
    )
