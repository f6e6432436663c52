"""The interface every inverse solver implements, and the registry that finds one by name.

A solver approximates ``(C + λI)^{-1} v`` for one parameter block. The curvature ``C`` is
built from a set of per-sample gradients of that block, each kept as a matrix of shape
``(r, d)`` (see ``gradients.py``): the empirical Fisher ``C = (1/N) Σ_i vec(g_i) vec(g_i)^T``
for every solver except ``hyperinf``, which uses HyperINF's generalised Fisher
``A = (1/N) Σ_i g_i^T g_i`` (``d × d``).

Usage, per block::

    solver = make_solver("hyperinf")
    solver.fit(curvature_grads, damping)   # curvature_grads: (N, r, d)
    out = solver.apply(vectors)            # vectors: (M, r, d) -> (M, r, d)
    solver.info                            # e.g. {"iterations": 12, "residual": 3e-7}
"""
from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


class InverseSolver(ABC):
    """Applies an (approximate) damped inverse curvature of one block to vectors.

    Subclasses implement :meth:`fit` and :meth:`apply`. ``fit`` may be called again to
    refit on other gradients; a solver instance serves one block at a time.
    """

    #: registry name, set by :func:`register_solver`
    name: str = ""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    @abstractmethod
    def fit(self, grads: Tensor, damping: float) -> "InverseSolver":
        """Build the inverse from the curvature gradients ``grads`` of shape ``(N, r, d)``
        with damping ``λ = damping`` (an absolute value, already scaled). Returns ``self``."""

    @abstractmethod
    def apply(self, vectors: Tensor) -> Tensor:
        """Apply the damped inverse to ``vectors`` of shape ``(M, r, d)``; returns ``(M, r, d)``."""

    # --- streaming and distributed fitting -------------------------------------------------
    # The curvature gradients may come in chunks (a store spilled to disk) or in shards (one
    # per DDP rank). A solver describes what it needs as named statistics of a chunk, each
    # combined across chunks and ranks by "sum" (e.g. HyperINF's d x d GFIM) or by "cat"
    # (the gradients themselves, for solvers that need every sample). The default is "cat".

    #: how each statistic combines across chunks and ranks
    reductions: dict[str, str] = {"grads": "cat"}

    def statistics(self, grads: Tensor) -> dict[str, Tensor]:
        """Statistics of one chunk of curvature gradients ``(N_c, r, d)``."""
        return {"grads": grads}

    def fit_statistics(self, stats: dict[str, Tensor], n: int, damping: float) -> "InverseSolver":
        """Fit from statistics combined over all ``n`` curvature samples. Returns ``self``."""
        return self.fit(stats["grads"], damping)

    def plan(self, n: int, r: int, d: int) -> Any:
        """Called before any curvature gradient is read, with the number ``n`` of curvature samples
        (over every rank; the same on each) and the block's gradient shape ``(r, d)``: a solver
        may choose its form and :attr:`reductions` from them (``hyperinf`` does). Default: nothing."""
        return None

    # --- memory -------------------------------------------------------------------------------

    def estimate_bytes(self, shapes: Sequence[tuple[int, int]], n_curvature: int, compute_bytes: int,
                       gathered: bool = True) -> int:
        """Peak bytes of the solve stage with this solver on blocks of gradient shapes ``shapes``
        (``[(r, d)]``) and ``n_curvature`` curvature samples, numbers of ``compute_bytes`` bytes:
        what the statistics hold (the gathered gradients of every block for a ``"cat"`` statistic,
        counted when ``gathered``: a copy whenever the store is spilled, of another dtype or split
        over ranks; a view of a store in RAM otherwise), what the fitted solvers keep, and the
        temporaries of the largest fit. The pre-flight memory check adds it to the stores' bytes.

        This default (for solvers that keep no more than they are given) counts the gathered
        gradients when a statistic is ``"cat"``, else 0; a solver that keeps more overrides it."""
        if not gathered or "cat" not in self.reductions.values():
            return 0
        return n_curvature * sum(r * d for r, d in shapes) * compute_bytes

    # --- batched fitting and fused scoring (optional; the defaults loop over the blocks) ----

    @classmethod
    def fit_group(cls, solvers: Sequence["InverseSolver"], stats: Sequence[dict[str, Tensor]],
                  counts: Sequence[int], dampings: Sequence[float]) -> list["InverseSolver"]:
        """Fit several solvers of this class (one per block) from their statistics; a solver may
        override it to batch equal-shaped blocks into one product. Returns the fitted solvers."""
        return [s.fit_statistics(st, n, lam) for s, st, n, lam in zip(solvers, stats, counts, dampings)]

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``vᵀ (C + λI)^{-1} v`` for each of ``vectors`` ``(M, r, d)``: ``(M,)`` (the fvm score
        of one block). The default applies the inverse and takes the dot product; a solver
        whose inverse has a cheaper quadratic form overrides it."""
        return (vectors * self.apply(vectors)).sum(dim=(1, 2))

    @classmethod
    def quadratic_group(cls, solvers: Sequence["InverseSolver"], vectors: Tensor) -> Tensor:
        """The quadratic forms of several blocks of equal shape: ``vectors`` ``(B, M, r, d)``
        (one block per solver) → ``(B, M)``."""
        return torch.stack([s.quadratic(v) for s, v in zip(solvers, vectors)])


SOLVERS: dict[str, type[InverseSolver]] = {}


def register_solver(name: str) -> Callable[[type[InverseSolver]], type[InverseSolver]]:
    """Class decorator: make a solver available under ``name`` (``make_solver(name)``)."""

    def decorator(cls: type[InverseSolver]) -> type[InverseSolver]:
        if name in SOLVERS and SOLVERS[name] is not cls:
            raise ValueError(f"a solver named {name!r} is already registered: {SOLVERS[name]}")
        cls.name = name
        SOLVERS[name] = cls
        return cls

    return decorator


SolverSpec = str | InverseSolver | type[InverseSolver]


def make_solver(spec: SolverSpec, **options: Any) -> InverseSolver:
    """Return a fresh solver for ``spec``: a registered name, a solver class, or an instance
    (an instance is used as a template: it is copied so that blocks never share state)."""
    if isinstance(spec, str):
        if spec not in SOLVERS:
            raise ValueError(f"unknown solver {spec!r}; choose one of {sorted(SOLVERS)} "
                             "or pass an InverseSolver instance")
        return SOLVERS[spec](**options)
    if isinstance(spec, type) and issubclass(spec, InverseSolver):
        return spec(**options)
    if isinstance(spec, InverseSolver):
        return copy.deepcopy(spec)
    if hasattr(spec, "fit") and hasattr(spec, "apply"):  # duck-typed user solver
        return copy.deepcopy(spec)
    raise TypeError(f"solver must be a name, an InverseSolver class or instance, got {type(spec).__name__}")


def estimate_solve_bytes(solver: Any, shapes: Sequence[tuple[int, int]], n_curvature: int, compute_bytes: int,
                         gathered: bool = True) -> int:
    """The solve stage's peak bytes with ``solver`` (what :func:`make_solver` returns): its own
    :meth:`InverseSolver.estimate_bytes` on blocks of gradient shapes ``shapes`` (``[(r, d)]``) and
    ``n_curvature`` curvature samples of ``compute_bytes`` bytes per number (``gathered`` passed on
    where the method takes it: a user's may not). A duck-typed solver without the method is fitted
    on a copy of every block's curvature gradients: that many bytes."""
    estimate = solver.estimate_bytes if isinstance(solver, InverseSolver) else getattr(solver, "estimate_bytes", None)
    if estimate is None:
        return n_curvature * sum(r * d for r, d in shapes) * compute_bytes
    takes_gathered = "gathered" in inspect.signature(estimate).parameters
    return int(estimate(shapes, n_curvature, compute_bytes, **({"gathered": gathered} if takes_gathered else {})))


def solver_name(spec: Any) -> str:
    """The solver's display name (``AuditResult.solver``, its config, the callback's state key):
    a name as given, a class's ``__name__``, an instance's class name."""
    if isinstance(spec, str):
        return spec
    return spec.__name__ if isinstance(spec, type) else type(spec).__name__


def check_solver(spec: SolverSpec) -> None:
    """Raise early (e.g. in a callback's ``setup``) if ``spec`` names no solver."""
    make_solver(spec)


def flat(x: Tensor) -> Tensor:
    """``(M, r, d) -> (M, r*d)``: the vectorised view the empirical-Fisher solvers work in."""
    return x.reshape(x.shape[0], -1)


def row_sq_norms(x: Tensor) -> Tensor:
    """``‖x_i‖²`` per row of ``x`` ``(M, D)``: ``(M,)``, one batched ``(1, D)·(D, 1)`` product in
    ``x``'s dtype, reading ``x`` once at memory speed (no ``x²`` temporary; written with the
    transposed view, the form the CPU BLAS runs at bandwidth: ``x.unsqueeze(2)`` is ~6× slower)."""
    rows = x.unsqueeze(1)
    return (rows @ rows.transpose(1, 2)).reshape(-1)
