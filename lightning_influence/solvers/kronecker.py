"""Two-sided generalised Fisher: a Kronecker-factored inverse of each block, from both sides.

HyperINF's GFIM (``hyperinf``) treats the ``r`` rows of a block's gradient ``g`` ``(r, d)`` as
sharing one ``d x d`` factor ``R = (1/N) Σ_i g_iᵀ g_i`` and inverts it from the right. This solver
also inverts the ``r x r`` factor ``L = (1/N) Σ_i g_i g_iᵀ`` from the left (the Kronecker
approximation ``F ≈ (L ⊗ R) / E‖g‖²`` of the empirical Fisher, as in K-FAC and Shampoo):

    ``apply(v) = s · (L + λ_L I)^{-1} v (R + λ_R I)^{-1}``,

with the damping relative to each factor's mean diagonal: ``λ_R = r·λ``, ``λ_L = d·λ`` (``λ``
the pipeline's per-block damping, ``factor · mean(g²)`` under DataInf's rule, so that ``λ_R`` is
``factor`` times the mean of ``diag R``, and ``λ_L`` of ``diag L``).

The scale ``s``: with ``balance=True`` (default) ``s = 1 / E‖g‖²``, so each block's term of a
summed score is free of the block's gradient scale (every block weighs alike; a block of large
gradients no longer drowns the others). With ``balance=False`` ``s = E‖g‖²``: the K-FAC-scaled
approximation of ``(F + λI)^{-1}``. The attribution benchmark (``benchmarks/attribution.py``)
measured the balanced form better at naming each test record's training records.

Streams: the statistics are the two sums ``Σ gᵀg`` ``(d, d)`` and ``Σ g gᵀ`` ``(r, r)``, combined
by summation across chunks and ranks; memory ``O(d² + r²)`` per block, no per-sample gradient kept.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import InverseSolver, register_solver


@register_solver("kronecker")
class KroneckerSolver(InverseSolver):
    """``(L + λ_L I)^{-1} v (R + λ_R I)^{-1}``, scaled (see the module docstring).

    Args:
        balance: ``True``: scale by ``1/E‖g‖²`` (scale-free blocks); ``False``: by ``E‖g‖²``
            (an approximation of the damped inverse Fisher).
    """

    reductions: dict[str, str] = {"left": "sum", "right": "sum", "sumsq": "sum"}

    def __init__(self, balance: bool = True) -> None:
        super().__init__()
        self.balance = bool(balance)
        self.left_inv: Tensor | None = None
        self.right_inv: Tensor | None = None
        self.scale = 1.0

    def statistics(self, grads: Tensor) -> dict[str, Tensor]:
        """``Σ g gᵀ`` ``(r, r)``, ``Σ gᵀ g`` ``(d, d)`` and ``Σ ‖g‖²`` of a chunk ``(N_c, r, d)``,
        accumulated in at least float32."""
        g = grads if grads.dtype in (torch.float32, torch.float64) else grads.float()
        return {"left": torch.einsum("nrd,nsd->rs", g, g), "right": torch.einsum("nrd,nre->de", g, g),
                "sumsq": g.square().sum().reshape(1)}

    def estimate_bytes(self, shapes: Sequence[tuple[int, int]], n_curvature: int, compute_bytes: int,
                       gathered: bool = True) -> int:
        """In float64 whatever ``compute_bytes`` (see :meth:`fit_statistics`): every block keeps its
        two inverses, ``r² + d²`` numbers, and the largest block's fit has its factors and LU
        temporaries alive too. At LLM shapes this is the solver's cost: a ``d × d`` inverse per
        block (GPT-2 small's 96 LoRA blocks: ~2.4 GiB). Besides, the summed statistics ``Σ g gᵀ`` and
        ``Σ gᵀ g`` of every block (``compute_bytes`` per number), held until the blocks are fitted."""
        sizes = [r * r + d * d for r, d in shapes]
        return (sum(sizes) + 2 * max(sizes, default=0)) * 8 + sum(sizes) * compute_bytes

    def fit(self, grads: Tensor, damping: float) -> "KroneckerSolver":
        """Fit from the curvature gradients ``grads`` ``(N, r, d)`` and the damping ``λ``."""
        return self.fit_statistics(self.statistics(grads), grads.shape[0], damping)

    def fit_statistics(self, stats: dict[str, Tensor], n: int, damping: float) -> "KroneckerSolver":
        left, right = stats["left"].double() / max(n, 1), stats["right"].double() / max(n, 1)
        r, d = left.shape[0], right.shape[0]
        mean_sq = float(stats["sumsq"].sum()) / max(n, 1)  # E‖g‖²
        self.left_inv = torch.linalg.inv(left + d * damping * torch.eye(r, dtype=left.dtype, device=left.device))
        self.right_inv = torch.linalg.inv(right + r * damping * torch.eye(d, dtype=right.dtype, device=right.device))
        self.scale = (1.0 / mean_sq if mean_sq > 0 else 1.0) if self.balance else mean_sq
        self.info = {"damping_left": d * damping, "damping_right": r * damping, "mean_sq_norm": mean_sq}
        return self

    def apply(self, vectors: Tensor) -> Tensor:
        """``s · L⁻¹ v R⁻¹`` for ``vectors`` ``(M, r, d)`` → ``(M, r, d)``, in their dtype."""
        if self.left_inv is None or self.right_inv is None:
            raise RuntimeError("KroneckerSolver.apply called before fit")
        left, right = self.left_inv.to(vectors), self.right_inv.to(vectors)
        return (left @ vectors @ right) * self.scale
