"""HyperINF's damped GFIM in its low-rank (Woodbury) form, and the cost model that chooses it.

With ``G`` the ``(K, d)`` stack of the ``K = N·r`` rows of a block's ``N`` curvature gradients,
the damped GFIM ``A = GᵀG/N + λI`` has, by the Woodbury identity, the exact inverse

    ``A^{-1} = (I − Gᵀ (NλI + GGᵀ)^{-1} G) / λ = (I − WᵀW) / λ``,  ``W = L^{-1} G``,

with ``L`` the lower Cholesky factor of the ``K × K`` matrix ``NλI + GGᵀ``. Fitting costs
``2K²d + K³/3`` flops (the Gram ``GGᵀ``, its factor, one triangular solve) and keeps ``W``
(``K × d``, the size of the gradients); the quadratic form of a row ``v`` is
``(‖v‖² − ‖W vᵀ‖²)/λ``: ``2Kd`` flops. The Schulz iteration on the dense ``d × d`` matrix costs
``K d²`` (its Gram) plus about :data:`SCHULZ_STEPS` steps of ``4d³`` flops and keeps ``d²``
numbers; a row's quadratic form costs ``2d²``. So for ``K <= d`` the low-rank form is cheaper in
every count: fit, score and memory. It is the same inverse the Schulz iteration converges to.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import row_sq_norms

#: Schulz steps assumed by the cost model (measured: 12 to 25 for damped LoRA GFIMs; see docs/SCALING.md)
SCHULZ_STEPS = 20

#: elements of one ``(rows, K)`` product slice in the quadratic form (32 MiB in float32)
_SLICE_ELEMENTS = 1 << 23

#: random probes of the fitted inverse's residual ``‖(A X − I) p‖ / ‖p‖`` (an estimate of ``‖A X − I‖_F / √d``)
PROBES = 4


def form_cost(form: str, n: int, r: int, d: int, scored_rows: Optional[int] = None,
              out_bytes: int = 4, fit_bytes: int = 8) -> Dict[str, float]:
    """The modelled cost of one block of HyperINF in ``form`` (``"lowrank"`` or ``"schulz"``),
    fitted on ``n`` curvature gradients of shape ``(r, d)`` and scoring ``scored_rows`` rows
    (default ``n·r``) by the quadratic form: ``{"flops", "kept_bytes", "temp_bytes"}``: the
    floating-point operations of fit + score, the bytes the fitted solver keeps (``out_bytes``
    per number), and the peak temporaries of its fit (computed in ``fit_bytes`` per number;
    the gathered gradients and the summed Gram, which the statistics hold, are not counted;
    for the low-rank form, the kept ``W`` is made after the copy of ``G`` is freed, so its bytes
    are taken off the temporaries)."""
    k = n * r
    rows = k if scored_rows is None else scored_rows
    if form == "lowrank":
        # the fit's copy of G and W (fit dtype), the Gram and its factor
        return {"flops": 2.0 * k * k * d + k ** 3 / 3.0 + 2.0 * k * d * rows,
                "kept_bytes": float(k * d * out_bytes),
                "temp_bytes": float(2 * k * d * fit_bytes + 2 * k * k * fit_bytes - k * d * out_bytes)}
    if form == "schulz":
        # A, X, R and X's update in the fit dtype; A, X, R in float32 for the first steps; X symmetrised
        return {"flops": float(k) * d * d + SCHULZ_STEPS * 4.0 * d ** 3 + 2.0 * d * d * rows,
                "kept_bytes": float(d * d * out_bytes),
                "temp_bytes": float(d * d * (5 * fit_bytes + 3 * 4))}
    raise ValueError(f"unknown hyperinf form {form!r}; choose 'auto', 'lowrank' or 'schulz'")


def choose_form(n: int, r: int, d: int) -> str:
    """``"lowrank"`` when it needs no more flops (fit + scoring ``n·r`` rows) and keeps no more
    bytes than the Schulz iteration, else ``"schulz"``. In practice: ``n·r <= d``."""
    low, dense = form_cost("lowrank", n, r, d), form_cost("schulz", n, r, d)
    if n * r > 0 and low["flops"] <= dense["flops"] and low["kept_bytes"] <= dense["kept_bytes"]:
        return "lowrank"
    return "schulz"


def factor(grads: Tensor, counts: Sequence[int], dampings: Sequence[float],
           dtype: torch.dtype) -> Tuple[Tensor, List[float]]:
    """``W = L^{-1} G`` for a stack of blocks ``grads`` ``(B, K, d)`` (``K = N·r`` rows each), with
    ``L Lᵀ = N_b λ_b I + G_b G_bᵀ``, computed in ``dtype``: ``(W (B, K, d), residuals)``.

    ``residuals[b]`` is ``max_p ‖(A X − I) p‖ / ‖p‖`` over :data:`PROBES` Gaussian probes ``p``
    (``X = (I − WᵀW)/λ``), whose square estimates ``‖A X − I‖_F² / d``: the measure the Schulz
    iteration stops on. Every damping must be positive (``A`` is singular otherwise)."""
    b, k, d = grads.shape
    if any(not float(lam) > 0 for lam in dampings):
        raise ValueError("hyperinf's low-rank form needs damping > 0: with N·r < d rows the GFIM is singular")
    g = grads.to(dtype)
    shift = torch.tensor([float(n) * float(lam) for n, lam in zip(counts, dampings)], dtype=dtype, device=g.device)
    gram = torch.bmm(g, g.mT)                                    # (B, K, K)
    gram.diagonal(dim1=-2, dim2=-1).add_(shift.view(b, 1))
    chol, err = torch.linalg.cholesky_ex(gram)
    del gram
    if bool((err != 0).any()):  # only rounding can break positive definiteness of NλI + GGᵀ
        raise ValueError("hyperinf's low-rank form: NλI + GGᵀ is not positive definite (non-finite gradients?)")
    w = torch.linalg.solve_triangular(chol, g, upper=False)      # (B, K, d)
    del chol
    lam = torch.tensor([float(x) for x in dampings], dtype=dtype, device=g.device).view(b, 1, 1)
    inv_n = torch.tensor([1.0 / max(int(n), 1) for n in counts], dtype=dtype, device=g.device).view(b, 1, 1)
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(d, PROBES, generator=gen, dtype=torch.float64).to(g.device, dtype).expand(b, d, PROBES)
    y = (p - w.mT @ (w @ p)) / lam                               # X p
    res = g.mT @ (g @ y) * inv_n + lam * y - p                   # A X p − p
    residual = (res.norm(dim=1) / p.norm(dim=1)).amax(dim=1)
    return w, [float(x) for x in residual.double().cpu()]


def quadratic(ws: Sequence[Tensor], lams: Sequence[float], vectors: Tensor) -> Tensor:
    """``v A^{-1} vᵀ = (‖v‖² − ‖W vᵀ‖²)/λ`` summed over the ``r`` rows of each vector, per block:
    ``ws[b]`` ``(K, d)``, ``vectors`` ``(B, M, r, d)`` → ``(B, M)``. One ``(rows, d) × (d, K)``
    product per block and row slice (no ``d × d`` matrix, no ``(M·r, K)`` temporary)."""
    b, m, r, d = vectors.shape
    v = vectors.reshape(b, m * r, d)
    out = torch.empty(b, m * r, dtype=v.dtype, device=v.device)
    for i, (w, lam) in enumerate(zip(ws, lams)):
        step = max(r, (max(1, _SLICE_ELEMENTS // max(w.shape[0], 1)) // r) * r)
        for s in range(0, m * r, step):
            part = v[i, s:s + step]
            out[i, s:s + step] = (row_sq_norms(part) - row_sq_norms(part @ w.T)) / lam
    return out.reshape(b, m, r).sum(-1)


def apply(w: Tensor, lam: float, vectors: Tensor) -> Tensor:
    """``v A^{-1} = (v − (v Wᵀ) W)/λ`` for ``vectors`` ``(M, r, d)`` and ``w`` ``(K, d)``: ``(M, r, d)``."""
    v = vectors.reshape(-1, vectors.shape[-1])
    return ((v - (v @ w.T) @ w) / lam).reshape(vectors.shape)
