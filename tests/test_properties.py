"""Property tests (hypothesis), from the solvers on their own up to the whole audit:

- each solver matches a dense solve, over random shapes, scales and conditioning, for
  rank-deficient curvature (duplicated rows) too, and does not depend on the order of the
  curvature samples;
- the curvature stage never depends on how the store is chunked, and excluded rows never
  enter it;
- the audit's scores equal a dense reference built from per-sample gradients computed one
  sample at a time, for ``exact``, ``lissa`` and ``hyperinf``;
- scores permute with the training samples (any order, any batch size);
- identical training samples get identical scores.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_influence import audit
from lightning_influence.config import CurvatureConfig
from lightning_influence.params import select_blocks
from lightning_influence.scoring import fit_solvers
from lightning_influence.solvers import datainf_damping, make_solver
from lightning_influence.store import GradientStore
from tasks import TensorPairs

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPTIONS = {"lissa": {"max_iter": 50000}}
TOLERANCE = {"exact": 1e-7, "hyperinf": 1e-4, "lissa": 1e-4}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def dense_inverse(solver, curv, lam, vecs):
    """``(C + λI)^{-1}`` applied to ``vecs`` ``(k, r, d)`` by a dense solve: the flat empirical
    Fisher, or HyperINF's ``d x d`` GFIM applied from the right."""
    if solver == "hyperinf":
        gm = curv.reshape(-1, curv.shape[-1])
        a = gm.T @ gm / curv.shape[0] + lam * torch.eye(gm.shape[1], dtype=gm.dtype)
        return torch.linalg.solve(a, vecs.transpose(-1, -2)).transpose(-1, -2)
    g = curv.reshape(curv.shape[0], -1)
    f = g.T @ g / g.shape[0] + lam * torch.eye(g.shape[1], dtype=g.dtype)
    return torch.linalg.solve(f, vecs.reshape(vecs.shape[0], -1).T).T.reshape(vecs.shape)


# --------------------------------------------------------------------------- the solvers

@st.composite
def problems(draw):
    """Full-rank-ish curvature gradients ``(n, r, d)`` whose columns span up to 10^3 in magnitude."""
    n, r, d = draw(st.integers(1, 20)), draw(st.integers(1, 4)), draw(st.integers(1, 8))
    m = draw(st.integers(1, 3))
    scale = 10.0 ** draw(st.floats(-3, 3))
    spread = draw(st.floats(0, 3))  # columns span up to 10^3 in magnitude
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    cols = 10.0 ** (spread * torch.rand(d, generator=gen, dtype=torch.float64))
    grads = scale * cols * torch.randn(n, r, d, generator=gen, dtype=torch.float64)
    vecs = torch.randn(m, r, d, generator=gen, dtype=torch.float64)
    return grads, vecs, datainf_damping(grads)


@st.composite
def low_rank_problems(draw):
    """Curvature gradients of rank k < r*d (with duplicated rows), over scales and conditioning."""
    r, d = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    k = draw(st.integers(1, max(1, r * d - 1)))
    n = draw(st.integers(k, k + 10))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.floats(-3, 3))
    spread = draw(st.floats(0, 3))
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, r * d, generator=gen, dtype=torch.float64) * 10.0 ** (
        spread * torch.rand(r * d, generator=gen, dtype=torch.float64))
    grads = scale * (torch.randn(n, k, generator=gen, dtype=torch.float64) @ basis).reshape(n, r, d)
    grads = torch.cat([grads, grads[: draw(st.integers(0, n))]])  # duplicates
    vecs = torch.randn(draw(st.integers(1, 3)), r, d, generator=gen, dtype=torch.float64)
    return grads, vecs, datainf_damping(grads)


def solve_error(name, grads, vecs, lam):
    """The solver ``name`` fitted on ``grads`` and applied to ``vecs``, against a dense solve."""
    out = make_solver(name, **OPTIONS.get(name, {})).fit(grads, lam).apply(vecs)
    assert out.shape == vecs.shape
    return rel(out, dense_inverse(name, grads, lam, vecs))


@pytest.mark.parametrize("name", ["exact", "lissa", "hyperinf"])
@settings(max_examples=25, **SETTINGS)
@given(prob=problems())
def test_solvers_match_dense_solve(name, prob):
    assert solve_error(name, *prob) <= 1e-4


@pytest.mark.parametrize("name", ["exact", "lissa", "hyperinf"])
@settings(max_examples=20, **SETTINGS)
@given(prob=low_rank_problems())
def test_solvers_match_dense_solve_on_rank_deficient_curvature(name, prob):
    assert solve_error(name, *prob) <= TOLERANCE[name]


@pytest.mark.parametrize("name", ["exact", "lissa", "hyperinf", "datainf", "identity"])
@settings(max_examples=25, **SETTINGS)
@given(prob=problems(), data=st.data())
def test_solvers_ignore_the_order_of_the_curvature_samples(name, prob, data):
    grads, vecs, lam = prob
    perm = torch.tensor(data.draw(st.permutations(range(grads.shape[0]))))
    opts = OPTIONS.get(name, {})
    out = make_solver(name, **opts).fit(grads, lam).apply(vecs)
    out_perm = make_solver(name, **opts).fit(grads[perm], lam).apply(vecs)
    assert rel(out_perm, out) <= 1e-8


# --------------------------------------------------------------------------- the curvature stage

@pytest.mark.parametrize("name", ["exact", "hyperinf", "datainf", "lissa"])
@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_curvature_ignores_chunking_and_excluded_rows(name, data):
    """fit_solvers streams the store chunk by chunk and skips invalid rows: any chunk size gives
    the solver fitted on the valid rows alone, and what the invalid rows hold never matters."""
    n, r, d = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    grads = torch.randn(n, r, d, generator=gen, dtype=torch.float64) * 10.0 ** data.draw(st.floats(-2, 2))
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if not valid.any():
        valid[0] = True
    junk = grads.clone()
    junk[~valid] = 1e6  # whatever an excluded row holds (the pipeline zero-fills them)
    store = GradientStore(n, {"w": (r, d)}, torch.float64)
    store.write(0, {"w": junk})
    config = CurvatureConfig(solver_options=OPTIONS.get(name))
    vecs = torch.randn(2, r, d, generator=gen, dtype=torch.float64)
    cpu = torch.device("cpu")
    chunked = fit_solvers(store, valid, name, config, cpu, torch.float64, data.draw(st.integers(1, n)))["w"]
    whole = make_solver(name, **OPTIONS.get(name, {})).fit(grads[valid], 0.1 * float(grads[valid].pow(2).mean()))
    expected = whole.apply(vecs)
    assert rel(chunked.apply(vecs), expected) <= (1e-6 if name == "lissa" else 1e-9)


# --------------------------------------------------------------------------- the whole audit

@st.composite
def setups(draw, n_min=1):
    """A tiny classifier and train/val data with random shapes, input scale and conditioning."""
    d_in, hidden, classes = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(2, 4))
    n, m = draw(st.integers(n_min, 8)), draw(st.integers(1, 6))
    scale = 10.0 ** draw(st.floats(-1.5, 1.5))
    spread = draw(st.floats(0, 2))  # input columns span up to 10^2 in magnitude
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    cols = scale * 10.0 ** (spread * torch.rand(d_in, generator=gen, dtype=torch.float64))

    def make(k):
        return TensorPairs(cols * torch.randn(k, d_in, generator=gen, dtype=torch.float64),
                           torch.randint(0, classes, (k,), generator=gen))

    def model():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()

    return model, make(n), make(m)


def per_sample(model, blocks, ds):
    """``{block: (k, r, d)}``: one backward per sample, in the blocks' stored orientation."""
    rows = {b.name: [] for b in blocks}
    for i in range(len(ds)):
        x, y = ds[i]
        loss = F.cross_entropy(model(x[None]), y[None])
        for b, g in zip(blocks, torch.autograd.grad(loss, [b.param for b in blocks])):
            rows[b.name].append(b.to_matrix(g[None])[0])
    return {k: torch.stack(v) for k, v in rows.items()}


def reference_scores(method, solver, model, train, val):
    blocks = select_blocks(model, "trainable")
    g_train, g_val = per_sample(model, blocks, train), per_sample(model, blocks, val)
    total = torch.zeros(len(train), dtype=torch.float64)
    for name in g_train:
        curv = g_val[name] if method == "fvm" else g_train[name]
        lam = 0.1 * float(curv.pow(2).mean())  # DataInf's relative damping, the default
        lam = lam if lam > 0 else 1e-12
        if method == "fvm":
            total += (g_train[name] * dense_inverse(solver, curv, lam, g_train[name])).sum((1, 2))
        else:
            u = dense_inverse(solver, curv, lam, g_val[name].mean(0, keepdim=True))
            total -= (u * g_train[name]).sum((1, 2))
    return total


@pytest.mark.parametrize("method", ["fvm", "standard"])
@pytest.mark.parametrize("solver", ["exact", "lissa", "hyperinf"])
@settings(max_examples=12, **SETTINGS)
@given(setup=setups(), batch_size=st.integers(1, 5))
def test_audit_matches_dense_reference(method, solver, setup, batch_size):
    model, train, val = setup
    result = audit(model(), train, val, method=method, solver=solver, tuning={"steps": 0}, batch_size=batch_size,
                   curvature={"solver_options": OPTIONS.get(solver)})
    expected = reference_scores(method, solver, model(), train, val)
    err = float((result.influence - expected).norm() / expected.norm().clamp_min(1e-300))
    assert err <= TOLERANCE[solver], err


@pytest.mark.parametrize("method", ["fvm", "standard"])
@settings(max_examples=15, **SETTINGS)
@given(setup=setups(n_min=2), data=st.data())
def test_scores_permute_with_the_training_samples(method, setup, data):
    model, train, val = setup
    n = len(train)
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    bad = data.draw(st.sampled_from([None] + list(range(n))))  # optionally one NaN sample
    x = train.x.clone()
    if bad is not None:
        x[bad] = float("nan")
    kw = dict(method=method, solver="exact", tuning={"steps": 2, "batch_size": 4}, nonfinite="exclude")
    with pytest.warns(RuntimeWarning) if bad is not None else nullcontext():
        a = audit(model(), TensorPairs(x, train.y), val, batch_size=data.draw(st.integers(1, 5)), **kw)
    with pytest.warns(RuntimeWarning) if bad is not None else nullcontext():
        b = audit(model(), TensorPairs(x[perm], train.y[perm]), val, batch_size=data.draw(st.integers(1, 5)), **kw)
    # sample perm[j] of the original is sample j of the permuted set
    torch.testing.assert_close(b.influence, a.influence[perm], rtol=1e-8, atol=1e-12, equal_nan=True)
    assert sorted(b.excluded) == sorted((perm == e).nonzero().item() for e in a.excluded)


@pytest.mark.parametrize("method", ["fvm", "standard"])
@settings(max_examples=15, **SETTINGS)
@given(setup=setups(n_min=2), data=st.data())
def test_identical_training_samples_score_identically(method, setup, data):
    model, train, val = setup
    n = len(train)
    src = data.draw(st.integers(0, n - 1))
    dst = data.draw(st.integers(0, n - 1).filter(lambda j: j != src))
    x, y = train.x.clone(), train.y.clone()
    x[dst], y[dst] = x[src], y[src]
    result = audit(model(), TensorPairs(x, y), val, method=method, solver="hyperinf",
                   tuning={"steps": 2, "batch_size": 4}, batch_size=data.draw(st.integers(1, 5)))
    torch.testing.assert_close(result.influence[dst], result.influence[src], rtol=1e-10, atol=1e-14)
