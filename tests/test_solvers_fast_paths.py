"""The fast paths agree with the plain ones: fused quadratic forms, batched fitting, one-pass
chunking of the store, LiSSA's work budget."""
import warnings

import pytest
import torch

from lightning_influence.config import CurvatureConfig
from lightning_influence.scoring import fit_solvers, self_influence
from lightning_influence.solvers import datainf_damping, make_solver
from lightning_influence.store import GradientStore


def problem(n=30, r=2, d=6, m=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, r, d, generator=gen, dtype=dtype) * torch.logspace(-1, 1, d, dtype=dtype)
    vecs = torch.randn(m, r, d, generator=gen, dtype=dtype)
    return grads, vecs, datainf_damping(grads)


@pytest.mark.parametrize("name", ["identity", "datainf", "hyperinf", "exact", "lissa"])
@pytest.mark.parametrize("n", [5, 60])  # exact: Woodbury, dense
def test_quadratic_matches_apply(name, n):
    grads, vecs, lam = problem(n=n)
    solver = make_solver(name).fit(grads, lam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = (vecs * solver.apply(vecs)).sum((1, 2))
        got = solver.quadratic(vecs)
        group = type(solver).quadratic_group([solver, solver], torch.stack([vecs, vecs]))
    assert got.shape == (vecs.shape[0],)
    assert torch.allclose(got, expected, rtol=1e-9, atol=0)
    assert torch.allclose(group, torch.stack([expected, expected]), rtol=1e-9, atol=0)


@pytest.mark.parametrize("form", ["auto", "schulz"])
def test_hyperinf_group_fit_matches_single_fits(form):
    probs = [problem(seed=s) for s in range(3)]
    single = [make_solver("hyperinf", form=form).fit(g, lam) for g, _, lam in probs]
    group = [make_solver("hyperinf", form=form) for _ in probs]
    cls = type(group[0])
    cls.fit_group(group, [g_.statistics(g) for g_, (g, _, _) in zip(group, probs)], [g.shape[0] for g, _, _ in probs],
                  [lam for _, _, lam in probs])
    for a, b, (_, vecs, _) in zip(single, group, probs):
        assert torch.allclose(a.apply(vecs), b.apply(vecs), rtol=1e-9, atol=1e-12)
        assert b.info["residual"] < 1e-6 and b.info["form"] == ("direct" if form == "auto" else "schulz")
        assert form == "auto" or b.info["iterations"] >= b.info["float32_iterations"]


def test_hyperinf_float32_steps_keep_the_tolerance():
    grads, vecs, lam = problem(n=200, d=40)
    fast = make_solver("hyperinf", form="schulz").fit(grads, lam)
    slow = make_solver("hyperinf", form="schulz", float32_until=None).fit(grads, lam)
    assert fast.info["float32_iterations"] > 0 and slow.info["float32_iterations"] == 0
    assert fast.info["residual"] < 1e-6
    rel = (fast.apply(vecs) - slow.apply(vecs)).norm() / slow.apply(vecs).norm()
    assert float(rel) < 1e-5


@pytest.mark.parametrize("spill", [False, True])
def test_store_reads_once_per_pass_and_scores_match(tmp_path, spill):
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (2, 5), "b": (3, 4), "c": (2, 5)}
    n = 23
    data = {k: torch.randn(n, *s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    store = GradientStore(n, shapes, torch.float64, max_memory=0 if spill else None, spill_dir=str(tmp_path))
    store.write(0, data)
    assert store.groups == [((2, 5), ["a", "c"]), ((3, 4), ["b"])]
    for start, groups in store.group_chunks(7):
        assert torch.equal(groups[(2, 5)][1], data["c"][start:start + 7])
        assert torch.equal(groups[(3, 4)][0], data["b"][start:start + 7])
    reads = []
    if spill:
        original = store._read_into
        store._read_into = lambda name, start, out: (reads.append(out.numel()), original(name, start, out))
    valid = torch.ones(n, dtype=torch.bool)
    valid[3] = False
    cpu = torch.device("cpu")
    solvers = fit_solvers(store, valid, "hyperinf", CurvatureConfig(), cpu, torch.float64, 7)
    if spill:
        assert sum(reads) == n * sum(r * d for r, d in shapes.values())  # one pass, all blocks
    scores = self_influence(store, solvers, 5, cpu, torch.float64)
    expected = torch.zeros(n, dtype=torch.float64)
    for k in shapes:
        g = data[k][valid]
        solver = make_solver("hyperinf").fit(g, 0.1 * float(g.pow(2).mean()))
        expected += (data[k] * solver.apply(data[k])).sum((1, 2))
    assert torch.allclose(scores, expected, rtol=1e-9)
    store.close()


def test_identity_fit_reads_nothing(tmp_path):
    store = GradientStore(10, {"w": (2, 3)}, torch.float32, max_memory=0, spill_dir=str(tmp_path))
    store.write(0, {"w": torch.ones(10, 2, 3)})
    store._read_into = lambda *a: (_ for _ in ()).throw(AssertionError("read"))
    store.block = lambda *a: (_ for _ in ()).throw(AssertionError("read"))
    solvers = fit_solvers(store, torch.ones(10, dtype=torch.bool), "identity", CurvatureConfig(),
                          torch.device("cpu"), torch.float32, 4)
    assert set(solvers) == {"w"}


def test_lissa_work_budget_caps_and_says_so():
    grads, vecs, lam = problem(n=50, d=6)
    solver = make_solver("lissa", max_flops=1e4, min_iter=5).fit(grads, lam)
    with pytest.warns(RuntimeWarning, match="work budget"):
        solver.apply(vecs)
    assert solver.info["iterations"] == solver.info["iteration_cap"] < 10000
    unbounded = make_solver("lissa", max_flops=None).fit(grads, lam)
    unbounded.apply(vecs)
    assert unbounded.info["iteration_cap"] == 10000


def test_join_rows_is_a_view_only_of_consecutive_rows():
    from lightning_influence.store import join_rows

    x = torch.randn(3, 10, 2, 4)
    joined = join_rows([x[1, 0:3], x[1, 3:7], x[1, 7:10]])
    assert joined.data_ptr() == x[1].data_ptr() and torch.equal(joined, x[1])
    gap = join_rows([x[1, 0:3], x[1, 4:7]])  # not consecutive: a copy
    assert gap.data_ptr() != x[1].data_ptr() and torch.equal(gap, torch.cat([x[1, 0:3], x[1, 4:7]]))
    assert torch.equal(join_rows([x[0, 2:5].clone(), x[0, 5:9].clone()]), x[0, 2:9])


@pytest.mark.parametrize("spilled", [False, True])
def test_fit_on_many_chunks_keeps_ram_store_views(tmp_path, spilled):
    """datainf fitted over several chunks: from a RAM store the solver holds a view of the
    store's rows (no copy of the gradients); either way the fit equals a one-chunk fit."""
    grads, vecs, _ = problem(n=40, r=2, d=6, dtype=torch.float32)
    store = GradientStore(40, {"w": (2, 6)}, torch.float32, max_memory=0 if spilled else None,
                          spill_dir=str(tmp_path) if spilled else None)
    store.write(0, {"w": grads})
    valid = torch.ones(40, dtype=torch.bool)
    many = fit_solvers(store, valid, "datainf", CurvatureConfig(), torch.device("cpu"), torch.float32, 7)["w"]
    one = fit_solvers(store, valid, "datainf", CurvatureConfig(), torch.device("cpu"), torch.float32, 40)["w"]
    # λ's sum of squares is accumulated chunk by chunk: equal up to float32 rounding
    assert torch.allclose(many.apply(vecs.float()), one.apply(vecs.float()), rtol=1e-5, atol=1e-7)
    if not spilled:  # the solver's G is the store's memory
        assert many._g.data_ptr() == store.blocks["w"].data_ptr()
    store.close()
