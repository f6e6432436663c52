"""Exact inverse of the damped empirical Fisher ``F + λI`` in the flat ``D = r·d`` space."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._linalg import ACCUMULATE_ROWS, cholesky_lower, gram, outer_gram
from .base import InverseSolver, flat, register_solver, row_sq_norms


def _factor(matrix: Tensor):
    """Cholesky factor of a symmetric positive-definite matrix of which only the lower triangle
    is read (and need be filled); LU of the mirrored matrix if Cholesky fails."""
    chol, err = cholesky_lower(matrix)
    if err == 0:
        return ("cholesky", chol)
    matrix = matrix.tril() + matrix.tril(-1).mT
    return ("lu", torch.linalg.lu_factor(matrix))


def _solve(factor, rhs: Tensor) -> Tensor:
    """Solve ``matrix @ x = rhs`` (``rhs``: ``(n, k)``) with a factor from :func:`_factor`."""
    kind, fac = factor
    if kind == "cholesky":
        return torch.cholesky_solve(rhs, fac)
    return torch.linalg.lu_solve(fac[0], fac[1], rhs)


@register_solver("exact")
class ExactSolver(InverseSolver):
    """``(F + λI)^{-1}`` with ``F = (1/N) Σ_i vec(g_i) vec(g_i)^T``.

    With ``G`` the ``(N, D)`` matrix of flattened gradients: if ``N < D`` the Woodbury
    identity ``(GᵀG/N + λI)^{-1} v = (v − Gᵀ (NλI + GGᵀ)^{-1} G v) / λ`` factors only the
    ``N × N`` matrix; otherwise the ``D × D`` matrix ``F + λI`` is formed and factored.
    Both factorisations run in the gradients' dtype (float32 in the pipeline), by LAPACK
    ``potrf`` through SciPy on a CPU when it is installed.
    ``info = {"method": "woodbury" | "dense"}``.

    Memory: the solver is fitted on all ``N`` curvature gradients of its block at once (the
    ``"cat"`` statistic), and :func:`~lightning_influence.scoring.fit_solvers` gathers them for
    every block before fitting any. From a store in RAM these are views of the store (no copy);
    from a spilled store they are read into memory: the whole curvature store, every block,
    even on the dense path, which keeps only the ``D × D`` factor afterwards. For a spilled
    store with ``N ≥ D`` that does not fit in memory, use ``hyperinf`` (a ``d × d`` sum per
    block, streamed).
    """

    def estimate_bytes(self, shapes: Sequence[tuple[int, int]], n_curvature: int, compute_bytes: int,
                       gathered: bool = True) -> int:
        """The gathered gradients (when ``gathered``), the kept factor of every block (``N × N``
        Woodbury, ``D × D`` dense) and the largest block's matrix before it is factored; past
        :data:`ACCUMULATE_ROWS` curvature rows, its Gram's float64 sum with a chunk's product and
        that product's float64 copy (``gram``), in place of the factor that is not made yet."""
        sides = [min(n_curvature, r * d) for r, d in shapes]
        kept = sum(k * k for k in sides) * compute_bytes
        accumulate = 8 + (8 if compute_bytes != 8 else 0) if n_curvature > ACCUMULATE_ROWS else 0
        return (super().estimate_bytes(shapes, n_curvature, compute_bytes, gathered) + kept
                + max(sides, default=0) ** 2 * max(compute_bytes, accumulate))

    def fit(self, grads: Tensor, damping: float) -> "ExactSolver":
        """Factor the damped Fisher of ``grads`` ``(N, r, d)``; returns ``self``."""
        g = flat(grads)
        n, dim = g.shape
        self._lam = float(damping)
        if n < dim:
            if self._lam <= 0:
                raise ValueError("the Woodbury path (N < r*d) needs damping > 0")
            self._g = g
            k = outer_gram(g, full=False)                      # G Gᵀ (lower triangle): a symmetric rank-k update
            k.diagonal().add_(n * self._lam)
            self._factor = _factor(k)
            self.info = {"method": "woodbury"}
        else:
            self._g = None
            # Gᵀ G / N (lower triangle): a symmetric rank-k update, accumulated in float64 only
            # when it sums several row chunks (one chunk's float32 product would be cast back unchanged)
            acc = torch.float64 if n > ACCUMULATE_ROWS else None
            f = gram(g, acc, full=False).to(g.dtype).div_(n)
            f.diagonal().add_(self._lam)
            self._factor = _factor(f)
            self.info = {"method": "dense"}
        return self

    def apply(self, vectors: Tensor) -> Tensor:
        """Apply ``(F + λI)^{-1}`` to ``vectors`` ``(M, r, d)``; returns ``(M, r, d)``."""
        ref = self._factor[1] if self._factor[0] == "cholesky" else self._factor[1][0]
        v = flat(vectors).to(ref)
        if self._g is not None:
            y = _solve(self._factor, self._g @ v.T)          # (N, M)
            out = (v - (self._g.T @ y).T) / self._lam
        else:
            out = _solve(self._factor, v.T).T
        return out.reshape(vectors.shape).to(vectors.dtype)

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``vᵀ (F + λI)^{-1} v`` per vector, from the Cholesky factor ``L`` by one triangular
        solve: Woodbury ``(‖v‖² − ‖L⁻¹ G v‖²) / λ``, dense ``‖L⁻¹ v‖²``. Returns ``(M,)``."""
        if self._factor[0] != "cholesky":
            return super().quadratic(vectors)
        chol = self._factor[1]
        v = flat(vectors).to(chol)
        rhs = self._g @ v.T if self._g is not None else v.T              # (N or D, M)
        w = torch.linalg.solve_triangular(chol, rhs, upper=False)
        wsq = (w * w).sum(0)
        if self._g is None:
            return wsq.to(vectors.dtype)
        sq = row_sq_norms(v)
        return ((sq - wsq) / self._lam).to(vectors.dtype)
