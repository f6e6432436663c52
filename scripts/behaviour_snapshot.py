"""Record every audit's numbers in the demo and each benchmark's ``--quick`` run, and compare two
records: a refactor that changes no behaviour leaves them bit-identical.

    python scripts/behaviour_snapshot.py record snapshots/before    # on the old commit
    python scripts/behaviour_snapshot.py record snapshots/after     # on the new one
    python scripts/behaviour_snapshot.py compare snapshots/before snapshots/after

Each run executes in its own process with ``AuditResult`` wrapped so that every result made
(by ``audit()``, ``score()`` or the callback) is kept: its scores, ranking, influence, losses,
predicted labels, per-validation matrix, attribution tensors and metrics. ``compare`` demands
``torch.equal`` on every tensor and equal metrics, and exits 1 on any difference. One torch
thread and one OpenMP thread, so that reductions run in the same order every time.
"""
from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")

# (name, script, arguments); "{tmp}" is a fresh temporary folder per run.
RUNS = [
    ("demo", "examples/demo.py", ["--logdir", "{tmp}/logs", "--explain", "3"]),
    ("quality", "benchmarks/quality.py", ["--quick", "--out", "{tmp}/out.json", "--glue-dir", DATA]),
    ("attribution", "benchmarks/attribution.py", ["--quick", "--out", "{tmp}/out.json", "--data-dir",
                                                  os.path.join(DATA, "datainf")]),
    ("attribution_streaming", "benchmarks/attribution_streaming.py", ["--quick", "--out", "{tmp}/out.json"]),
    ("projection", "benchmarks/projection.py", ["--quick", "--out", "{tmp}/out.json"]),
    ("removal", "benchmarks/removal.py", ["--quick", "--out", "{tmp}/out.json"]),
    ("tuning_check", "benchmarks/tuning_check.py", ["--quick", "--out", "{tmp}/out.json"]),
    ("store_memory", "benchmarks/store_memory.py", ["--quick", "--out", "{tmp}/out.json"]),
    ("speed", "benchmarks/speed.py", ["--quick", "--out", "{tmp}/out.json"]),
    ("solve_llm", "benchmarks/solve_llm.py", ["--quick", "--out", "{tmp}/out.json"]),
    ("roofline", "benchmarks/roofline.py", ["--quick", "--out", "{tmp}/out.json"]),
    ("tune_digits", "benchmarks/tune_digits.py",
     ["--seeds", "0", "--epochs", "50", "--solvers", "identity", "--methods",
                                                  "fvm", "--base", '{"steps": 2}', "--out", "{tmp}/out.json"]),
]

TENSOR_FIELDS = ("scores", "ranking", "influence", "loss_trained", "loss_tuned", "predicted", "per_validation",
                 "audited")


def _record(result: Any, into: list[dict[str, Any]]) -> None:
    import torch

    entry: dict[str, Any] = {"method": result.method, "solver": result.solver, "rank_by": result.rank_by,
                             "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}
    for name in TENSOR_FIELDS:
        value = getattr(result, name, None)
        if isinstance(value, torch.Tensor):
            entry[name] = value.detach().cpu().clone()
    attribution = getattr(result, "attribution", None)
    if attribution is not None:
        for name, value in vars(attribution).items():
            if isinstance(value, torch.Tensor):
                entry[f"attribution.{name}"] = value.detach().cpu().clone()
    into.append(entry)


def child(out: str, script: str, args: list[str]) -> None:
    """Run ``script`` as ``__main__`` with every ``AuditResult`` recorded, then save the records."""
    import torch

    torch.set_num_threads(1)
    from lightning_influence import result as result_module

    records: list[dict[str, Any]] = []
    original = result_module.AuditResult.__init__

    def init(self: Any, *a: Any, **k: Any) -> None:
        original(self, *a, **k)
        _record(self, records)

    result_module.AuditResult.__init__ = init
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        torch.save(records, out)


def record(folder: str, only: list[str]) -> int:
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}  # this tree's package
    failed = 0
    for name, script, args in RUNS:
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "_child",
                                   os.path.join(folder, f"{name}.pt"),
                                   script, *[a.replace("{tmp}", tmp) for a in args]], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
        status = "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode})"
        print(f"{name:24s} {status:16s} {time.perf_counter() - start:7.1f} s", flush=True)
        if proc.returncode:
            failed += 1
            print(proc.stdout[-2000:] + proc.stderr[-3000:])
    return 1 if failed else 0


def compare(before: str, after: str) -> int:
    import torch

    differ = 0
    for name, _, _ in RUNS:
        a_path, b_path = os.path.join(before, f"{name}.pt"), os.path.join(after, f"{name}.pt")
        if not (os.path.exists(a_path) and os.path.exists(b_path)):
            print(f"{name:24s} missing in {'before' if not os.path.exists(a_path) else 'after'}")
            differ += 1
            continue
        a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
        problems = [] if len(a) == len(b) else [f"{len(a)} results before, {len(b)} after"]
        for i, (x, y) in enumerate(zip(a, b)):
            for key in sorted(set(x) | set(y)):
                u, v = x.get(key), y.get(key)
                if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor):
                    same = u.dtype == v.dtype and u.shape == v.shape and torch.equal(u.nan_to_num(), v.nan_to_num()) \
                        and torch.equal(u.isnan() if u.is_floating_point() else u,
                                        v.isnan() if v.is_floating_point() else v)
                else:
                    same = u == v or (u != u and v != v)
                if not same:
                    problems.append(f"result {i}: {key}")
        tensors = sum(isinstance(v, torch.Tensor) for entry in a for v in entry.values())
        print(f"{name:24s} {len(a):3d} results, {tensors:4d} tensors: " + ("identical" if not problems else
                                                                        "DIFFER: " + "; ".join(problems[:6])))
        differ += bool(problems)
    return 1 if differ else 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("folder")
    rec.add_argument("--only", nargs="*", default=[], help="run names (default: all)")
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("before")
    cmp_.add_argument("after")
    args = parser.parse_args()
    sys.exit(record(args.folder, args.only) if args.command == "record" else compare(args.before, args.after))


if __name__ == "__main__":
    main()
