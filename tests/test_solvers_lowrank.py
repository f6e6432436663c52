"""HyperINF's low-rank (Woodbury) form against the dense GFIM inverse it claims to equal, batched,
streamed, split over two ranks; its chooser; the solvers' memory estimates against measured peaks."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from lightning_influence.config import CurvatureConfig
from lightning_influence.scoring import fit_solvers, self_influence
from lightning_influence.solvers import SOLVERS, datainf_damping, make_solver
from lightning_influence.solvers._lowrank import choose_form
from lightning_influence.store import GradientStore

CPU = torch.device("cpu")


def lowrank_problem(n=6, r=3, d=40, rank=5, m=7, seed=0, dtype=torch.float64):
    """``n`` gradients ``(r, d)`` whose rows span only ``rank`` directions (plus a little noise),
    and ``m`` vectors partly inside that span: the regime of LoRA gradients (``n·r < d``)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=gen, dtype=dtype) * torch.logspace(0, 1, d, dtype=dtype)
    coef = torch.randn(n, r, rank, generator=gen, dtype=dtype) * torch.logspace(1, -2, rank, dtype=dtype)
    grads = coef @ basis + 1e-3 * torch.randn(n, r, d, generator=gen, dtype=dtype)
    vecs = torch.randn(m, r, rank, generator=gen, dtype=dtype) @ basis + 0.1 * torch.randn(m, r, d, generator=gen,
                                                                                           dtype=dtype)
    return grads, vecs, datainf_damping(grads)


def gfim_apply(grads, vecs, lam):
    """``v A^{-1}`` with the dense ``d × d`` damped GFIM, by LU (the independent reference)."""
    d = grads.shape[-1]
    gm = grads.reshape(-1, d)
    a = gm.T @ gm / grads.shape[0] + lam * torch.eye(d, dtype=grads.dtype)
    return torch.linalg.solve(a, vecs.transpose(-1, -2)).transpose(-1, -2)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_lowrank_apply_and_quadratic_equal_the_dense_inverse():
    grads, vecs, lam = lowrank_problem()
    low = make_solver("hyperinf").fit(grads, lam)
    assert low.info["form"] == "lowrank" and low.info["rank"] == 18 and low._x is None
    assert low.info["residual"] < 1e-10  # the probed ‖A X − I‖_F/√d
    want = gfim_apply(grads, vecs, lam)
    assert rel(low.apply(vecs), want) < 1e-10
    want_q = (vecs * want).sum((1, 2))
    # Q comes from the eigenvectors of GGᵀ: its rows for the smallest singular values are
    # orthonormal to ~ε·σ_max/σ_k (here ~1e-10), the quadratic form's float64 accuracy
    assert torch.allclose(low.quadratic(vecs), want_q, rtol=1e-8, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense iteration may stall at its rounding floor
        dense = make_solver("hyperinf", form="schulz").fit(grads, lam)
    assert dense.info["form"] == "schulz" and dense._w is None
    # the Schulz iteration converges to the same inverse (to its tolerance, times κ(A))
    assert rel(dense.apply(vecs), want) < 1e-6
    assert torch.allclose(dense.quadratic(vecs), low.quadratic(vecs), rtol=1e-6)


def test_lowrank_float32_keeps_float32_and_its_accuracy_where_the_vectors_lie_in_the_span():
    """float32 gradients: the inverse is computed in float64 and kept in float32; the quadratic
    form is a sum of non-negative terms, so it keeps float32's accuracy even for vectors almost
    inside the span of the curvature gradients (‖v‖²/(λ q) in the thousands here), where the
    Cholesky form ``(‖v‖² − ‖L^{-1}G vᵀ‖²)/λ`` loses it to cancellation."""
    gen = torch.Generator().manual_seed(3)
    basis = torch.randn(16, 768, generator=gen, dtype=torch.float64)
    weight = torch.logspace(1, -2, 16, dtype=torch.float64)
    grads = ((torch.randn(48, 8, 16, generator=gen, dtype=torch.float64) * weight) @ basis
             + 0.01 * torch.randn(48, 8, 768, generator=gen, dtype=torch.float64)).float()
    vecs = ((torch.randn(32, 8, 16, generator=gen, dtype=torch.float64) * weight) @ basis
            + 0.1 * torch.randn(32, 8, 768, generator=gen, dtype=torch.float64)).float()
    lam = datainf_damping(grads)
    want = (vecs.double() * gfim_apply(grads.double(), vecs.double(), lam)).sum((1, 2))
    assert float((vecs.double().pow(2).sum((1, 2)) / (lam * want)).max()) > 1e3  # the cancellation regime
    low = make_solver("hyperinf").fit(grads, lam)
    assert low.info["form"] == "lowrank"
    assert low._w.dtype == torch.float32 and low.apply(vecs).dtype == torch.float32
    got = low.quadratic(vecs)
    assert got.dtype == torch.float32
    assert float(((got.double() - want).abs() / want).max()) < 1e-5


def test_lowrank_group_fit_and_quadratic_group_match_single_blocks():
    probs = [lowrank_problem(seed=s) for s in range(4)]
    cls = SOLVERS["hyperinf"]
    # group_bytes=1: every block in its own batch; default: one batch of four
    for group_bytes in (1, 256 << 20):
        group = [make_solver("hyperinf", group_bytes=group_bytes) for _ in probs]
        for s, (g, _, _) in zip(group, probs):
            s.plan(*g.shape)
        cls.fit_group(group, [s.statistics(g) for s, (g, _, _) in zip(group, probs)],
                      [g.shape[0] for g, _, _ in probs], [lam for _, _, lam in probs])
        vecs = torch.stack([v for _, v, _ in probs])
        q = cls.quadratic_group(group, vecs)
        for i, (g, v, lam) in enumerate(probs):
            want = gfim_apply(g, v, lam)
            assert group[i].info["form"] == "lowrank"
            assert rel(group[i].apply(v), want) < 1e-10
            assert torch.allclose(q[i], (v * want).sum((1, 2)), rtol=1e-8, atol=0)
    # a group mixing both forms (same shape, form fixed per solver) scores each block by its own
    mixed = [make_solver("hyperinf", form=f).fit(g, lam) for f, (g, _, lam) in zip(["lowrank", "schulz"], probs)]
    q = cls.quadratic_group(mixed, torch.stack([probs[0][1], probs[1][1]]))
    for i in range(2):
        g, v, lam = probs[i]
        assert torch.allclose(q[i], (v * gfim_apply(g, v, lam)).sum((1, 2)), rtol=1e-6)


def test_chooser_picks_lowrank_when_rows_are_fewer_than_d():
    assert choose_form(48, 8, 3072) == "lowrank"     # GPT-2 MLP LoRA, 48 validation samples
    assert choose_form(48, 8, 768) == "lowrank"      # 384 rows < 768
    assert choose_form(100, 8, 768) == "direct"      # 800 rows > 768: the dense X, by Cholesky
    assert choose_form(1000, 16, 11008) == "direct"  # 16,000 rows > 11,008
    assert choose_form(100, 16, 4096) == "lowrank"
    for n, r, d in [(5, 2, 9), (5, 2, 10), (5, 2, 11), (30, 1, 29), (30, 1, 31)]:
        assert (choose_form(n, r, d) == "lowrank") == (n * r <= d)
    assert make_solver("hyperinf").plan(7, 2, 50) == "lowrank"
    with pytest.raises(ValueError, match="form"):
        make_solver("hyperinf", form="dense")


@pytest.mark.parametrize("spill", [False, True])
def test_streamed_fit_plans_per_block_and_matches_the_dense_inverse(tmp_path, spill):
    """fit_solvers plans each block from N, r, d before reading, streams the gradients in chunks
    (several per block; from a spilled store too), and scores equal the dense inverse's."""
    low_g, _, _ = lowrank_problem(n=15, r=2, d=40, seed=1)       # 15·2 = 30 rows <= 40: low-rank
    gen = torch.Generator().manual_seed(2)
    dense_g = torch.randn(15, 3, 6, generator=gen, dtype=torch.float64)  # 45 rows > 6: direct
    data = {"low": low_g, "dense": dense_g}
    store = GradientStore(15, {k: tuple(v.shape[1:]) for k, v in data.items()}, torch.float64,
                          max_memory=0 if spill else None, spill_dir=str(tmp_path))
    store.write(0, data)
    valid = torch.ones(15, dtype=torch.bool)
    valid[4] = False
    solvers = fit_solvers(store, valid, "hyperinf", CurvatureConfig(), CPU, torch.float64, 4)
    assert solvers["low"].info["form"] == "lowrank" and solvers["low"].info["rank"] == 28
    assert solvers["dense"].info["form"] == "direct"
    scores = self_influence(store, solvers, 6, CPU, torch.float64)
    want = torch.zeros(15, dtype=torch.float64)
    for k, g in data.items():
        lam = 0.1 * float(g[valid].pow(2).mean())
        want += (g * gfim_apply(g[valid], g, lam)).sum((1, 2))
    assert torch.allclose(scores, want, rtol=1e-7)
    store.close()


class ThreadCollectives:
    """The collectives of one of ``world`` ranks run as threads of this process: the same
    semantics as the gloo group's (a sum; a concatenation in rank order, sizes may differ)."""

    def __init__(self, rank: int, world: int, slots: list, barrier) -> None:
        self.rank, self.world_size, self.slots, self.barrier = rank, world, slots, barrier

    def _exchange(self, tensor):
        self.slots[self.rank] = tensor.clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()
        return parts

    def all_reduce_sum(self, tensor):
        return torch.stack(self._exchange(tensor)).sum(0)

    def all_gather_cat(self, tensor):
        return torch.cat(self._exchange(tensor))


def test_two_ranks_fit_the_same_lowrank_inverse_as_one_process():
    """11 samples split 6/5 over two ranks, blocks of 2 x 22: the plan must count N over both
    ranks (22 rows <= 22: low-rank on each; a rank's own 6 x 2 guess would say Schulz, the other's
    low-rank, and their collectives would not match), and every rank fits the one-process inverse."""
    import threading

    from lightning_influence.distributed import shard_ids

    data = {f"b{i}": lowrank_problem(n=11, r=2, d=22, seed=i)[0] for i in range(2)}
    slots, barrier, out = [None, None], threading.Barrier(2, timeout=60), {}

    def rank_main(rank):
        ids = shard_ids(11, rank, 2)
        shard = {k: v[ids] for k, v in data.items()}
        store = GradientStore(len(ids), {k: tuple(v.shape[1:]) for k, v in shard.items()}, torch.float64)
        store.write(0, shard)
        out[rank] = fit_solvers(store, torch.ones(len(ids), dtype=torch.bool), "hyperinf", CurvatureConfig(), CPU,
                                torch.float64, 4, ThreadCollectives(rank, 2, slots, barrier))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(out) == [0, 1]
    probe = torch.stack([v[:4] for v in data.values()])
    for solvers in out.values():
        assert [s.info["form"] for s in solvers.values()] == ["lowrank", "lowrank"]
        q = SOLVERS["hyperinf"].quadratic_group(list(solvers.values()), probe)
        for i, g in enumerate(data.values()):
            want = (probe[i] * gfim_apply(g, probe[i], 0.1 * float(g.pow(2).mean()))).sum((1, 2))
            assert torch.allclose(q[i], want, rtol=1e-9)


MEASURE = r"""
import json, sys, types, torch
pkg = types.ModuleType("lightning_influence")  # the solvers alone: skip the package's heavy imports
pkg.__path__ = [sys.argv[7]]
sys.modules["lightning_influence"] = pkg
from lightning_influence.solvers import SOLVERS, make_solver
torch.set_num_threads(1)
name, n, r, d, blocks, m = sys.argv[1], *map(int, sys.argv[2:7])
options = json.loads(sys.argv[8])
grads = [torch.randn(n, r, d) for _ in range(blocks)]
vecs = torch.randn(blocks, m, r, d)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
solvers = [make_solver(name, **options) for _ in grads]
for s, g in zip(solvers, grads):
    s._out_dtype = g.dtype
    s.plan(n, r, d)
stats = [s.statistics(g) for s, g in zip(solvers, grads)]
type(solvers[0]).fit_group(solvers, stats, [n] * blocks, [0.1 * float(g.pow(2).mean()) for g in grads])
del stats
q = type(solvers[0]).quadratic_group(solvers, vecs)
est = solvers[0].estimate_bytes([(r, d)] * blocks, n, 4, gathered=False)
print(json.dumps({"peak": rss("VmHWM:") - base, "estimate": est, "form": solvers[0].info.get("form")}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("name,shape,form", [("hyperinf", (48, 8, 3072, 6, 64), "lowrank"),
                                             ("hyperinf", (48, 8, 3072, 12, 128), "lowrank"),
                                             ("hyperinf", (200, 8, 768, 3, 64), "direct"),
                                             ("hyperinf", (200, 8, 768, 12, 64), "direct"),
                                             ("hyperinf", (200, 8, 768, 3, 64), "schulz")])
def test_estimate_bytes_is_within_a_quarter_of_the_measured_peak(name, shape, form):
    """The fit + quadratic form of several blocks, in a fresh process: growth of the peak RSS
    (VmHWM reset after the gradients exist; they are the store's, not the solve's).

    The dense forms' buffers (4.5 MiB each) are under glibc's dynamic mmap threshold (up to
    32 MiB), so its heap keeps freed ones and the RSS peak reads ~1.1-1.4x the live bytes at this
    shape; they are measured with that threshold at 64 KiB, i.e. the live bytes. At the shapes
    where the solve's memory matters (d >= 2048: buffers over 32 MiB) every buffer is mmapped and
    freed back, as in the low-rank cases, measured with glibc's defaults."""
    import lightning_influence

    folder = os.path.dirname(lightning_influence.__file__)
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if form != "lowrank" else {}))
    options = json.dumps({"form": "schulz"} if form == "schulz" else {})  # the others: as "auto" picks
    out = subprocess.run([sys.executable, "-c", MEASURE, name, *map(str, shape), folder, options], capture_output=True,
                         text=True, timeout=120, check=True, env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["form"] == form
    assert 0.75 * got["peak"] <= got["estimate"] <= 1.25 * got["peak"], got
