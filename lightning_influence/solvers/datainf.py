"""DataInf (Kwon et al., 2024): closed-form, swapped average/inverse of rank-one terms."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import InverseSolver, flat, register_solver, row_sq_norms


@register_solver("datainf")
class DataInfSolver(InverseSolver):
    """``(1/λ) [v − (1/N) Σ_i (g_i·v / (λ + ‖g_i‖²)) g_i]``, i.e. the mean over samples of the
    Sherman–Morrison inverses of ``g_i g_iᵀ + λI``, vectorised over samples and vectors.
    ``info = {}``."""

    def estimate_bytes(self, shapes: Sequence[tuple[int, int]], n_curvature: int, compute_bytes: int,
                       gathered: bool = True) -> int:
        """The gathered gradients (when ``gathered``; the fitted solver keeps a view of them) and
        every block's kept ``λ + ‖g_i‖²`` (``N`` numbers)."""
        kept = n_curvature * len(shapes) * compute_bytes
        return super().estimate_bytes(shapes, n_curvature, compute_bytes, gathered) + kept

    def fit(self, grads: Tensor, damping: float) -> "DataInfSolver":
        """Keep ``G = flat(grads)`` ``(N, D)`` and ``λ + ‖g_i‖²`` ``(N,)``; returns ``self``."""
        if damping <= 0:
            raise ValueError(f"datainf needs damping > 0, got {damping}")
        self._g = flat(grads)  # a view: the gradients are not copied
        self._lam = float(damping)
        self._denom = self._lam + row_sq_norms(self._g)  # one read of the gradients, no g² temporary
        self.info = {}
        return self

    def apply(self, vectors: Tensor) -> Tensor:
        """Apply the DataInf inverse to ``vectors`` ``(M, r, d)``; returns ``(M, r, d)``."""
        v = flat(vectors).to(self._g)
        coef = (v @ self._g.T) / self._denom                  # (M, N)
        out = (v - coef @ self._g / self._g.shape[0]) / self._lam
        return out.reshape(vectors.shape).to(vectors.dtype)

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``vᵀ apply(v) = (‖v‖² − (1/N) Σ_i (g_i·v)² / (λ + ‖g_i‖²)) / λ`` per vector: one
        ``(M, D) × (D, N)`` product instead of the two of :meth:`apply`. Returns ``(M,)``."""
        v = flat(vectors).to(self._g)
        coef = v @ self._g.T                                   # (M, N)
        sq = row_sq_norms(v)                                   # ‖v‖²
        drop = (coef * coef) @ (1.0 / self._denom)             # Σ_i (g_i·v)² / (λ + ‖g_i‖²)
        return ((sq - drop / self._g.shape[0]) / self._lam).to(vectors.dtype)
