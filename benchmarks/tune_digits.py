"""How the vm/fvm defaults were chosen: a grid on the *tuning task only* (digits, 20 %
symmetric flips), never on the held-out tasks (digits 40 % / class-dependent, SST-2, CoLA).

For every seed the MLP is trained once (as in ``quality.py``); then for every tuning
configuration one ``prepare()`` per method and one ``score()`` per (solver, damping). Each
line of the output is one configuration, averaged over the seeds, with the loss at θ̃ of the
same configuration beside it (the baseline fvm has to beat).

    python benchmarks/tune_digits.py --grid steps=100,300,1000 lr=0.003,0.01,0.03 \
        --damping 0.01 0.1 1 --seeds 0 1 2 --tag stage1

Appends to ``benchmarks/results/tuning_digits.json`` (a list of runs, each with the machine,
date and command that made it; not rendered — benchmarks/TUNING.md summarises it).

``--quick`` (the tests' smoke run: seconds) is ``--seeds 0 --epochs 50 --solvers identity
--methods fvm --base '{"steps": 2}'`` and writes to a fresh temporary file unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

import common
from common import clean, metrics_of
from lightning_influence.audit import prepare, score
from lightning_influence.config import AuditOptions, TuningConfig, as_dict
from tasks import noisy_digits


def parse_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 over TuningConfig fields")
    ap.add_argument("--base", type=json.loads, default={}, help="fixed TuningConfig overrides (JSON)")
    ap.add_argument("--damping", nargs="+", type=float, default=[0.1])
    ap.add_argument("--damping-rule", default="relative", choices=["relative", "absolute"])
    ap.add_argument("--solvers", nargs="+", default=["hyperinf", "exact", "datainf", "identity"])
    ap.add_argument("--methods", nargs="+", default=["fvm", "vm"])
    ap.add_argument("--fisher", nargs="+", default=["empirical"], choices=["empirical", "true"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--kind", default="symmetric")
    ap.add_argument("--epochs", type=int, default=1500)
    ap.add_argument("--params", nargs="+", default=["trainable"], help="audited blocks (name globs or keywords)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, 50 training epochs, fvm/identity, 2 tuning steps, a temporary --out (tests)")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/tuning_digits.json (--quick: a temporary file)")
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.seeds, opts.epochs, opts.solvers, opts.methods, opts.base = [0], 50, ["identity"], ["fvm"], {"steps": 2}
        import tempfile

        opts.out = opts.out or os.path.join(tempfile.mkdtemp(prefix="tune_digits_"), "tuning_digits_quick.json")
    opts.out = opts.out or os.path.join(common.RESULTS, "tuning_digits.json")
    header = common.provenance(__file__, argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    keys = [g.split("=")[0] for g in opts.grid]
    values = [[parse_value(v) for v in g.split("=")[1].split(",")] for g in opts.grid]
    configs = [dict(zip(keys, combo)) for combo in itertools.product(*values)] or [{}]
    models = {}
    for seed in opts.seeds:
        split = noisy_digits(opts.rate, opts.kind, seed=seed)
        models[seed] = (split, common.train_mlp(common.digits_mlp(seed), split.train.x, split.train.y,
                                                epochs=opts.epochs, seed=seed))
    records: list[dict[str, Any]] = []
    for cfg in configs:
        tuning = as_dict(TuningConfig(**{**opts.base, **cfg}))
        per: dict[str, list[dict[str, float]]] = {}
        t0 = time.perf_counter()
        for seed, (split, model) in models.items():
            for method, fisher, params in itertools.product(opts.methods, opts.fisher, opts.params):
                options = AuditOptions(method=method, tuning=tuning, seed=seed, batch_size=128,
                                       params=params if params in ("trainable", "auto") else params.split("+"),
                                       curvature={"fisher": fisher}, noisy=split.noisy)
                p = prepare(model, split.train, split.val, options)
                tag = ("" if fisher == "empirical" else "+TF") + ("" if params == "trainable" else f"[{params}]")
                try:
                    for solver in opts.solvers:
                        for damping in opts.damping:
                            r = score(p, replace(options, solver=solver, curvature={
                                "damping": damping, "fisher": fisher, "damping_rule": opts.damping_rule}))
                            per.setdefault(f"{method}{tag}/{solver}@{damping:g}", []).append(
                                {"auroc": r.metrics["auroc"], "ap": r.metrics["ap"],
                                 "recall": r.metrics["recall@noise_rate"]})
                    per.setdefault(f"loss@θ̃({method}{tag})", []).append(metrics_of(r.loss_tuned, split.noisy))
                    per.setdefault(f"val_loss_end({method}{tag})", []).append(
                        {"auroc": p.tune_stats.get("val_loss_end", float("nan")), "ap": 0.0, "recall": 0.0})
                finally:
                    p.close()
            per.setdefault("loss@θ*", []).append(metrics_of(r.loss_trained, split.noisy))
        summary = {k: {m: float(np.mean([v[m] for v in vs])) for m in ("auroc", "ap", "recall")}
                   | {"auroc_std": float(np.std([v["auroc"] for v in vs], ddof=1)) if len(vs) > 1 else 0.0}
                   for k, vs in per.items()}
        rec = dict(tag=opts.tag, task=f"digits {opts.kind} {opts.rate}", seeds=opts.seeds, tuning=tuning,
                   grid_point=cfg, seconds=time.perf_counter() - t0, summary=summary, **header)
        records.append(rec)
        best = max((k for k in summary if "/" in k), key=lambda k: summary[k]["auroc"])
        fh = [k for k in summary if k.startswith("fvm/hyperinf")]
        line = " ".join(f"{k.split('@')[-1]}:{summary[k]['auroc']:.4f}/{summary[k]['ap']:.4f}" for k in fh)
        lt = summary.get("loss@θ̃(fvm)", summary.get("loss@θ̃(vm)"))
        print(f"{json.dumps(cfg):60s} fvm/hyperinf auroc/ap {line} | loss@θ̃ {lt['auroc']:.4f}/{lt['ap']:.4f} | "
              f"best {best} {summary[best]['auroc']:.4f}/{summary[best]['ap']:.4f} | "
              f"vl {summary.get('val_loss_end(fvm)', {}).get('auroc', float('nan')):.3f} | {rec['seconds']:.0f}s",
              flush=True)
    existing = []
    if os.path.exists(opts.out):
        with open(opts.out) as fh_:
            existing = json.load(fh_)
    with open(opts.out, "w") as fh_:
        json.dump(clean(existing + records), fh_, indent=1, ensure_ascii=False)
    print(f"appended {len(records)} run(s) to {opts.out}")
    return records


if __name__ == "__main__":
    main()
