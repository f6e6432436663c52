"""Candidate attribution defaults, on the attribution benchmark's trained models.

``benchmarks/attribution.py`` trains a 3-layer character GPT-2 per task and seed (deterministic:
the same weights as its own runs) and scores every ``method x solver``. This script trains the
same models and scores, on one ``prepare()`` of the standard method per model, the variations of
the attribution defaults (``config.ATTRIBUTION_DEFAULTS``: standard, kronecker, damping 1e-4
relative, ``normalize="centered"``) tried as replacements, DataInf's protocol only:

- the damping (1e-3 .. 1e-6), the kronecker solver's ``balance=False``, no or unit normalisation;
- a RelatIF-style training side (Barshan et al. 2020): each training column scaled by
  ``1/sqrt(g_iᵀ K g_i)`` (``K`` the fitted solvers' inverse, :func:`scoring.self_influence`)
  instead of ``1/‖g_i‖``, computed here from the centred matrix (not a library option);
- the LoRA B matrices only (``params=["*lora_B*"]``, a second ``prepare()``), with the defaults'
  solver and normalisation, and with the gradient dot product (identity).

Writes raw rows (task, seed, column, AUC, recall) and their per-task mean/min: no tables (the
findings are stated in docs/ATTRIBUTION.md).

Run: python benchmarks/attribution_candidates.py [--out benchmarks/results/attribution_candidates_<date>.json]
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

import attribution as bench
import common

#: name, score() options on the standard prepare (damping relative)
CANDIDATES = (("kronecker centered d=1e-4 (defaults)", dict(damping=1e-4, normalize="centered")),
              ("kronecker centered d=1e-3", dict(damping=1e-3, normalize="centered")),
              ("kronecker centered d=1e-5", dict(damping=1e-5, normalize="centered")),
              ("kronecker centered d=1e-6", dict(damping=1e-6, normalize="centered")),
              ("kronecker none d=1e-4", dict(damping=1e-4, normalize="none")),
              ("kronecker unit d=1e-4", dict(damping=1e-4, normalize="unit")))


def run_model(task: str, seed: int, b: dict[str, Any]) -> list[dict[str, Any]]:
    from lightning_influence.audit import prepare, score
    from lightning_influence.config import AuditOptions, CurvatureConfig
    from lightning_influence.normalize import sample_norms
    from lightning_influence.scoring import fit_solvers, self_influence

    train_loader, test_loader = bench._loaders(b, "prompt")
    rows = []

    def row(column: str, pv: torch.Tensor, seconds: float) -> None:
        rows.append(bench._row(task, seed, "datainf", column, pv, b, seconds))

    options = AuditOptions(method="standard", seed=seed, batch_size=32, per_validation=True, solver="kronecker")
    p = prepare(b["model"], train_loader, test_loader, options)
    try:
        args = (p.device, p.compute_dtype)
        norms = sample_norms(p.train.store, p.chunk, *args)
        for name, extra in CANDIDATES:
            t0 = time.perf_counter()
            row(name, score(p, replace(options, **extra)).per_validation, time.perf_counter() - t0)
        for damping in (1e-4, 1e-5):
            t0 = time.perf_counter()
            curvature = CurvatureConfig(damping=damping, solver_options={"balance": False})
            pv = score(p, replace(options, curvature=curvature, normalize="centered")).per_validation
            row(f"kronecker balance=False centered d={damping:g}", pv, time.perf_counter() - t0)
        for damping in (1e-3, 1e-4, 1e-6):
            t0 = time.perf_counter()
            centred = score(p, replace(options, damping=damping, normalize="centered")).per_validation
            solvers = fit_solvers(p.curvature.store, p.curvature.valid, "kronecker", CurvatureConfig(damping=damping),
                                  *args, p.chunk)
            quad = self_influence(p.train.store, solvers, p.chunk, *args)
            pv = centred * (norms / quad.clamp_min(1e-300).sqrt()).view(1, -1)  # 1/‖g_i‖ -> 1/sqrt(g_iᵀKg_i)
            row(f"kronecker centered RelatIF d={damping:g}", pv, time.perf_counter() - t0)
    finally:
        p.close()
    only_b = AuditOptions(method="standard", seed=seed, batch_size=32, per_validation=True, solver="kronecker",
                          params=["*lora_B*"])
    t0 = time.perf_counter()
    p = prepare(b["model"], train_loader, test_loader, only_b)
    prep_s = time.perf_counter() - t0
    try:
        for name, extra in (("LoRA B only: kronecker centered d=1e-4", dict(damping=1e-4, normalize="centered")),
                            ("LoRA B only: identity", dict(solver="identity", normalize="none"))):
            t0 = time.perf_counter()
            row(name, score(p, replace(only_b, **extra)).per_validation, prep_s + time.perf_counter() - t0)
    finally:
        p.close()
    return rows


def summary(raw: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {column: {auc_mean, auc_min, recall_mean, recall_min, seeds}}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in raw:
        out.setdefault(r["task"], {}).setdefault(r["column"], {})
    for task, columns in out.items():
        for column in columns:
            rows = [r for r in raw if (r["task"], r["column"]) == (task, column)]
            auc, recall = np.array([r["auc"] for r in rows]), np.array([r["recall"] for r in rows])
            columns[column] = {"auc_mean": float(auc.mean()), "auc_min": float(auc.min()),
                               "recall_mean": float(recall.mean()), "recall_min": float(recall.min()),
                               "seeds": len(rows)}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(bench.TASKS), choices=bench.TASKS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data-dir", default=bench.DATA_DIR)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (as attribution.py --quick), one seed")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.quick:
        opts.seeds, opts.tasks = opts.seeds[:1], opts.tasks[:1]
    doc: dict[str, Any] = {"title": "Attribution: candidate defaults", **common.provenance(__file__, argv),
                           "options": {k: v for k, v in vars(opts).items() if k != "out"}, "learned": {}, "raw": []}
    out = opts.out or os.path.join(common.RESULTS, f"attribution_candidates_{doc['date'][:10]}.json")
    for seed in opts.seeds:
        for task in opts.tasks:
            b = bench.build(task, seed, opts.quick, opts.data_dir)
            doc["learned"].setdefault(task, []).append({"seed": seed, **b["learned"]})
            print(f"{task} seed {seed}: learned {b['learned']}", flush=True)
            doc["raw"] += run_model(task, seed, b)
            doc["summary"] = summary(doc["raw"])
            common.write_results(common.clean(doc), out)  # after every model: a partial run keeps its rows
    return doc


if __name__ == "__main__":
    main()
