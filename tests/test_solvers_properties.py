"""Property tests: the solvers match a dense solve over random shapes, scales and conditioning,
and do not depend on the order of the curvature samples."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lightning_influence.solvers import datainf_damping, make_solver

OPTIONS = {"lissa": {"max_iter": 50000}}



@st.composite
def problems(draw):
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


def rel(a, b):
    return float((a - b).norm() / b.norm())


def reference(name, grads, vecs, lam):
    if name == "hyperinf":  # v (GFIM + λI)^{-1}
        gm = grads.reshape(-1, grads.shape[-1])
        a = gm.T @ gm / grads.shape[0] + lam * torch.eye(gm.shape[1], dtype=gm.dtype)
        return torch.linalg.solve(a, vecs.transpose(-1, -2)).transpose(-1, -2)
    g = grads.reshape(grads.shape[0], -1)
    f = g.T @ g / g.shape[0] + lam * torch.eye(g.shape[1], dtype=g.dtype)
    return torch.linalg.solve(f, vecs.reshape(vecs.shape[0], -1).T).T.reshape(vecs.shape)


@pytest.mark.parametrize("name", ["exact", "lissa", "hyperinf"])
@settings(max_examples=25, deadline=None)
@given(prob=problems())
def test_matches_dense_solve(name, prob):
    grads, vecs, lam = prob
    out = make_solver(name, **OPTIONS.get(name, {})).fit(grads, lam).apply(vecs)
    assert out.shape == vecs.shape
    assert rel(out, reference(name, grads, vecs, lam)) <= 1e-4


@pytest.mark.parametrize("name", ["exact", "lissa", "hyperinf", "datainf", "identity"])
@settings(max_examples=25, deadline=None)
@given(prob=problems(), data=st.data())
def test_sample_order_does_not_matter(name, prob, data):
    grads, vecs, lam = prob
    perm = torch.tensor(data.draw(st.permutations(range(grads.shape[0]))))
    opts = OPTIONS.get(name, {})
    out = make_solver(name, **opts).fit(grads, lam).apply(vecs)
    out_perm = make_solver(name, **opts).fit(grads[perm], lam).apply(vecs)
    assert rel(out_perm, out) <= 1e-8
