"""Each solver against the dense matrix it claims to invert (float64, small shapes)."""
import warnings

import pytest
import torch

from lightning_influence.solvers import SOLVERS, InverseSolver, check_solver, datainf_damping, make_solver
from lightning_influence.solvers.damping import ZERO_FLOOR

SHAPES = {"woodbury": (7, 3, 5), "dense": (50, 2, 4)}



def rel(a, b):
    return float((a - b).norm() / b.norm())


def problem(n, r, d, m=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, r, d, generator=gen, dtype=torch.float64)
    grads = grads * torch.logspace(-1, 1, d, dtype=torch.float64)  # some conditioning
    vecs = torch.randn(m, r, d, generator=gen, dtype=torch.float64)
    return grads, vecs, datainf_damping(grads)


def fisher_solve(grads, vecs, lam):
    g = grads.reshape(grads.shape[0], -1)
    f = g.T @ g / g.shape[0] + lam * torch.eye(g.shape[1], dtype=g.dtype)
    return torch.linalg.solve(f, vecs.reshape(vecs.shape[0], -1).T).T.reshape(vecs.shape)


def gfim_solve(grads, vecs, lam):
    d = grads.shape[-1]
    gm = grads.reshape(-1, d)
    a = gm.T @ gm / grads.shape[0] + lam * torch.eye(d, dtype=grads.dtype)
    # v A^{-1} = (A^{-1} v^T)^T since A is symmetric
    return torch.linalg.solve(a, vecs.transpose(-1, -2)).transpose(-1, -2)


@pytest.mark.parametrize("path", ["woodbury", "dense"])
@pytest.mark.parametrize("name", ["exact", "lissa"])
def test_fisher_solvers_match_dense_solve(name, path):
    grads, vecs, lam = problem(*SHAPES[path])
    solver = make_solver(name).fit(grads, lam)
    out = solver.apply(vecs)
    assert out.shape == vecs.shape and out.dtype == vecs.dtype
    assert rel(out, fisher_solve(grads, vecs, lam)) <= 1e-4
    if name == "exact":
        assert solver.info == {"method": path}
    else:
        assert solver.info["iterations"] > 0 and solver.info["residual"] < 1e-7
        assert 0 < solver.info["alpha"]


@pytest.mark.parametrize("form", ["auto", "schulz"])
@pytest.mark.parametrize("path", ["woodbury", "dense"])
def test_hyperinf_matches_gfim_solve(path, form):
    grads, vecs, lam = problem(*SHAPES[path])
    solver = make_solver("hyperinf", form=form).fit(grads, lam)
    assert rel(solver.apply(vecs), gfim_solve(grads, vecs, lam)) <= 1e-4
    assert solver.info["residual"] < 1e-6
    if form == "auto":  # N·r > d in both shapes: the dense X, by Cholesky
        assert solver.info["form"] == "direct" and solver.info["iterations"] == 0
    else:
        assert solver.info["form"] == "schulz" and solver.info["iterations"] > 0


def test_hyperinf_float32_input_keeps_dtype():
    grads, vecs, lam = problem(*SHAPES["woodbury"])
    out = make_solver("hyperinf").fit(grads.float(), lam).apply(vecs.float())
    assert out.dtype == torch.float32
    assert rel(out.double(), gfim_solve(grads, vecs, lam)) <= 1e-4


@pytest.mark.parametrize("path", ["woodbury", "dense"])
def test_datainf_matches_sherman_morrison_loop(path):
    grads, vecs, lam = problem(*SHAPES[path])
    g = grads.reshape(grads.shape[0], -1)
    v = vecs.reshape(vecs.shape[0], -1)
    ref = torch.zeros_like(v)
    eye = torch.eye(g.shape[1], dtype=g.dtype)
    for gi in g:  # mean of the exact inverses of the rank-one terms g_i g_iᵀ + λI
        ref += torch.linalg.solve(torch.outer(gi, gi) + lam * eye, v.T).T / g.shape[0]
    out = make_solver("datainf").fit(grads, lam).apply(vecs)
    assert rel(out, ref.reshape(vecs.shape)) <= 1e-10


def test_identity_returns_a_copy():
    grads, vecs, lam = problem(*SHAPES["woodbury"])
    solver = make_solver("identity").fit(grads, lam)
    out = solver.apply(vecs)
    assert torch.equal(out, vecs) and out.data_ptr() != vecs.data_ptr()
    assert solver.info == {}


def test_exact_woodbury_and_dense_agree():
    grads, vecs, lam = problem(*SHAPES["woodbury"])
    woodbury = make_solver("exact").fit(grads, lam)
    # the same Fisher on the dense path: repeating every sample k times leaves F unchanged
    k = grads[0].numel() // grads.shape[0] + 1
    dense = make_solver("exact").fit(grads.repeat(k, 1, 1), lam)
    assert woodbury.info["method"] == "woodbury" and dense.info["method"] == "dense"
    assert rel(woodbury.apply(vecs), dense.apply(vecs)) <= 1e-10


def test_registry_and_make_solver():
    assert {"identity", "exact", "datainf", "hyperinf", "lissa"} <= set(SOLVERS)
    with pytest.raises(ValueError, match="nope") as err:
        make_solver("nope")
    for name in ("identity", "exact", "datainf", "hyperinf", "lissa"):
        assert name in str(err.value)
    with pytest.raises(ValueError):
        check_solver("nope")
    assert make_solver("hyperinf", tol=1e-3).tol == 1e-3


def test_user_solver_instance_is_copied():
    class Scaled(InverseSolver):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def fit(self, grads, damping):
            self.state = grads.shape[0]
            return self

        def apply(self, vectors):
            return vectors * self.scale

    template = Scaled(2.0)
    solver = make_solver(template)
    assert isinstance(solver, Scaled) and solver is not template and solver.scale == 2.0
    grads, vecs, lam = problem(*SHAPES["woodbury"])
    solver.fit(grads, lam)
    assert not hasattr(template, "state")
    assert torch.equal(solver.apply(vecs), 2 * vecs)
    assert isinstance(make_solver(Scaled, scale=3.0), Scaled)


def test_hyperinf_warns_when_not_converged():
    grads, _, lam = problem(*SHAPES["woodbury"])
    with pytest.warns(RuntimeWarning, match="1 iterations"):
        solver = make_solver("hyperinf", form="schulz", max_iter=1).fit(grads, lam)
    assert solver.info["iterations"] == 1 and solver.info["residual"] > 1e-6


def test_lissa_warns_when_not_converged():
    grads, vecs, lam = problem(*SHAPES["dense"])
    solver = make_solver("lissa", max_iter=3).fit(grads, lam)
    with pytest.warns(RuntimeWarning, match="3 iterations"):
        solver.apply(vecs)
    assert solver.info["iterations"] == 3


def test_converged_solvers_do_not_warn():
    grads, vecs, lam = problem(*SHAPES["dense"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in SOLVERS:
            if name in ("identity", "exact", "datainf", "hyperinf", "lissa"):
                make_solver(name).fit(grads, lam).apply(vecs)


def test_datainf_damping_rule():
    grads, _, _ = problem(*SHAPES["dense"])
    assert datainf_damping(grads) == pytest.approx(0.1 * float(grads.pow(2).mean()))
    assert datainf_damping(grads, factor=0.5) == pytest.approx(0.5 * float(grads.pow(2).mean()))
    tiny = datainf_damping(torch.zeros(3, 2, 2))
    assert tiny == ZERO_FLOOR > 0
    # zero gradients still give a finite inverse
    out = make_solver("exact").fit(torch.zeros(3, 2, 2), tiny).apply(torch.ones(1, 2, 2))
    assert torch.isfinite(out).all()


class _RecordingSolver:
    """A duck-typed solver that records the λ the pipeline gives it."""

    def __init__(self):
        self.damping = None

    def fit(self, grads, damping):
        self.damping = damping
        return self

    def apply(self, vectors):
        return vectors


def test_pipeline_and_datainf_damping_agree_on_an_all_zero_block():
    # one damping rule: fit_solvers' λ (from the streamed mean of g²) is datainf_damping's,
    # the all-zero floor included (it used to be 1e-12 in the pipeline, sqrt(tiny) here)
    from lightning_influence.config import CurvatureConfig
    from lightning_influence.scoring import fit_solvers
    from lightning_influence.store import GradientStore

    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float64):
        data = {"zero": torch.zeros(6, 2, 3, dtype=dtype), "live": torch.randn(6, 2, 3, dtype=dtype)}
        store = GradientStore(6, {k: tuple(v.shape[1:]) for k, v in data.items()}, dtype)
        store.write(0, data)
        valid = torch.ones(6, dtype=torch.bool)
        for factor in (0.1, 0.5):
            fitted = fit_solvers(store, valid, _RecordingSolver(), CurvatureConfig(damping=factor), cpu, dtype, 4)
            for name, grads in data.items():
                assert fitted[name].damping == pytest.approx(datainf_damping(grads, factor), rel=1e-5)
        store.close()
