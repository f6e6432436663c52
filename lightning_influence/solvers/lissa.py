"""LiSSA: the damped Neumann-series iteration on the empirical Fisher (flat ``D = r·d``)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import InverseSolver, flat, register_solver


@register_solver("lissa")
class LiSSASolver(InverseSolver):
    """``r_{t+1} = v + (I − α(C + λI)) r_t`` from ``r_0 = v``; returns ``α r_T → (C + λI)^{-1} v``.

    ``C u = Gᵀ(G u)/N`` with ``G`` the ``(N, D)`` flattened gradients (``C`` itself is formed
    only when ``D <= N``). ``α = 1/(1.05·λ̂_max + λ)``, with ``λ̂_max`` from ``power_iters``
    power iterations on ``C`` (capped by ``trace C``, an upper bound). Stops when
    ``max_m ‖r_{t+1} − r_t‖ / ‖r_t‖ < tol`` (``tol`` is raised to ``8·eps`` of the dtype, the
    rounding floor, for low precision); warns if ``max_iter`` is reached first.

    LiSSA needs O(condition number) iterations, each a product with every curvature gradient
    for every vector; applied to all training gradients (fvm) that is hours at the default
    ``tol``. So each :meth:`apply` call also stops after ``max_flops`` floating-point
    operations (default ``1e11``: about 2 s of one CPU core, milliseconds on a GPU; ``None``:
    no budget), but never before ``min_iter`` iterations, and warns that it stopped at its
    budget. ``info = {"iterations", "residual", "alpha", "iteration_cap"}``.
    """

    def __init__(self, tol: float = 1e-7, max_iter: int = 10000, power_iters: int = 30,
                 max_flops: float | None = 1e11, min_iter: int = 10) -> None:
        super().__init__()
        self.tol, self.max_iter, self.power_iters = float(tol), int(max_iter), int(power_iters)
        self.max_flops = None if max_flops is None else float(max_flops)
        self.min_iter = int(min_iter)

    def estimate_bytes(self, shapes: Sequence[tuple[int, int]], n_curvature: int, compute_bytes: int,
                       gathered: bool = True) -> int:
        """The gathered gradients (when ``gathered``), ``C`` (``D × D``) of every block with ``D <= N``,
        and the largest fit's temporary: ``G²`` (``N × D``, for ``trace C``), which is at least the
        ``D × D`` product ``GᵀG`` before its division by ``N``."""
        kept = sum((r * d) ** 2 for r, d in shapes if r * d <= n_curvature) * compute_bytes
        temp = n_curvature * max((r * d for r, d in shapes), default=0) * compute_bytes
        return super().estimate_bytes(shapes, n_curvature, compute_bytes, gathered) + kept + temp

    def _cap(self, m: int) -> int:
        """Iterations allowed for ``m`` vectors: ``max_iter``, or fewer under ``max_flops``."""
        if self.max_flops is None:
            return self.max_iter
        n, dim = self._g.shape
        per_iter = m * (2.0 * dim * dim if self._c is not None else 4.0 * n * dim) + 6.0 * m * dim
        return min(self.max_iter, max(self.min_iter, int(self.max_flops // max(per_iter, 1.0))))

    def _curv(self, u: Tensor) -> Tensor:
        """``C`` applied to the rows of ``u`` ``(K, D)``."""
        if self._c is not None:
            return u @ self._c
        return (u @ self._g.T) @ self._g / self._g.shape[0]

    def fit(self, grads: Tensor, damping: float) -> "LiSSASolver":
        """Keep ``G = flat(grads)`` ``(N, D)`` and choose the step ``α``; returns ``self``."""
        self._g = flat(grads.detach())
        n, dim = self._g.shape
        self._c = self._g.T @ self._g / n if dim <= n else None
        self._lam = float(damping)
        gen = torch.Generator().manual_seed(0)  # deterministic start: no dependence on sample order
        u = torch.randn(1, dim, generator=gen, dtype=torch.float64).to(self._g)
        top = 0.0
        for _ in range(self.power_iters):
            u = u / u.norm().clamp_min(torch.finfo(u.dtype).tiny)
            cu = self._curv(u)
            top = float((cu * u).sum())
            u = cu
        top = min(1.05 * top, float(self._g.pow(2).sum()) / n)  # trace(C) >= λ_max(C)
        self._alpha = 1.0 / (top + self._lam)
        self.info = {"alpha": self._alpha}
        return self

    def apply(self, vectors: Tensor) -> Tensor:
        """Apply ``(C + λI)^{-1}`` to ``vectors`` ``(M, r, d)``; returns ``(M, r, d)``."""
        v = flat(vectors).to(self._g)
        tol = max(self.tol, 8 * torch.finfo(v.dtype).eps)
        tiny = torch.finfo(v.dtype).tiny
        cap = self._cap(v.shape[0])
        r, res, t = v.clone(), math.inf, 0
        while t < cap:
            step = v - self._alpha * (self._curv(r) + self._lam * r)   # r_{t+1} − r_t
            res = float((step.norm(dim=1) / r.norm(dim=1).clamp_min(tiny)).max())
            r = r + step
            t += 1
            if res < tol or not math.isfinite(res):
                break
        if not res < tol:
            why = (f" (stopped at its work budget max_flops={self.max_flops:.3g}; raise it, or max_iter, "
                   "for a converged inverse)" if cap < self.max_iter else "")
            warnings.warn(f"lissa did not converge: {t} iterations, residual (relative step) {res:.3g} "
                          f">= tol {tol:.3g}{why}", RuntimeWarning, stacklevel=2)
        self.info = {"iterations": t, "residual": res, "alpha": self._alpha, "iteration_cap": cap}
        return (self._alpha * r).reshape(vectors.shape).to(vectors.dtype)
