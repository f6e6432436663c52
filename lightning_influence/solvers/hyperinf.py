"""HyperINF (Zhou, Fan, Jaggi): Schulz's hyperpower iteration on the damped GFIM."""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ._linalg import gram
from .base import InverseSolver, register_solver


#: rows of the (rows, d) slices of the CPU quadratic form (about 1.5 MiB at d = 384, float32)
_CACHE_ROWS = 1024


@register_solver("hyperinf")
class HyperINFSolver(InverseSolver):
    """``v ↦ v X`` with ``X ≈ A^{-1}``, ``A = (1/N) Σ_i g_iᵀ g_i + λI`` (``d × d``, no ``1/r``).

    ``X_{k+1} = X_k (2I − A X_k)`` from ``X_0 = 2I / (‖A‖_1 + λ)`` (always convergent for the
    symmetric positive-definite ``A``),
    until ``‖I − A X‖_F / sqrt(d) < tol`` or ``max_iter`` updates; ``X`` is then symmetrised.
    The iteration runs in ``compute_dtype`` (``None``: the input dtype) and ``X`` is cast back.
    The Gram matrix is a symmetric rank-k update with float32 products accumulated in float64;
    while the residual is above ``float32_until`` (``None``: never) the Schulz products run in
    float32, the last quadratically converging steps in ``compute_dtype``. Blocks of equal
    ``d`` fitted together (:meth:`fit_group`) iterate as one batched product.
    ``info = {"iterations": k, "residual": float, "float32_iterations": k32}``; a run that does not converge (or stalls
    at the rounding floor of ``compute_dtype``) warns with both numbers.
    """

    def __init__(self, tol: float = 1e-6, max_iter: int = 100,
                 compute_dtype: Optional[torch.dtype] = torch.float64,
                 float32_until: Optional[float] = 1e-2) -> None:
        super().__init__()
        self.tol, self.max_iter, self.compute_dtype = float(tol), int(max_iter), compute_dtype
        self.float32_until = None if float32_until is None else float(float32_until)

    reductions = {"gram": "sum"}  # the d x d sum of g_iᵀ g_i: all-reduced, never the gradients

    def _dtype(self, like: Tensor) -> torch.dtype:
        dtype = self.compute_dtype or like.dtype
        return torch.float32 if dtype == torch.float64 and like.device.type == "mps" else dtype  # no fp64 on MPS

    def statistics(self, grads: Tensor) -> Dict[str, Tensor]:
        """``{"gram": Σ_i g_iᵀ g_i}`` ``(d, d)`` of a chunk ``(N_c, r, d)``: a symmetric rank-k
        update with products in the gradients' precision, accumulated in ``compute_dtype``."""
        gm = grads.detach().reshape(-1, grads.shape[-1])
        if gm.dtype not in (torch.float32, torch.float64):
            gm = gm.to(self._dtype(grads))
        return {"gram": gram(gm, self._dtype(grads))}

    def fit(self, grads: Tensor, damping: float) -> "HyperINFSolver":
        """Invert the damped GFIM of ``grads`` ``(N, r, d)``; returns ``self``."""
        self._out_dtype = grads.dtype
        return self.fit_statistics(self.statistics(grads), grads.shape[0], damping)

    def fit_statistics(self, stats: Dict[str, Tensor], n: int, damping: float) -> "HyperINFSolver":
        """Invert ``A = gram / n + λI`` by Schulz iteration; returns ``self``."""
        return type(self).fit_group([self], [stats], [n], [damping])[0]

    @classmethod
    def fit_group(cls, solvers: Sequence["HyperINFSolver"], stats: Sequence[Dict[str, Tensor]],
                  counts: Sequence[int], dampings: Sequence[float]) -> List["HyperINFSolver"]:
        """Fit several solvers at once: the Schulz iterations of blocks with the same ``d`` (and
        the same options) run as batched products ``(B, d, d)``."""
        groups: Dict[Any, List[int]] = {}
        for i, (solver, st) in enumerate(zip(solvers, stats)):
            key = (type(solver), st["gram"].shape[0], st["gram"].device, solver._dtype(st["gram"]),
                   solver.tol, solver.max_iter, solver.float32_until)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            members = [solvers[i] for i in idx]
            xs, infos = members[0]._schulz(torch.stack([stats[i]["gram"] for i in idx]),
                                           [counts[i] for i in idx], [dampings[i] for i in idx])
            for solver, x, info in zip(members, xs, infos):
                if not info["residual"] < solver.tol:
                    warnings.warn(f"hyperinf: Schulz iteration did not converge: {info['iterations']} iterations, "
                                  f"residual {info['residual']:.3g} >= tol {solver.tol:.3g}", RuntimeWarning,
                                  stacklevel=3)
                solver._x = x.to(getattr(solver, "_out_dtype", stats[0]["gram"].dtype))
                solver._cast = None
                solver.info = info
        return list(solvers)

    def _schulz(self, grams: Tensor, counts: Sequence[int], dampings: Sequence[float]):
        """``X ≈ (gram/n + λI)^{-1}`` for a stack ``(B, d, d)``: ``(X (B, d, d), [info])``.

        While the residual is above ``float32_until`` the products run in float32 (half the
        time of float64 on a CPU, far less on a GPU); the last, quadratically converging steps
        and the residual that decides convergence run in ``compute_dtype``."""
        b, d = grams.shape[0], grams.shape[-1]
        dtype = self._dtype(grams)
        eye = torch.eye(d, dtype=dtype, device=grams.device)
        scale = torch.tensor([1.0 / max(n, 1) for n in counts], dtype=dtype, device=grams.device).view(b, 1, 1)
        lam = torch.tensor([float(x) for x in dampings], dtype=dtype, device=grams.device).view(b, 1, 1)
        a = grams.to(dtype) * scale + lam * eye
        # A is symmetric positive definite with λ <= eigenvalues <= ‖A‖_1, so X_0 = α I with
        # α = 2 / (‖A‖_1 + λ) puts every eigenvalue of A X_0 in (0, 2): the iteration always
        # converges, in about log2(κ) steps (half those of the generic start Aᵀ/(‖A‖_1 ‖A‖_∞)).
        # (‖A‖_F bounds λ_max too, and is often much closer to it: fewer iterations)
        top = torch.minimum(torch.linalg.matrix_norm(a, ord=1), torch.linalg.matrix_norm(a))
        alpha = 2.0 / (top.view(b, 1, 1) + lam)
        low = torch.float32 if (self.float32_until is not None and dtype == torch.float64
                                and grams.device.type != "mps") else None
        # X_0 = αI: its residual I − αA and the first update X_1 = α(2I − αA) need no product
        first = 1 if self.max_iter >= 1 else 0
        x = alpha * (eye + (eye - alpha * a)) if first else alpha * eye.expand(b, d, d)
        iters = torch.full((b,), first, dtype=torch.long)
        low_iters = torch.zeros(b, dtype=torch.long)
        res = torch.full((b,), math.inf, dtype=torch.float64)
        prev = torch.full((b,), math.inf, dtype=torch.float64)
        # each step: R = I − A X and X + X R, each one fused batched product (baddbmm: no temporaries)
        if low is not None:  # every block iterates in float32 (X kept in float32) until one is close
            a_low, x_low = a.to(low), x.to(low)
            eye_low = torch.eye(d, dtype=low, device=grams.device).expand(b, d, d)
            while True:
                r_low = torch.baddbmm(eye_low, a_low, x_low, alpha=-1.0)
                res_low = torch.linalg.matrix_norm(r_low).double().cpu() / math.sqrt(d)
                if bool(((res_low < self.float32_until) | ~(res_low < prev) | (iters >= self.max_iter)).any()):
                    break  # leave float32 for every block at once: one batch
                x_low = torch.baddbmm(x_low, x_low, r_low)
                prev = res_low
                iters += 1
                low_iters += 1
            x = x_low.to(dtype)
            prev = torch.full((b,), math.inf, dtype=torch.float64)
            del a_low, x_low, r_low
        eye_b = eye.expand(b, d, d)
        active = torch.arange(b)
        while active.numel():
            full = active.numel() == b
            xa, aa = (x, a) if full else (x[active], a[active])
            r = torch.baddbmm(eye_b[:active.numel()], aa, xa, alpha=-1.0)
            res_a = torch.linalg.matrix_norm(r).double().cpu() / math.sqrt(d)
            res[active] = res_a
            # converged, out of iterations, or stalled at the rounding floor (or NaN)
            done = (res_a < self.tol) | (iters[active] >= self.max_iter) | ~(res_a < prev[active])
            keep = ~done
            if bool(keep.all()):
                x = torch.baddbmm(xa, xa, r) if full else x.index_copy_(0, active, torch.baddbmm(xa, xa, r))
            elif bool(keep.any()):
                x[active[keep]] = torch.baddbmm(xa[keep], xa[keep], r[keep])  # = X (2I − A X)
            ka = active[keep]
            prev[ka] = res_a[keep]
            iters[ka] += 1
            active = ka
        x = (x + x.transpose(-1, -2)) / 2
        infos = [{"iterations": int(iters[i]), "residual": float(res[i]), "float32_iterations": int(low_iters[i])}
                 for i in range(b)]
        return x, infos

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``Σ_{r,d} v ⊙ (v X)`` per vector of ``vectors`` ``(M, r, d)``: ``(M,)``."""
        return type(self).quadratic_group([self], vectors.unsqueeze(0))[0]

    @classmethod
    def quadratic_group(cls, solvers: Sequence["HyperINFSolver"], vectors: Tensor) -> Tensor:
        """The quadratic forms of a group of blocks at once: ``vectors`` ``(B, M, r, d)`` →
        ``(B, M)``, one batched product with the stacked ``X`` ``(B, d, d)``."""
        b, m, r, d = vectors.shape
        xs = [s._x_for(vectors.dtype) for s in solvers]
        v = vectors.reshape(b, m * r, d)
        if xs[0].dtype != v.dtype:
            v = v.to(xs[0].dtype)
        if v.device.type != "cpu":  # one batched product: the GPU's way to its peak
            return (torch.bmm(v, torch.stack(xs)) * v).sum(-1).reshape(b, m, r).sum(-1)
        # on a CPU one product per block, in row slices whose (rows, d) product stays in cache:
        # a (B, M·r, d) temporary would be memory traffic, not arithmetic
        out = torch.empty(b, m * r, dtype=v.dtype)
        step = max(r, (_CACHE_ROWS // r) * r)
        for i, x in enumerate(xs):
            for s in range(0, m * r, step):
                part = v[i, s:s + step]
                out[i, s:s + step] = torch.linalg.vecdot(part @ x, part)
        return out.reshape(b, m, r).sum(-1)

    def _x_for(self, dtype: torch.dtype) -> Tensor:
        """``X`` in ``dtype`` for float32/float64 vectors (X was computed in float64, the product
        needn't be), cached."""
        if self._x.dtype == dtype or dtype not in (torch.float32, torch.float64):
            return self._x
        cast = getattr(self, "_cast", None)
        if cast is None or cast.dtype != dtype:
            self._cast = cast = self._x.to(dtype)
        return cast

    def apply(self, vectors: Tensor) -> Tensor:
        """Return ``vectors @ X`` for ``vectors`` ``(M, r, d)``: shape ``(M, r, d)``."""
        x = self._x_for(vectors.dtype)
        if x.dtype == vectors.dtype:
            return vectors @ x
        return (vectors.to(self._x) @ self._x).to(vectors.dtype)
