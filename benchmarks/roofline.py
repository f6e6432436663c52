"""The solve and score stages against the machine's arithmetic limit.

In one run: the machine's matmul peak (a large ``torch.mm`` in float32 and float64) and its
read bandwidth (a large ``sum``), at the same thread count; then, on identical synthetic
LoRA-shaped gradients (``--blocks`` blocks of ``(rank, dim)``, by default 24 of 8×384, the
MiniLM-L6 q/v shape), each solver's fit (:func:`fit_solvers`) and scoring
(``self_influence`` for fvm, ``inverse_direction`` + ``cross_influence`` for standard) are
timed, their floating-point operations counted from the shapes, and the achieved GFLOP/s is
reported with the fraction of the peak (and of the roofline ``min(peak, intensity × bandwidth)``
for the stages that read more bytes than they compute on).

Also: the spilled store against the RAM store (bytes read per fitting pass), and, with
``--before REV``, the same measurements with the package as it was at git revision ``REV``
("ours-before", run in a subprocess on the same gradients; not the HyperINF reference).
``--reference DIR`` would run the HyperINF reference's ``IFEngine`` from a clone of its
repository; the clone is never copied into this project. Without it the results say so.

Run: python benchmarks/roofline.py [--quick] [--threads 1] [--ns 1000 4000 16000] [--before REV]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SOLVERS = ("identity", "datainf", "hyperinf", "exact")
MODES = ("fvm", "standard")


def _best_both(fn, repeat: int = 3):
    """The best wall-clock and the best CPU (process) seconds of ``repeat`` calls, after a warm-up."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


def _best(fn, repeat: int = 3) -> float:
    return _best_both(fn, repeat)[0]


def machine_peak(size: int = 3072, read: bool = True) -> dict[str, float]:
    """GFLOP/s of a ``size``×``size`` ``torch.mm`` (float32, float64) and GB/s of a 512 MiB read,
    each per wall-clock second and (``*_cpu``) per second of this process's CPU time."""
    import torch

    out: dict[str, float] = {}
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        wall, cpu = _best_both(lambda: a @ b)
        out[f"mm_{name}_gflops"] = 2 * size ** 3 / wall / 1e9
        out[f"mm_{name}_gflops_cpu"] = 2 * size ** 3 / cpu / 1e9
    if not read:
        return out
    x = torch.ones(128 << 20)  # 512 MiB of float32
    wall, cpu = _best_both(lambda: x.sum())
    out["read_gbs"], out["read_gbs_cpu"] = x.numel() * 4 / wall / 1e9, x.numel() * 4 / cpu / 1e9
    return out


def _now() -> str:
    import datetime
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def mm_floor(train, val) -> dict[str, float]:
    """The floor of any identity (gradient dot product) implementation on these gradients: one
    plain ``torch.mm`` of all ``n`` training gradients laid out as one ``(n, P)`` matrix (a copy
    made outside the timing) with the mean validation gradient ``(P, 1)``: seconds (wall, CPU)."""
    import torch

    g = torch.cat([train.block(b).reshape(len(train), -1) for b in train.names], dim=1)
    v = torch.cat([val.block(b).mean(0).reshape(-1) for b in val.names]).unsqueeze(1)
    wall, cpu = _best_both(lambda: torch.mm(g, v))
    return {"mm_floor_s": wall, "mm_floor_cpu_s": cpu}


def make_stores(n: int, m: int, blocks: int, rank: int, dim: int, seed: int = 0, spill_dir: str | None = None):
    """Training (``n``) and validation (``m``) stores of float32 gradients, columns scaled over
    two decades (some conditioning), identical for a given seed whatever the package version."""
    import torch

    from lightning_influence.store import GradientStore

    shapes = {f"layer{i // 2}.{'q' if i % 2 == 0 else 'v'}.lora_{'A' if (i // 12) == 0 else 'B'}": (rank, dim)
              for i in range(blocks)}
    gen = torch.Generator().manual_seed(seed)
    cols = torch.logspace(-1, 1, dim)
    stores = []
    for count in (n, m):
        store = GradientStore(count, shapes, max_memory=0 if spill_dir else None, spill_dir=spill_dir)
        step = 2048
        for start in range(0, count, step):
            rows = min(step, count - start)
            store.write(start, {name: torch.randn(rows, rank, dim, generator=gen) * cols for name in shapes})
        stores.append(store)
    return stores


def measure(ns: list[int], m: int, blocks: int, rank: int, dim: int, solvers, modes, chunk: int,
            floor: bool = False) -> list[dict[str, Any]]:
    """Fit and score seconds, wall-clock and CPU (and the solvers' info) per (n, mode, solver);
    with ``floor``, identity's rows also carry :func:`mm_floor`."""
    import torch

    from lightning_influence import scoring
    from lightning_influence.config import CurvatureConfig

    cpu, dtype = torch.device("cpu"), torch.float32
    rows: list[dict[str, Any]] = []
    for n in ns:
        train, val = make_stores(n, m, blocks, rank, dim)
        floor_times = mm_floor(train, val) if floor and "identity" in solvers else {}
        for mode in modes:
            curv = val if mode == "fvm" else train
            valid = torch.ones(len(curv), dtype=torch.bool)
            for name in solvers:
                local_peak = machine_peak(1024 if dim < 128 else 2048)  # the machine is shared
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    start, start_cpu = time.perf_counter(), time.process_time()
                    fitted = scoring.fit_solvers(curv, valid, name, CurvatureConfig(), cpu, dtype, chunk)
                    fit_s, fit_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
                    start, start_cpu = time.perf_counter(), time.process_time()
                    if mode == "fvm":
                        scores = scoring.self_influence(train, fitted, chunk, cpu, dtype)
                    else:
                        mean = {b: val.block(b).mean(0, keepdim=True) for b in val.names}
                        scores = scoring.cross_influence(train, scoring.inverse_direction(mean, fitted, cpu, dtype),
                                                         chunk, cpu, dtype)[0]
                    score_s, score_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
                info = next(iter(fitted.values())).info
                iters = [s.info.get("iterations", 0) for s in fitted.values()]
                rows.append({"n": n, "m": m, "mode": mode, "solver": name, "measured": _now(),
                             "fit_s": fit_s, "score_s": score_s,
                             "fit_cpu_s": fit_cpu_s, "score_cpu_s": score_cpu_s, "peak_here": local_peak,
                             **(floor_times if name == "identity" else {}),
                             "iterations_mean": sum(iters) / len(iters), "method": info.get("method"),
                             "schulz_float32_iterations": info.get("float32_iterations", 0),
                             "scores_head": [float(x) for x in scores[:64]]})
                print({k: v for k, v in rows[-1].items() if k != "scores_head"}, flush=True)
                del fitted, scores
        train.close()
        val.close()
    return rows


def spill_reads(n: int, blocks: int, rank: int, dim: int, chunk: int) -> dict[str, Any]:
    """hyperinf fit (standard mode: curvature = the training store) from RAM and from a spilled
    store: seconds and bytes read, against the store's size."""
    import torch

    from lightning_influence import scoring
    from lightning_influence.config import CurvatureConfig
    from lightning_influence.store import GradientStore

    out: dict[str, Any] = {"n": n}
    read = {"bytes": 0}
    original, original_into = GradientStore.block, getattr(GradientStore, "_read_into", None)

    def counting(self, name, rows=None):
        t = original(self, name, rows)
        if self.spilled:
            read["bytes"] += t.numel() * t.element_size()
        return t

    def counting_into(self, name, start, out):
        original_into(self, name, start, out)
        read["bytes"] += out.numel() * out.element_size()

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for kind, spill in (("ram", None), ("spilled", tmp)):
            train, val = make_stores(n, 8, blocks, rank, dim, spill_dir=spill)
            valid = torch.ones(n, dtype=torch.bool)
            GradientStore.block = counting
            if original_into is not None:
                GradientStore._read_into = counting_into
            try:
                read["bytes"] = 0
                out[f"{kind}_fit_s"] = _best(lambda: scoring.fit_solvers(
                    train, valid, "hyperinf", CurvatureConfig(), torch.device("cpu"), torch.float32, chunk), 1)
                out[f"{kind}_bytes_read_per_fit"] = read["bytes"] / 2
            finally:
                GradientStore.block = original
                if original_into is not None:
                    GradientStore._read_into = original_into
            out["store_bytes"] = train.nbytes
            train.close()
            val.close()
    out["spilled_reads_over_store"] = out["spilled_bytes_read_per_fit"] / out["store_bytes"]
    out["spilled_over_ram"] = out["spilled_fit_s"] / out["ram_fit_s"]
    return out


def schulz_vs_cholesky(blocks: int, rank: int, dim: int, m: int) -> dict[str, Any]:
    """hyperinf's inverse of the damped GFIM of every block from its Gram matrix: the Schulz
    iteration (as fitted) against a direct Cholesky inverse (``cholesky`` + ``cholesky_inverse``,
    float64), on the Gram matrices of ``m`` synthetic samples."""
    import torch

    from lightning_influence.solvers import make_solver

    train, _ = make_stores(m, 1, blocks, rank, dim)
    solvers = [make_solver("hyperinf", form="schulz") for _ in range(blocks)]  # "auto" is the Cholesky form now
    stats = [s.statistics(train.block(name)) for s, name in zip(solvers, train.names)]
    lam = [0.1 * float(train.block(name).double().pow(2).mean()) for name in train.names]
    cls = type(solvers[0])
    fit = getattr(cls, "fit_group", None)
    run = (lambda: fit(solvers, stats, [m] * blocks, lam)) if fit else \
        (lambda: [s.fit_statistics(st, m, damp) for s, st, damp in zip(solvers, stats, lam)])
    schulz_s = _best(run, 2)
    eye = torch.eye(dim, dtype=torch.float64)
    a = torch.stack([st["gram"].double() / m + damp * eye for st, damp in zip(stats, lam)])
    chol_s = _best(lambda: torch.cholesky_inverse(torch.linalg.cholesky(a)), 2)
    x_chol = torch.cholesky_inverse(torch.linalg.cholesky(a))
    diff = max(float((s._x.double() - xc).norm() / xc.norm()) for s, xc in zip(solvers, x_chol))
    train.close()
    return {"blocks": blocks, "d": dim, "schulz_s": schulz_s, "cholesky_s": chol_s,
            "iterations": solvers[0].info.get("iterations"),
            "float32_iterations": solvers[0].info.get("float32_iterations"),
            "schulz_over_cholesky": schulz_s / chol_s, "max_rel_diff": diff}


# --------------------------------------------------------------------------- flop counts

def flops(row: dict[str, Any], blocks: int, rank: int, dim: int) -> dict[str, dict[str, float]]:
    """Useful floating-point operations (multiply + add = 2) of each stage, all blocks, and the
    bytes of gradients each stage reads: ``{"fit": {...}, "score": {...}}`` with keys
    ``float32``, ``float64`` (flops in that precision) and ``bytes``. Symmetric products count
    as a symmetric rank-k update (half a general product); Cholesky ``k³/3``. Bytes: one read
    of the gradients a stage needs, except where the work is a chain of matrix-vector products
    over the same gradients, each needing the last one's result (no two can share a read):
    standard scoring with ``datainf`` and Woodbury ``exact`` reads the curvature gradients
    twice (``c = G v̄``, then ``Gᵀ c``) and the training gradients once."""
    n, m, mode, solver = row["n"], row["m"], row["mode"], row["solver"]
    d, big_d = dim, rank * dim
    curv = m if mode == "fvm" else n
    fit = {"float32": 0.0, "float64": 0.0, "bytes": 4.0 * curv * big_d}
    score = {"float32": 0.0, "float64": 0.0, "bytes": 4.0 * n * big_d}
    if solver == "identity":
        fit["bytes"] = 0.0
        score["float32"] = 2.0 * n * big_d
    elif solver == "datainf":
        fit["float32"] = 2.0 * curv * big_d                       # ‖g_i‖², and Σ g² for λ
        if mode == "fvm":                                         # ‖g‖² − Σ_i (g·g_i)²/(λ+‖g_i‖²)/N, fused
            score["float32"] = 2.0 * n * curv * big_d + 3.0 * n * curv
        else:                                                     # apply to v̄ (2 gemv) + one gemv
            score["float32"] = 4.0 * curv * big_d + 2.0 * n * big_d
            score["bytes"] += 8.0 * curv * big_d
    elif solver == "hyperinf":
        iters, f32_iters = row["iterations_mean"], row.get("schulz_float32_iterations", 0)
        fit["float32"] = 1.0 * curv * rank * d * (d + 1)          # Gram as a rank-k update, float32 products
        schulz = 4.0 * d ** 3                                     # A X, X R per iteration
        fit["float32"] += schulz * f32_iters
        # the first step X_1 = α(2I − αA) needs no product; then float32 steps, float64 steps, and
        # the final float64 residual check
        fit["float64"] = schulz * max(iters - f32_iters - 1, 0) + 2.0 * d ** 3
        if mode == "fvm":
            score["float32"] = 2.0 * n * rank * d * d + 2.0 * n * big_d
        else:
            score["float32"] = 2.0 * rank * d * d + 2.0 * n * big_d
    elif solver == "exact":
        if curv < big_d:                                          # Woodbury on the curv × curv Gram
            fit["float32"] = 1.0 * curv * curv * big_d + curv ** 3 / 3.0   # GGᵀ, its float32 Cholesky
            if mode == "fvm":                                     # ‖g‖² − ‖L⁻¹ G g‖², fused
                score["float32"] = 2.0 * n * curv * big_d + 1.0 * n * curv * curv
            else:
                score["float32"] = 4.0 * curv * big_d + 2.0 * curv * curv + 2.0 * n * big_d
                score["bytes"] += 8.0 * curv * big_d
        else:                                                     # dense D × D
            fit["float32"] = 1.0 * curv * big_d * big_d + big_d ** 3 / 3.0  # GᵀG, its float32 Cholesky
            if mode == "fvm":                                     # ‖L⁻¹ g‖²
                score["float32"] = 1.0 * n * big_d * big_d
            else:
                score["float32"] = 2.0 * big_d * big_d + 2.0 * n * big_d
    return {k: {kk: vv * blocks for kk, vv in v.items()} for k, v in (("fit", fit), ("score", score))}


def analyse(rows, peak, blocks, rank, dim, before: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    key = lambda r: (r["n"], r["mode"], r["solver"])  # noqa: E731
    old = {key(r): r for r in before or []}
    out = []
    for row in rows:
        counts = flops(row, blocks, rank, dim)
        entry = dict(row)
        entry.pop("scores_head", None)
        here = {**peak, **row.get("peak_here", {})}  # the peak measured just before this row, if any
        # two clocks: wall seconds against the wall-clock peak, and this process's CPU seconds against
        # the CPU-time peak (one thread: the time the stage actually ran, whatever else shares the cores)
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            if f"fit{suffix}_s" not in row or f"mm_float32_gflops{suffix}" not in here:
                continue
            for stage in ("fit", "score"):
                c, seconds = counts[stage], row[f"{stage}{suffix}_s"]
                ideal_flops = (c["float32"] / here[f"mm_float32_gflops{suffix}"]
                               + c["float64"] / here[f"mm_float64_gflops{suffix}"])
                ideal_bytes = c["bytes"] / here.get(f"read_gbs{suffix}", peak["read_gbs"])
                total = c["float32"] + c["float64"]
                entry[f"{stage}_gflop"] = total / 1e9
                entry[f"{stage}_gflops{suffix}"] = total / seconds / 1e9 if seconds > 0 else 0.0
                entry[f"{stage}_peak_fraction{suffix}"] = ideal_flops / 1e9 / seconds if seconds > 0 else 0.0
                entry[f"{stage}_roofline_fraction{suffix}"] = (max(ideal_flops / 1e9, ideal_bytes / 1e9) / seconds
                                                               if seconds > 0 else 0.0)
                entry[f"{stage}_memory_bound"] = ideal_bytes > ideal_flops
        cpu = "fit_cpu_s" in row
        entry["dominant"] = ("fit" if (row["fit_cpu_s"] >= row["score_cpu_s"] if cpu
                                       else row["fit_s"] >= row["score_s"])
                             else "score")
        entry["total_s"] = row["fit_s"] + row["score_s"]
        if cpu:
            entry["total_cpu_s"] = row["fit_cpu_s"] + row["score_cpu_s"]
        if "mm_floor_s" in row:  # identity against one plain torch.mm of the same gradients
            entry["over_mm_floor"] = entry["total_s"] / row["mm_floor_s"]
            if cpu:
                entry["over_mm_floor_cpu"] = entry["total_cpu_s"] / row["mm_floor_cpu_s"]
        if key(row) in old:
            o = old[key(row)]
            entry["before_fit_s"], entry["before_score_s"] = o["fit_s"], o["score_s"]
            entry["before_total_s"] = o["fit_s"] + o["score_s"]
            entry["speedup"] = entry["before_total_s"] / entry["total_s"]
            if "fit_cpu_s" in o and cpu:  # the speedup in CPU seconds: unmoved by the other jobs' load
                entry["before_fit_cpu_s"], entry["before_score_cpu_s"] = o["fit_cpu_s"], o["score_cpu_s"]
                entry["before_total_cpu_s"] = o["fit_cpu_s"] + o["score_cpu_s"]
                entry["speedup_cpu"] = entry["before_total_cpu_s"] / entry["total_cpu_s"]
            a, b = row.get("scores_head"), o.get("scores_head")
            if a and b:
                import torch
                a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
                # the standard scores can be ~0 (a sum of signed terms): relative to the largest one
                entry["max_rel_diff_vs_before"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        out.append(entry)
    return out


def run_before(rev: str, args, ns: list[int]) -> list[dict[str, Any]] | None:
    """The measurements with the package at git revision ``rev`` (a subprocess importing
    ``lightning_influence`` from ``git archive rev``)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            archive = subprocess.run(["git", "archive", rev, "lightning_influence"], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            print(f"--before {rev}: cannot extract the package ({err}); skipped", flush=True)
            return None
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, "--ns", *map(str, ns), "--m", str(args.m),
               "--blocks", str(args.blocks), "--rank", str(args.rank), "--dim", str(args.dim),
               "--chunk", str(args.chunk), "--threads", str(args.threads), "--solvers", *args.solvers,
               "--modes", *args.modes]
        env = {**os.environ, "PYTHONPATH": tmp + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run(cmd, env=env, check=True)
        with open(out) as fh:
            return json.load(fh)


def reference_status(path: str | None) -> str:
    if not path:
        return ("not run: the HyperINF reference repository is not available on this machine (no internet; "
                "pass --reference DIR with a clone of it to compare)")
    if not os.path.isdir(path):
        return f"not run: --reference {path} is not a directory"
    return (f"not run: a reference clone is at {path}, but its IFEngine adapter is not part of this "
            "benchmark yet (it was written without access to the repository)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--m", type=int, default=1000, help="validation samples (the fvm curvature)")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=4096, help="rows per scoring/fitting chunk")
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", default=None, help="git revision to measure as 'ours-before'")
    parser.add_argument("--before-ns", type=int, nargs="+", default=None, help="n values for --before (default: --ns)")
    parser.add_argument("--spill-n", type=int, default=4000, help="n of the spilled-store measurement (0: skip)")
    parser.add_argument("--reference", default=None, help="a clone of the HyperINF reference repository")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "roofline.json"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--reanalyse", default=None, help="recount the flops of a previous results file")
    parser.add_argument("--merge", default=None,
                        help="a previous results file: its rows that this run does not re-measure are kept")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.ns, args.m, args.blocks, args.dim, args.chunk = [200, 400], 100, 4, 32, 128
        args.spill_n = 300
        args.before_ns = args.before_ns or [200]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)  # scipy's BLAS (if the solvers use it) at the same thread count
    except ImportError:
        pass
    if args.worker:
        import lightning_influence
        print(f"worker: lightning_influence from {os.path.dirname(lightning_influence.__file__)}", flush=True)
        rows = measure(args.ns, args.m, args.blocks, args.rank, args.dim, args.solvers, args.modes, args.chunk)
        with open(args.worker, "w") as fh:
            json.dump(rows, fh)
        return

    from common import machine_info, now, write_results  # noqa: E402

    started = time.perf_counter()
    command = " ".join(["python benchmarks/roofline.py"] + sys.argv[1:])
    if args.reanalyse:  # recount the flops of a previous run's measurements (no new timing)
        with open(args.reanalyse) as fh:
            old = json.load(fh)
        peak, peak_after, spill, inverse = old["peak"], old["peak_after"], old["spill"], old["inverse"]
        opts = old["options"]
        args.blocks, args.rank, args.dim, args.m, args.threads = (opts[k] for k in ("blocks", "rank", "dim", "m",
                                                                                    "threads"))
        args.before, args.reference = opts.get("before"), opts.get("reference")
        rows = old["entries"]
        before = [{"n": e["n"], "mode": e["mode"], "solver": e["solver"], "fit_s": e["before_fit_s"],
                   "score_s": e["before_score_s"],
                   **({"fit_cpu_s": e["before_fit_cpu_s"], "score_cpu_s": e["before_score_cpu_s"]}
                                                      if "before_fit_cpu_s" in e else {})}
                  for e in rows if "before_fit_s" in e] or None
        command = old["tables"][0]["command"] + f" (flops recounted by: {command})"
        machine = old["tables"][0]["machine"]
    else:
        peak = machine_peak(1024 if args.quick else 3072)
        print("peak", peak, flush=True)
        rows = measure(args.ns, args.m, args.blocks, args.rank, args.dim, args.solvers, args.modes, args.chunk,
                       floor=True)
        before = run_before(args.before, args, args.before_ns or args.ns) if args.before else None
        spill = spill_reads(args.spill_n, args.blocks, args.rank, args.dim, args.chunk) if args.spill_n else None
        if args.merge:  # keep the rows of a previous results file that this run did not re-measure
            with open(args.merge) as fh:
                old = json.load(fh)
            fresh = {(r["n"], r["mode"], r["solver"]) for r in rows}
            kept = [e for e in old["entries"] if (e["n"], e["mode"], e["solver"]) not in fresh]
            order = {k: i for i, k in enumerate((e["n"], e["mode"], e["solver"]) for e in old["entries"])}
            rows = sorted(kept + rows, key=lambda r: (r["n"], order.get((r["n"], r["mode"], r["solver"]), 1 << 20)))
            spill = spill or old.get("spill")
            if before is None:  # the previous run's ours-before measurements still stand for re-measured rows
                before = [{"n": e["n"], "mode": e["mode"], "solver": e["solver"], "fit_s": e["before_fit_s"],
                           "score_s": e["before_score_s"],
                           **({"fit_cpu_s": e["before_fit_cpu_s"], "score_cpu_s": e["before_score_cpu_s"]}
                              if "before_fit_cpu_s" in e else {})}
                          for e in old["entries"] if "before_fit_s" in e] or None
                args.before = args.before or old["options"].get("before")
            command = old["tables"][0]["command"].split(" (rows ")[0] + f" (rows re-measured by: {command})"
        inverse = schulz_vs_cholesky(args.blocks, args.rank, args.dim, args.m)
        print("schulz vs cholesky", inverse, flush=True)
        peak_after = machine_peak(1024 if args.quick else 3072)  # the machine is shared: bracket the run
        machine = machine_info()
    entries = analyse(rows, peak, args.blocks, args.rank, args.dim, before)
    if args.reanalyse:
        for e, r in zip(entries, rows):
            if "max_rel_diff_vs_before" in r:
                e["max_rel_diff_vs_before"] = r["max_rel_diff_vs_before"]
    shape = f"{args.blocks} blocks of {args.rank}×{args.dim}, m = {args.m} validation samples, float32 store"
    columns = ["n", "mode", "solver", "measured", "fit s", "score s", "fit CPU s", "score CPU s", "dominant",
               "GFLOP/s (dominant, CPU)", "% of peak (dominant, CPU)", "% of peak (dominant, wall)",
               "% of roofline (dominant, CPU)", "identity / one torch.mm (CPU)"]
    if before:
        columns += ["before CPU s (fit+score)", "speedup (CPU)"]
    table_rows = []
    for e in entries:
        dom = e["dominant"]
        cpu = "_cpu" if f"{dom}_peak_fraction_cpu" in e else ""
        row = [e["n"], e["mode"], e["solver"], e.get("measured", "")[:16].replace("T", " "),
               f"{e['fit_s']:.3f}", f"{e['score_s']:.3f}",
               f"{e['fit_cpu_s']:.3f}" if "fit_cpu_s" in e else "",
               f"{e['score_cpu_s']:.3f}" if "fit_cpu_s" in e else "",
               dom + (" (memory-bound)" if e[f"{dom}_memory_bound"] else ""),
               f"{e[f'{dom}_gflops{cpu}']:.1f}", f"{100 * e[f'{dom}_peak_fraction{cpu}']:.0f}" if cpu else "",
               f"{100 * e[f'{dom}_peak_fraction']:.0f}", f"{100 * e[f'{dom}_roofline_fraction{cpu}']:.0f}",
               f"{e['over_mm_floor' + cpu]:.2f}" if "over_mm_floor" in e else ""]
        if before:
            bt, sp = ("before_total_cpu_s", "speedup_cpu") if "speedup_cpu" in e else ("before_total_s", "speedup")
            row += [f"{e[bt]:.3f}" if bt in e else "", f"{e[sp]:.2f}×" if sp in e else ""]
        table_rows.append(row)
    notes = [f"machine peak at the start: torch.mm {peak['mm_float32_gflops']:.1f} GFLOP/s float32, "
             f"{peak['mm_float64_gflops']:.1f} GFLOP/s float64, read {peak['read_gbs']:.1f} GB/s; at the end: "
             f"{peak_after['mm_float32_gflops']:.1f} / {peak_after['mm_float64_gflops']:.1f} GFLOP/s, "
             f"{peak_after['read_gbs']:.1f} GB/s ({args.threads} thread(s)); per CPU second: "
             f"{peak.get('mm_float32_gflops_cpu', float('nan')):.1f} / "
             f"{peak.get('mm_float64_gflops_cpu', float('nan')):.1f} "
             f"GFLOP/s at the start, {peak_after.get('mm_float32_gflops_cpu', float('nan')):.1f} / "
             f"{peak_after.get('mm_float64_gflops_cpu', float('nan')):.1f} at the end",
             "% of peak = (flops in float32 / float32 peak + flops in float64 / float64 peak) / measured seconds, "
             "with the peak of a 2048² torch.mm measured just before each row (other jobs share this machine); "
             "CPU: both the stage and the peak timed in this process's CPU seconds (time.process_time; one thread, "
             "so the time it actually ran while other jobs took turns on the cores), wall: both in wall-clock "
             "seconds; "
             "useful flops: a Gram matrix counts as a symmetric rank-k update (half a general product), "
             "Cholesky k³/3; % of roofline also allows for the bytes of gradients read at the read bandwidth "
             "(a 512 MiB sum) measured with each row's peak",
             "fvm: curvature from the m validation gradients, every training sample scored by its quadratic form; "
             "standard: curvature from the n training gradients, scores = −v̄ᵀ(C+λI)⁻¹g_i (matrix-vector work: "
             "memory-bound by construction)",
             "identity / one torch.mm: identity's fit + score seconds over those of one plain torch.mm of the same "
             "n training gradients as one (n, P) matrix with the mean validation gradient (P, 1), the floor any "
             "implementation (the HyperINF reference's included) pays: one read of every gradient",
             "HyperINF reference: " + reference_status(args.reference)]
    if before:
        notes.append(f"before = this package at git revision {args.before} (ours-before, same gradients, "
                     "run in a subprocess of this run), not the HyperINF reference")
    tables = [{"title": "Solve and score stages against the machine's matmul peak", "machine": machine, "date": now(),
               "command": command, "columns": columns, "rows": table_rows, "notes": [shape] + notes}]
    if spill:
        tables.append({"title": "Fitting from a spilled store (hyperinf, standard mode: curvature = training store)",
                       "machine": machine, "date": now(), "command": command,
                       "columns": ["n", "store MiB", "RAM fit s", "spilled fit s", "spilled / RAM",
                                   "bytes read per fit / store size"],
                       "rows": [[spill["n"], f"{spill['store_bytes'] / 2**20:.0f}", f"{spill['ram_fit_s']:.3f}",
                                 f"{spill['spilled_fit_s']:.3f}", f"{spill['spilled_over_ram']:.2f}",
                                 f"{spill['spilled_reads_over_store']:.2f}"]],
                       "notes": ["spilled files are read from the page cache here (warm), not a cold disk"]})
    tables.append({"title": "hyperinf's d×d inverse: Schulz iteration against a direct Cholesky inverse (CPU)",
                   "machine": machine, "date": now(), "command": command,
                   "columns": ["blocks", "d", "Schulz s (as fitted)", "iterations (float32 ones)",
                               "Cholesky inverse s (float64)", "Schulz / Cholesky", "max rel. diff of X"],
                   "rows": [[inverse["blocks"], inverse["d"], f"{inverse['schulz_s']:.3f}",
                             f"{inverse['iterations']} ({inverse['float32_iterations']})",
                             f"{inverse['cholesky_s']:.3f}",
                             f"{inverse['schulz_over_cholesky']:.1f}", f"{inverse['max_rel_diff']:.1e}"]],
                   "notes": ["Schulz: ~4d³ flops per iteration; Cholesky + inverse: ~d³ in all. On a CPU the direct "
                             "inverse is faster; the Schulz iteration is kept (HyperINF's method: all matrix products, "
                             "which a GPU runs near its peak)"]})
    result = {"tables": tables, "inverse": inverse, "peak": peak, "peak_after": peak_after, "entries": entries,
              "spill": spill,
              "reference": reference_status(args.reference), "options": vars(args),
              "wall_seconds": time.perf_counter() - started}
    write_results(result, args.out)


if __name__ == "__main__":
    main()
