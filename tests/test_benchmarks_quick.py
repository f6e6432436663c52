"""The benchmark scripts can't rot: run ``quality.py --quick`` and ``render.py`` on its output."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(ROOT, "..", "shared", "data")
TABLE_KEYS = {"title", "machine", "date", "command", "columns", "rows", "notes"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quality_quick_and_render(tmp_path):
    out = tmp_path / "quality.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--quick",
                           "--out", str(out), "--glue-dir", GLUE],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for key in ("title", "machine", "date", "command", "options", "raw", "aggregate", "tables", "wall_seconds"):
        assert key in doc, key
    assert doc["machine"]["cpu_count"] and doc["machine"]["torch"]
    tasks = doc["options"]["tasks"]
    assert len(tasks) == 2 and doc["options"]["seeds"] == [0]
    columns = {r["column"] for r in doc["raw"]}
    assert {"fvm/hyperinf", "standard/exact", "loss@θ*", "loss@θ̃", "cleanlab"} <= columns
    for r in doc["raw"]:
        for key in ("auroc", "ap", "recall", "seconds"):
            assert _finite(r[key]), (r["task"], r["column"], key, r[key])
        assert 0.0 <= r["auroc"] <= 1.0 and r["seconds"] >= 0.0
    for task in tasks:
        stat = doc["aggregate"][task]["fvm/hyperinf"]
        assert set(stat) == {"auroc", "ap", "recall", "seconds"}
        assert _finite(stat["auroc"]["mean"]) and _finite(stat["auroc"]["std"])
    assert doc["tables"] and all(TABLE_KEYS <= set(t) for t in doc["tables"])

    # render into a temporary copy of the README
    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(ROOT, "README.md"), readme)
    before = readme.read_text()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "render.py"), "--readme", str(readme),
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    start, end = text.index("<!-- quality:start -->"), text.index("<!-- quality:end -->")
    section = text[start:end]
    assert "fvm/hyperinf" in section and "ROC AUC" in section and doc["date"] in section
    assert text.count("<!-- quality:start -->") == 1
    # idempotent, and the rest of the README is untouched
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "render.py"), "--readme", str(readme),
                    str(out)], cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert readme.read_text() == text
    head = before.split("<!-- quality:start -->")[0].rstrip()
    assert text.startswith(head)


def test_render_generic_tables(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import render
    finally:
        sys.path.pop(0)
    speed = {"tables": [{"title": "Speed", "machine": "cpu", "date": "2025-01-01", "command": "python x.py",
                         "columns": ["what", "ratio"], "rows": [["grads/train step", 0.8]], "notes": ["n"]}]}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    (tmp_path / "other.json").write_text(json.dumps({"no": "tables"}))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- speed:start -->\nold\n<!-- speed:end -->\n\ntail\n")
    done = render.render_files([str(tmp_path / "speed.json"), str(tmp_path / "other.json")], str(readme))
    text = readme.read_text()
    assert done == ["speed"] and "old" not in text and "| grads/train step | 0.8 |" in text
    assert "2025-01-01" in text and text.endswith("tail\n")


def test_roofline_quick(tmp_path):
    """benchmarks/roofline.py --quick: peak, per-stage flops and fractions, ours-before, spill reads."""
    out = tmp_path / "roofline.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "roofline.py"), "--quick",
                           "--before", "HEAD", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["peak"]["mm_float32_gflops"] > 0 and doc["peak"]["mm_float64_gflops"] > 0
    assert doc["tables"] and all(TABLE_KEYS <= set(t) for t in doc["tables"])
    assert "not run" in doc["reference"]
    solvers = {(e["mode"], e["solver"]) for e in doc["entries"]}
    assert {(m, s) for m in ("fvm", "standard") for s in ("identity", "datainf", "hyperinf", "exact")} <= solvers
    for e in doc["entries"]:
        for stage in ("fit", "score"):
            assert _finite(e[f"{stage}_s"]) and _finite(e[f"{stage}_peak_fraction"])
        if e["n"] == 200:  # measured with --before too, on the same gradients
            assert _finite(e["speedup"]) and e["max_rel_diff_vs_before"] < 1e-3
    assert doc["spill"]["spilled_reads_over_store"] == 1.0  # one read of the store per fitting pass
