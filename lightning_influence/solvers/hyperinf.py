"""HyperINF (Zhou, Fan, Jaggi): Schulz's hyperpower iteration on the damped GFIM."""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor

from .base import InverseSolver, register_solver


@register_solver("hyperinf")
class HyperINFSolver(InverseSolver):
    """``v ↦ v X`` with ``X ≈ A^{-1}``, ``A = (1/N) Σ_i g_iᵀ g_i + λI`` (``d × d``, no ``1/r``).

    ``X_{k+1} = X_k (2I − A X_k)`` from ``X_0 = 2I / (‖A‖_1 + λ)`` (always convergent for the
    symmetric positive-definite ``A``),
    until ``‖I − A X‖_F / sqrt(d) < tol`` or ``max_iter`` updates; ``X`` is then symmetrised.
    The iteration runs in ``compute_dtype`` (``None``: the input dtype) and ``X`` is cast back.
    ``info = {"iterations": k, "residual": float}``; a run that does not converge (or stalls
    at the rounding floor of ``compute_dtype``) warns with both numbers.
    """

    def __init__(self, tol: float = 1e-6, max_iter: int = 100,
                 compute_dtype: Optional[torch.dtype] = torch.float64) -> None:
        super().__init__()
        self.tol, self.max_iter, self.compute_dtype = float(tol), int(max_iter), compute_dtype

    reductions = {"gram": "sum"}  # the d x d sum of g_iᵀ g_i: all-reduced, never the gradients

    def _dtype(self, like: Tensor) -> torch.dtype:
        dtype = self.compute_dtype or like.dtype
        return torch.float32 if dtype == torch.float64 and like.device.type == "mps" else dtype  # no fp64 on MPS

    def statistics(self, grads: Tensor) -> Dict[str, Tensor]:
        """``{"gram": Σ_i g_iᵀ g_i}`` ``(d, d)`` of a chunk ``(N_c, r, d)``."""
        gm = grads.detach().reshape(-1, grads.shape[-1]).to(self._dtype(grads))
        return {"gram": gm.T @ gm}

    def fit(self, grads: Tensor, damping: float) -> "HyperINFSolver":
        """Invert the damped GFIM of ``grads`` ``(N, r, d)``; returns ``self``."""
        self._out_dtype = grads.dtype
        return self.fit_statistics(self.statistics(grads), grads.shape[0], damping)

    def fit_statistics(self, stats: Dict[str, Tensor], n: int, damping: float) -> "HyperINFSolver":
        """Invert ``A = gram / n + λI`` by Schulz iteration; returns ``self``."""
        gram = stats["gram"]
        d, dtype = gram.shape[0], self._dtype(gram)
        eye = torch.eye(d, dtype=dtype, device=gram.device)
        a = gram.to(dtype) / max(n, 1) + float(damping) * eye
        # A is symmetric positive definite with λ <= eigenvalues <= ‖A‖_1, so X_0 = α I with
        # α = 2 / (‖A‖_1 + λ) puts every eigenvalue of A X_0 in (0, 2): the iteration always
        # converges, in about log2(κ) steps (half those of the generic start Aᵀ/(‖A‖_1 ‖A‖_∞)).
        alpha = 2.0 / (float(torch.linalg.matrix_norm(a, ord=1)) + float(damping))
        x = alpha * eye
        res, prev, k = math.inf, math.inf, 0
        while True:
            resid = eye - a @ x
            res = float(torch.linalg.matrix_norm(resid)) / math.sqrt(d)
            if res < self.tol or k >= self.max_iter or not res < prev:
                break  # converged, out of iterations, or stalled at the rounding floor (or NaN)
            x = x + x @ resid                                  # = X (2I − A X)
            prev, k = res, k + 1
        if not res < self.tol:
            warnings.warn(f"hyperinf: Schulz iteration did not converge: {k} iterations, "
                          f"residual {res:.3g} >= tol {self.tol:.3g}", RuntimeWarning, stacklevel=2)
        self._x = ((x + x.T) / 2).to(getattr(self, "_out_dtype", gram.dtype))
        self.info = {"iterations": k, "residual": res}
        return self

    def apply(self, vectors: Tensor) -> Tensor:
        """Return ``vectors @ X`` for ``vectors`` ``(M, r, d)``: shape ``(M, r, d)``."""
        if self._x.dtype != vectors.dtype and vectors.dtype in (torch.float32, torch.float64):
            # apply in the vectors' precision: X was computed in float64, the product needn't be
            cast = getattr(self, "_cast", None)
            if cast is None or cast.dtype != vectors.dtype:
                self._cast = cast = self._x.to(vectors.dtype)
            return vectors @ cast
        return (vectors.to(self._x) @ self._x).to(vectors.dtype)
