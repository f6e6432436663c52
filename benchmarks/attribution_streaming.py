"""Cost and peak memory of streaming attribution: m queries x n training samples, top-k per query.

Synthetic per-sample gradients at MiniLM-sized LoRA blocks (r=8, hidden 384: lora_A and lora_Bᵀ of
query and value in one layer = 4 blocks of (8, 384), 12,288 numbers per sample; the shapes of
``store_memory.py``), the training store in float16 spilled to disk (its RAM is not the question),
the m query gradients in memory. HyperINF is fitted on the query gradients (fvm's curvature: the
validation gradients), then :func:`lightning_influence.attribution.streaming_top_k` names the k
most helpful and most harmful training samples of every query: one pass over the store, a
``torch.topk`` per (m, chunk) block, never the (m, n) matrix (which would take m·n·8 bytes in
float64, as ``per_validation=True`` returns it).

Each run is a fresh process; the peak RSS growth over the attribution stage is sampled every 2 ms
by a thread (and the kernel's ``ru_maxrss`` for the whole process is recorded).

Run: python benchmarks/attribution_streaming.py [--n 100000] [--m 1000] [--k 10] [--quick]
Writes benchmarks/results/attribution_streaming_<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import torch

import common
from common import provenance, write_results

SHAPES = {f"layer0.{m}.lora_{ab}": (8, 384) for m in ("query", "value") for ab in ("A", "B")}
MIB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest RSS seen (sampled every 2 ms) while inside the ``with`` block."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def one_run(n: int, m: int, k: int, chunk: int, solver: str) -> dict:
    """Build the store, fit, attribute; report seconds and memory (called in a fresh process)."""
    from lightning_influence.attribution import streaming_top_k
    from lightning_influence.config import CurvatureConfig
    from lightning_influence.scoring import fit_solvers
    from lightning_influence.store import GradientStore

    torch.manual_seed(0)
    device, dtype = torch.device("cpu"), torch.float32
    # queries: a low-rank signal plus noise, like real gradients (a few directions dominate)
    basis = {name: torch.randn(16, r * d) / (r * d) ** 0.5 for name, (r, d) in SHAPES.items()}

    def draw(count: int, gen: torch.Generator) -> dict:
        return {name: (torch.randn(count, 16, generator=gen) @ b + 0.1 * torch.randn(count, b.shape[1], generator=gen))
                .reshape(count, *SHAPES[name]) for name, b in basis.items()}

    queries = draw(m, torch.Generator().manual_seed(1))
    folder = tempfile.mkdtemp(prefix="attr-bench-")
    out = {"n": n, "m": m, "k": k, "chunk_rows": chunk, "solver": solver, "numbers_per_sample": sum(
        r * d for r, d in SHAPES.values()), "store_dtype": "float16"}
    t0 = time.perf_counter()
    train = GradientStore(n, SHAPES, torch.float16, max_memory=0, spill_dir=folder)
    gen = torch.Generator().manual_seed(2)
    for s in range(0, n, 5000):  # training rows: plain Gaussian (their structure does not change the cost)
        train.write(s, {name: torch.randn(min(5000, n - s), *shape, generator=gen) for name, shape in SHAPES.items()})
    out["write_store_s"] = time.perf_counter() - t0
    out["store_gib_on_disk"] = train.nbytes / 2**30
    with GradientStore(m, SHAPES, dtype) as val:
        val.write(0, queries)
        t0 = time.perf_counter()
        solvers = fit_solvers(val, torch.ones(m, dtype=torch.bool), solver, CurvatureConfig(), device, dtype, 1024)
        out["fit_s"] = time.perf_counter() - t0
    ids, valid = torch.arange(n), torch.ones(n, dtype=torch.bool)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        harm_s, harm_i, help_s, help_i = streaming_top_k(train, queries, solvers, ids, valid, k, chunk, device, dtype)
        out["attribution_s"] = time.perf_counter() - t0
    train.close()
    out["attribution_peak_rss_growth_mib"] = (peak.peak - peak.start) / MIB
    out["rss_before_attribution_mib"] = peak.start / MIB
    out["process_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["dense_matrix_float64_mib"] = m * n * 8 / MIB
    # the working set the algorithm needs: a chunk of training rows (float16 read + float32 copy),
    # the (m, P) query directions, one (m, chunk) score block and its negation, the running top-k
    p = out["numbers_per_sample"]
    out["working_set_mib"] = (chunk * p * (2 + 4) + m * p * 4 + 2 * m * chunk * 4 + 4 * m * 2 * k * 8) / MIB
    out["gflop"] = 2 * m * n * p / 1e9
    out["gflops_per_s"] = out["gflop"] / out["attribution_s"]
    out["result_shapes"] = [list(harm_i.shape), list(help_i.shape)]
    out["checks"] = {"harmful_sorted": bool((harm_s[:, :-1] >= harm_s[:, 1:]).all()),
                     "helpful_sorted": bool((help_s[:, :-1] <= help_s[:, 1:]).all())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--m", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=2048, help="training rows per chunk")
    parser.add_argument("--solver", default="hyperinf")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="n=5,000, m=100, a temporary --out (tests)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="default benchmarks/results/attribution_streaming_DATE.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.m = 5000, 100
    if args.child:
        print(json.dumps(one_run(args.n, args.m, args.k, args.chunk, args.solver)))
        return
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--n", str(args.n), "--m", str(args.m), "--k",
            str(args.k), "--chunk", str(args.chunk), "--solver", args.solver]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    run = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    result = {**provenance(__file__), "torch_threads": args.threads or torch.get_num_threads(), "run": run}
    stamp = result.get("date", time.strftime("%Y-%m-%d"))[:10]
    if args.quick and not args.out:  # a smoke run: never into benchmarks/results
        import tempfile

        args.out = os.path.join(tempfile.gettempdir(), "attribution_streaming_quick.json")
    path = args.out or os.path.join(common.RESULTS, f"attribution_streaming_{stamp}.json")
    write_results(result, path)
    print(json.dumps(run, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
