"""HyperINF's direct (Cholesky) form of the dense damped-GFIM inverse: against an independent
float64 inverse and the Schulz iteration, chosen by ``form="auto"`` where ``N·r > d``, its fallback
to the iteration when ``A`` is not positive definite, and batched fits equal to single ones."""
import warnings

import pytest
import torch

from lightning_influence.solvers import SOLVERS, datainf_damping, make_solver
from lightning_influence.solvers._lowrank import choose_form, form_cost


def problem(n=40, r=4, d=24, m=5, seed=0, dtype=torch.float64):
    """``n`` gradients ``(r, d)`` with ``n·r > d`` (a full-rank Gram) whose columns span two
    orders of magnitude, ``m`` vectors and DataInf's damping."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, r, d, generator=gen, dtype=dtype) * torch.logspace(-1, 1, d, dtype=dtype)
    vecs = torch.randn(m, r, d, generator=gen, dtype=dtype)
    return grads, vecs, datainf_damping(grads)


def damped_gfim(grads, lam):
    gm = grads.double().reshape(-1, grads.shape[-1])
    return gm.T @ gm / grads.shape[0] + lam * torch.eye(gm.shape[1], dtype=torch.float64)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("lam_scale", [1.0, 1e-3])  # DataInf's damping, and an ill-conditioned A
def test_direct_equals_a_float64_inverse(lam_scale):
    grads, vecs, lam = problem()
    lam *= lam_scale
    want = torch.linalg.inv(damped_gfim(grads, lam))
    solver = make_solver("hyperinf", form="direct").fit(grads, lam)
    assert solver.info["form"] == "direct" and solver.info["iterations"] == 0
    assert solver.info["residual"] < 1e-12  # the probed ‖A X − I‖_F/√d: rounding, not a tolerance
    assert solver._x.dtype == torch.float64 and torch.equal(solver._x, solver._x.mT)
    assert rel(solver._x, want) < 1e-10
    assert rel(solver.apply(vecs), vecs @ want) < 1e-10
    assert torch.allclose(solver.quadratic(vecs), (vecs * (vecs @ want)).sum((1, 2)), rtol=1e-10, atol=0)


def test_direct_residual_estimate_tracks_the_true_residual():
    """The probed ``‖(A X − I) p‖/‖p‖`` against ``‖A X − I‖_F/√d`` where it is well above
    rounding (κ(A) ≈ 3e10), and a tolerance under it warns."""
    grads, _, lam = problem(seed=4)
    grads[..., :6] *= 1e-4  # six weak directions
    a = damped_gfim(grads, lam * 1e-8)
    assert float(torch.linalg.cond(a)) > 1e10
    with pytest.warns(RuntimeWarning, match="Cholesky inverse did not converge: 0 iterations"):
        solver = make_solver("hyperinf", tol=1e-14).fit(grads, lam * 1e-8)
    true = float((a @ solver._x - torch.eye(a.shape[0], dtype=torch.float64)).norm() / a.shape[0] ** 0.5)
    assert true > 1e-13 and 0.3 * true < solver.info["residual"] < 3 * true


def test_direct_float32_gradients_keep_float32_to_its_precision():
    grads, vecs, lam = problem(n=60, d=48, seed=1)
    want = torch.linalg.inv(damped_gfim(grads.float(), lam))
    solver = make_solver("hyperinf").fit(grads.float(), lam)
    assert solver.info["form"] == "direct"
    assert solver._x.dtype == torch.float32  # factored in float64, kept in the gradients' dtype
    out = solver.apply(vecs.float())
    assert out.dtype == torch.float32
    assert rel(solver._x.double(), want) < 1e-6
    assert rel(out.double(), vecs.float().double() @ want) < 1e-5


def test_direct_and_schulz_agree_to_the_schulz_tolerance():
    grads, vecs, lam = problem(n=50, d=32, seed=2)
    direct = make_solver("hyperinf").fit(grads, lam)
    schulz = make_solver("hyperinf", form="schulz").fit(grads, lam)
    assert direct.info["form"] == "direct" and schulz.info["form"] == "schulz"
    assert schulz.info["iterations"] > 0 and schulz.info["residual"] < 1e-6
    assert rel(schulz._x, direct._x) < 1e-6
    assert rel(schulz.apply(vecs), direct.apply(vecs)) < 1e-6
    assert torch.allclose(schulz.quadratic(vecs), direct.quadratic(vecs), rtol=1e-6, atol=0)


def test_auto_picks_direct_above_d_rows_and_lowrank_up_to_d():
    for n, r, d in [(13, 2, 25), (30, 1, 29), (100, 8, 768), (64, 8, 384), (1000, 16, 11008)]:
        assert n * r > d and choose_form(n, r, d) == "direct"
        solver = make_solver("hyperinf")
        assert solver.plan(n, r, d) == "direct" and solver.reductions == {"gram": "sum"}  # DDP: the Gram, summed
    for n, r, d in [(12, 2, 25), (30, 1, 30), (48, 8, 768), (40, 8, 384), (48, 8, 3072)]:
        assert n * r <= d and choose_form(n, r, d) == "lowrank"
        assert make_solver("hyperinf").plan(n, r, d) == "lowrank"
    dense_g, _, lam = problem(n=13, r=2, d=25)
    low_g, _, low_lam = problem(n=12, r=2, d=25)
    assert make_solver("hyperinf").fit(dense_g, lam).info["form"] == "direct"
    assert make_solver("hyperinf").fit(low_g, low_lam).info["form"] == "lowrank"
    # the Schulz iteration stays available, and "direct" is a form of its own
    assert make_solver("hyperinf", form="schulz").plan(13, 2, 25) == "schulz"
    assert make_solver("hyperinf", form="direct").plan(12, 2, 25) == "direct"
    with pytest.raises(ValueError, match="'direct' or 'schulz'"):
        make_solver("hyperinf", form="cholesky")


def test_direct_cost_model():
    n, r, d = 100, 8, 768
    direct, schulz = form_cost("direct", n, r, d), form_cost("schulz", n, r, d)
    assert direct["kept_bytes"] == schulz["kept_bytes"] == d * d * 4
    fit_direct = direct["flops"] - 3.0 * n * r * d * d   # less the Gram and the n·r scored rows
    fit_schulz = schulz["flops"] - 3.0 * n * r * d * d
    assert fit_direct == d ** 3 and fit_schulz / fit_direct == 80
    assert direct["temp_bytes"] == d * d * (3 * 8 + 4)  # A, L, X in float64 and a float32 margin


def test_cholesky_failure_falls_back_to_the_schulz_iteration():
    """Damping 0 and gradients that never touch 5 of the 24 coordinates: the Gram is singular
    (exact zero rows), Cholesky fails; that block is inverted by the Schulz iteration (which warns
    that it stalls), the healthy block of the same batch by Cholesky."""
    grads, vecs, lam = problem(seed=3)
    singular = grads.clone()
    singular[..., :5] = 0
    cls = SOLVERS["hyperinf"]
    solvers = [make_solver("hyperinf") for _ in range(2)]
    for s in solvers:
        s.plan(*grads.shape)
    stats = [s.statistics(g) for s, g in zip(solvers, (singular, grads))]
    with pytest.warns(RuntimeWarning, match="Schulz iteration did not converge"):
        cls.fit_group(solvers, stats, [grads.shape[0]] * 2, [0.0, lam])
    bad, good = solvers
    assert bad.info["form"] == "schulz" and bad.info["cholesky_failed"] and bad.info["iterations"] > 0
    assert torch.isfinite(bad._x).all() and torch.isfinite(bad.apply(vecs)).all()
    assert good.info["form"] == "direct" and "cholesky_failed" not in good.info
    assert rel(good._x, torch.linalg.inv(damped_gfim(grads, lam))) < 1e-10
    # on its own (fit), the same
    with pytest.warns(RuntimeWarning, match="Schulz iteration"):
        alone = make_solver("hyperinf").fit(singular, 0.0)
    assert alone.info["form"] == "schulz" and torch.isfinite(alone.quadratic(vecs)).all()


@pytest.mark.parametrize("group_bytes", [1, 256 << 20])  # every block alone; one batch of five
def test_group_fit_equals_single_fits(group_bytes):
    probs = [problem(n=30 + 5 * s, seed=10 + s) for s in range(5)]  # equal d, unequal N and damping
    single = [make_solver("hyperinf").fit(g, lam) for g, _, lam in probs]
    group = [make_solver("hyperinf", group_bytes=group_bytes) for _ in probs]
    for s, (g, _, _) in zip(group, probs):
        s.plan(*g.shape)
    cls = SOLVERS["hyperinf"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        cls.fit_group(group, [s.statistics(g) for s, (g, _, _) in zip(group, probs)],
                      [g.shape[0] for g, _, _ in probs], [lam for _, _, lam in probs])
    vecs = torch.stack([v for _, v, _ in probs])
    q = cls.quadratic_group(group, vecs)
    for i, (a, b, (g, v, lam)) in enumerate(zip(single, group, probs)):
        assert b.info["form"] == "direct" and b.info["residual"] < 1e-12
        assert torch.allclose(b._x, a._x, rtol=1e-12, atol=0)
        assert rel(b._x, torch.linalg.inv(damped_gfim(g, lam))) < 1e-10
        assert torch.allclose(q[i], a.quadratic(v), rtol=1e-12, atol=0)
