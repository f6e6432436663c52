"""The solve stage (curvature fit + fvm quadratic forms) at LLM LoRA shapes, before and after the
low-rank form of HyperINF, with its peak memory against the solvers' own estimate.

1. GPT-2 small, PEFT LoRA r=8 on c_attn / c_proj / c_fc / mlp.c_proj: 96 blocks (per layer A and
   B of each: (8,768) x5, (8,2304), (8,3072) x2), N = 48 curvature (validation) samples, n = 192
   training samples scored, random float32 gradients in a store in RAM (as the audit holds
   them). Each solver runs :func:`fit_solvers` + :func:`self_influence` in a fresh process at
   each thread count; its peak RSS growth (VmHWM reset once the stores exist) is set against
   ``InverseSolver.estimate_bytes``. "hyperinf/schulz" (the dense d x d iteration, the
   solver before this change) is timed on one block of each shape and multiplied by the
   block counts (the full run takes minutes).
2. Accuracy of the float32 pipeline against float64 (the low-rank form in float64 equals a
   dense LU solve of the d x d GFIM: checked on one (8, 3072) block here, and in
   tests/test_solvers_lowrank.py), on Gaussian gradients and on gradients whose rows share a
   few directions (the training vectors partly in their span: the cancellation case).
3. A 7B Llama with LoRA on every linear layer (q,k,v,o 4096x4096; gate/up 4096->11008; down
   11008->4096; 32 layers): the form chosen per block, the flops and bytes of the solve for
   N = 100..1000 validation samples, r = 8 / 16, and n training samples scored, with the time
   extrapolated from single blocks measured here at those shapes.

Run: python benchmarks/solve_llm.py [--quick] [--threads 2 1] [--out benchmarks/results/solve_llm.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import torch

import common

GPT2_LAYER = [(8, 768), (8, 2304), (8, 768), (8, 768), (8, 768), (8, 3072), (8, 3072), (8, 768)]
LLAMA = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
         "gate": (4096, 11008), "up": (4096, 11008), "down": (11008, 4096)}


def gpt2_shapes(layers: int = 12) -> list[tuple[int, int]]:
    return GPT2_LAYER * layers


def llama_shapes(r: int, layers: int = 32) -> list[tuple[int, int]]:
    """LoRA A ``(r, d_in)`` and B stored transposed ``(r, d_out)`` of every linear layer."""
    return [(r, side) for _ in range(layers) for d_in, d_out in LLAMA.values() for side in (d_in, d_out)]


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _store(n: int, shapes: list[tuple[int, int]], seed: int, dtype=torch.float32):
    from lightning_influence.store import GradientStore

    gen = torch.Generator().manual_seed(seed)
    named = {f"b{i:03d}": s for i, s in enumerate(shapes)}
    store = GradientStore(n, named, dtype)
    store.write(0, {k: torch.randn(n, *s, generator=gen, dtype=dtype) * (1 + i % 7) for i, (k, s) in
                    enumerate(named.items())})
    return store


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One measured run (in its own process): fit + fvm scores of ``cfg["solver"]``."""
    from lightning_influence.config import CurvatureConfig
    from lightning_influence.scoring import fit_solvers, self_influence
    from lightning_influence.solvers import make_solver

    torch.set_num_threads(cfg["threads"])
    shapes = [tuple(s) for s in cfg["shapes"]]
    val, train = _store(cfg["n_val"], shapes, 0), _store(cfg["n_train"], shapes, 1)
    valid = torch.ones(cfg["n_val"], dtype=torch.bool)
    options = cfg.get("options") or {}
    base = _rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak (VmHWM) starts again from here: the stores are not the solve's
    cpu = torch.device("cpu")
    start, cpu0 = time.perf_counter(), time.process_time()
    solvers = fit_solvers(val, valid, cfg["solver"], CurvatureConfig(solver_options=options), cpu, torch.float32,
                          cfg["chunk"])
    fit_s, fit_cpu = time.perf_counter() - start, time.process_time() - cpu0
    start, cpu0 = time.perf_counter(), time.process_time()
    scores = self_influence(train, solvers, cfg["chunk"], cpu, torch.float32)
    score_s, score_cpu = time.perf_counter() - start, time.process_time() - cpu0
    peak = _rss("VmHWM:") - base
    estimate = make_solver(cfg["solver"], **options).estimate_bytes(shapes, cfg["n_val"], 4, gathered=False)
    forms = Counter(str(s.info.get("form", cfg["solver"])) for s in solvers.values())
    return {"fit_s": fit_s, "score_s": score_s, "solve_s": fit_s + score_s, "solve_cpu_s": fit_cpu + score_cpu,
            "load_avg": os.getloadavg()[0], "peak_bytes": peak,
            "estimate_bytes": int(estimate), "forms": dict(forms), "finite": bool(torch.isfinite(scores).all()),
            "max_iterations": max((s.info.get("iterations", 0) for s in solvers.values()), default=0)}


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(cfg: dict[str, Any], quick: bool) -> dict[str, Any]:
    """:func:`child` in a fresh process (its own peak RSS), or here with ``quick`` (CI: one import)."""
    return child(cfg) if quick else run_child(cfg)


def accuracy(shapes: list[tuple[int, int]], n_val: int, n_train: int, threads: int) -> dict[str, Any]:
    """float32 pipeline scores against float64, on Gaussian and on shared-direction gradients;
    and the float64 low-rank inverse against a dense LU solve on the largest block."""
    from lightning_influence.solvers import SOLVERS, datainf_damping, make_solver

    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(3)
    for kind in ("gaussian", "shared_directions"):
        worst = 0.0
        total32 = total64 = 0
        for r, d in shapes:
            if kind == "gaussian":
                g = torch.randn(n_val, r, d, generator=gen, dtype=torch.float64)
                v = torch.randn(n_train, r, d, generator=gen, dtype=torch.float64)
            else:  # rows in a 16-direction span with decaying weights (+1% noise); training vectors 90% in it
                basis = torch.randn(16, d, generator=gen, dtype=torch.float64)
                weight = torch.logspace(1, -2, 16, dtype=torch.float64)
                g = (torch.randn(n_val, r, 16, generator=gen, dtype=torch.float64) * weight) @ basis
                g += 0.01 * torch.randn(n_val, r, d, generator=gen, dtype=torch.float64)
                v = (torch.randn(n_train, r, 16, generator=gen, dtype=torch.float64) * weight) @ basis
                v += 0.1 * torch.randn(n_train, r, d, generator=gen, dtype=torch.float64)
            lam = datainf_damping(g)
            q64 = make_solver("hyperinf").fit(g, lam).quadratic(v)
            q32 = make_solver("hyperinf").fit(g.float(), lam).quadratic(v.float()).double()
            worst = max(worst, float(((q32 - q64).abs() / q64.abs()).max()))
            total32, total64 = total32 + q32, total64 + q64
        out[kind] = {"max_rel_err_per_block": worst,
                     "max_rel_err_total": float(((total32 - total64).abs() / total64.abs()).max())}
    r, d = max(shapes, key=lambda s: s[1])
    g = torch.randn(n_val, r, d, generator=gen, dtype=torch.float64)
    v = torch.randn(8, r, d, generator=gen, dtype=torch.float64)
    lam = datainf_damping(g)
    gm = g.reshape(-1, d)
    a = gm.T @ gm / n_val + lam * torch.eye(d, dtype=torch.float64)
    want = torch.linalg.solve(a, v.transpose(-1, -2)).transpose(-1, -2)
    low = make_solver("hyperinf").fit(g, lam)
    out["lowrank_vs_dense_lu"] = {"shape": [n_val, r, d], "form": low.info["form"],
                                  "rel_err": float((low.apply(v) - want).norm() / want.norm()),
                                  "probe_residual": low.info["residual"]}
    assert SOLVERS["hyperinf"] is type(low)
    return out


def single_block(n: int, r: int, d: int, rows: int, threads: int, form: str) -> dict[str, Any]:
    """Fit one block of ``n`` gradients ``(r, d)`` in ``form`` and score ``rows`` sample vectors: seconds and
    GFLOP/s."""
    from lightning_influence.solvers import make_solver
    from lightning_influence.solvers._lowrank import form_cost

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(n, r, d, generator=gen)
    v = torch.randn(rows, r, d, generator=gen)
    start = time.perf_counter()
    solver = make_solver("hyperinf", form=form).fit(g, 0.1 * float(g.pow(2).mean()))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    solver.quadratic(v)
    score_s = time.perf_counter() - start
    fit_flops = form_cost(form, n, r, d, scored_rows=0)["flops"]
    if form == "schulz":  # the model's SCHULZ_STEPS replaced by the steps taken
        fit_flops = float(n * r) * d * d + solver.info["iterations"] * 4.0 * d ** 3
    score_flops = form_cost(form, n, r, d, scored_rows=rows * r)["flops"] - form_cost(form, n, r, d,
                                                                                      scored_rows=0)["flops"]
    return {"n": n, "r": r, "d": d, "rows": rows, "form": form, "fit_s": fit_s, "score_s": score_s,
            "fit_gflops": fit_flops / fit_s / 1e9, "score_gflops": score_flops / score_s / 1e9,
            "iterations": solver.info.get("iterations")}


def project_7b(rates: dict[str, dict[str, float]], n_train: int, ns=(100, 300, 1000), rs=(8, 16)) -> list[dict]:
    """The solve of a 7B Llama's LoRA on every linear layer: per (N, r) the forms chosen, flops,
    bytes (kept + gathered + temporaries, from ``estimate_bytes``) and the time at the measured rates."""
    from lightning_influence.solvers import make_solver
    from lightning_influence.solvers._lowrank import choose_form, form_cost

    rows = []
    for r in rs:
        shapes = llama_shapes(r)
        numbers = sum(a * b for a, b in shapes)
        for n in ns:
            forms: Counter = Counter()
            flops = {f: [0.0, 0.0] for f in rates}  # lowrank, direct, schulz
            for rr, d in shapes:
                form = choose_form(n, rr, d)
                forms[f"{form} d={d}"] += 1
                fit = form_cost(form, n, rr, d, scored_rows=0)["flops"]
                flops[form][0] += fit
                flops[form][1] += form_cost(form, n, rr, d, scored_rows=n_train * rr)["flops"] - fit
            seconds = sum(flops[f][0] / (rates[f]["fit_gflops"] * 1e9) + flops[f][1] / (rates[f]["score_gflops"] * 1e9)
                          for f in flops)
            schulz_only = sum(form_cost("schulz", n, rr, d, scored_rows=n_train * rr)["flops"] for rr, d in shapes)
            rows.append({"r": r, "n_val": n, "n_train": n_train, "numbers_per_sample": numbers, "forms": dict(forms),
                         "fit_tflop": sum(f[0] for f in flops.values()) / 1e12,
                         "score_tflop": sum(f[1] for f in flops.values()) / 1e12,
                         "schulz_everywhere_tflop": schulz_only / 1e12,
                         "solve_bytes": make_solver("hyperinf").estimate_bytes(shapes, n, 4, gathered=False),
                         "val_store_bytes": n * numbers * 4, "train_store_bytes": n_train * numbers * 4,
                         "seconds_here": seconds})
    return rows


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one layer, one thread count, small 7B blocks (CI)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--n-val", type=int, default=48)
    parser.add_argument("--n-train", type=int, default=192)
    parser.add_argument("--n-train-7b", type=int, default=10000, help="training samples scored in the 7B projection")
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "solve_llm.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    started = time.perf_counter()
    threads = args.threads[:1] if args.quick else args.threads
    shapes = gpt2_shapes(12) if not args.quick else [(4, 96), (4, 288), (4, 96), (4, 384)]
    if args.quick:
        args.n_val, args.n_train = 12, 24
    chunk = 64
    base = {"shapes": shapes, "n_val": args.n_val, "n_train": args.n_train, "chunk": chunk}
    runs, schulz = [], []
    for t in threads:
        for solver, options in (("hyperinf", {}), ("exact", {}), ("datainf", {})):
            res = measure(dict(base, solver=solver, options=options, threads=t), args.quick)
            label = solver + ("/" + "+".join(f"{k}" for k in sorted(res["forms"])) if solver == "hyperinf" else "")
            runs.append(dict(res, solver=label, threads=t))
            print(json.dumps(runs[-1]), flush=True)
        # the dense Schulz form (the solver before this change) on one block of each shape, times the counts
        total = {"fit_s": 0.0, "score_s": 0.0, "solve_cpu_s": 0.0}
        for shape, count in Counter(shapes).items():
            one = measure(dict(base, shapes=[shape], solver="hyperinf", options={"form": "schulz"}, threads=t),
                          args.quick)
            for k in total:
                total[k] += count * one[k]
            schulz.append(dict(one, shape=shape, count=count, threads=t))
            print(json.dumps(schulz[-1]), flush=True)
        runs.append({"solver": "hyperinf/schulz (extrapolated)", "threads": t, "fit_s": total["fit_s"],
                     "score_s": total["score_s"], "solve_s": total["fit_s"] + total["score_s"],
                     "solve_cpu_s": total["solve_cpu_s"], "peak_bytes": None, "estimate_bytes": None})
    acc = accuracy(shapes[:8], args.n_val, args.n_train, threads[0])
    print(json.dumps(acc), flush=True)
    # single blocks at 7B shapes, measured here, for the rates of the projection
    t = threads[0]
    big = [(100, 8, 4096, 64), (100, 8, 11008, 64), (200, 8, 11008, 16)]
    if args.quick:
        big = [(20, 8, 512, 16)]
    blocks = [single_block(*b, threads=t, form="lowrank") for b in big]
    sch = single_block(args.n_val, 8, 3072 if not args.quick else 256, 64, t, "schulz")
    direct = single_block(args.n_val, 8, 3072 if not args.quick else 256, 64, t, "direct")
    blocks += [sch, direct]
    rates = {"lowrank": {"fit_gflops": min(b["fit_gflops"] for b in blocks if b["form"] == "lowrank"),
                         "score_gflops": min(b["score_gflops"] for b in blocks if b["form"] == "lowrank")},
             "schulz": {"fit_gflops": sch["fit_gflops"], "score_gflops": sch["score_gflops"]},
             "direct": {"fit_gflops": direct["fit_gflops"], "score_gflops": direct["score_gflops"]}}
    projection = project_7b(rates, args.n_train_7b)
    gib = 2 ** 30
    info = common.provenance(__file__, argv)
    machine = f"{info['machine'].get('cpu_model', '?')}, torch {torch.__version__}"
    table1 = {"title": f"Solve stage at GPT-2-small LoRA shapes ({len(shapes)} blocks, N={args.n_val} curvature, "
                       f"n={args.n_train} scored, float32)",
              "machine": machine, "date": info["date"], "command": info["command"],
              "columns": ["solver", "threads", "fit s", "score s", "solve s", "solve CPU s", "peak RSS MiB",
                          "estimate MiB"],
              "rows": [[r["solver"], r["threads"], round(r["fit_s"], 2), round(r["score_s"], 2), round(r["solve_s"], 2),
                        round(r["solve_cpu_s"], 2),
                        None if r.get("peak_bytes") is None else round(r["peak_bytes"] / 2 ** 20),
                        None if r.get("estimate_bytes") is None else round(r["estimate_bytes"] / 2 ** 20)]
                       for r in runs],
              "notes": ["hyperinf/schulz: one block of each shape timed in its own process, times the block counts",
                        "solve CPU s: this process's CPU seconds (all threads), less sensitive than wall time to "
                        "other processes on a shared machine (load average at start: "
                        f"{info['machine'].get('load_avg_at_start')})",
                        "peak RSS: growth of VmHWM over the fit + scores, the gradient stores already in RAM; "
                        "estimate: InverseSolver.estimate_bytes(gathered=False), the RAM store's rows being views"]}
    table2 = {"title": f"7B Llama, LoRA on all linear layers (448 blocks), the solve with n={args.n_train_7b} scored",
              "machine": machine, "date": info["date"], "command": info["command"],
              "columns": ["r", "N val", "forms", "fit TFLOP", "score TFLOP", "Schulz-everywhere TFLOP",
                          "solve GiB", "val store GiB", "hours here"],
              "rows": [[p["r"], p["n_val"], ", ".join(f"{k}: {v}" for k, v in sorted(p["forms"].items())),
                        round(p["fit_tflop"], 2), round(p["score_tflop"], 1), round(p["schulz_everywhere_tflop"], 1),
                        round(p["solve_bytes"] / gib, 1), round(p["val_store_bytes"] / gib, 1),
                        round(p["seconds_here"] / 3600, 2)] for p in projection],
              "notes": [f"rates measured here on single blocks ({t} threads): low-rank fit "
                        f"{rates['lowrank']['fit_gflops']:.1f} GFLOP/s, score {rates['lowrank']['score_gflops']:.1f}; "
                        f"Schulz fit {rates['schulz']['fit_gflops']:.1f}, score {rates['schulz']['score_gflops']:.1f}; "
                        f"direct fit {rates['direct']['fit_gflops']:.1f}, score {rates['direct']['score_gflops']:.1f}",
                        "solve GiB: estimate_bytes (kept Q / X, dense forms' Grams, largest fitting batch), "
                        "without the gradient stores"]}
    result = {**info, "tables": [table1, table2],
              "raw": {"runs": runs, "schulz_blocks": schulz, "accuracy": acc, "single_blocks": blocks, "rates": rates,
                      "projection_7b": projection},
              "wall_seconds": time.perf_counter() - started}
    common.write_results(common.clean(result), args.out)
    return result


if __name__ == "__main__":
    main()
