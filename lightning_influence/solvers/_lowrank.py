"""HyperINF's damped GFIM in its low-rank (Woodbury) form, and the cost model that chooses it.

With ``G`` the ``(K, d)`` stack of the ``K = N·r`` rows of a block's ``N`` curvature gradients and
``G = U Σ Qᵀ`` its thin SVD (from the eigendecomposition of the ``K × K`` Gram ``GGᵀ = U Σ² Uᵀ``,
``Q = Gᵀ U Σ^{-1}``), the damped GFIM ``A = GᵀG/N + λI`` has the exact inverse (Woodbury)

    ``A^{-1} = (I − Q Qᵀ)/λ + Q diag(1/(σ²/N + λ)) Qᵀ = (I − Q diag(1 − w) Qᵀ)/λ``,  ``w = Nλ/(Nλ + σ²)``.

The quadratic form of a row ``v`` is then a sum of non-negative terms,
``λ·v A^{-1} vᵀ = ‖v − (vQ) Qᵀ‖² + Σ_k w_k (v·q_k)²``: no cancellation, so float32 keeps
~1e-6 relative accuracy even when ``v`` lies almost in the span of the curvature gradients
(``(‖v‖² − ‖L^{-1}G vᵀ‖²)/λ``, the Cholesky form, loses ``‖v‖²/(λ q)`` times float32's epsilon
there: 5e-3 on a test with ``‖v‖²/(λq) ≈ 7e3``, see benchmarks/solve_llm.py).

Fitting costs ``3K²d + 9K³`` flops (the Gram, its eigendecomposition, ``Q``) and keeps ``Q``
(``K × d``, the size of the gradients); a row's quadratic form costs ``4Kd``. The dense forms
keep ``X`` (``d²`` numbers; a row costs ``2d²``) after the Gram (``K d²``): the direct form
factors ``A = L Lᵀ`` and inverts from ``L`` (``d³/3 + 2d³/3`` flops, LAPACK's potrf and potri),
the Schulz iteration takes about :data:`SCHULZ_STEPS` steps of ``4d³`` (~80x the direct form).
All three are the same inverse. :func:`choose_form` (``form="auto"``): the low-rank form where
it keeps no more bytes than ``X`` (``K <= d``), else the direct one; the Schulz iteration only
when asked for.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .base import row_sq_norms

#: Schulz steps assumed by the cost model (measured: 12 to 25 for damped LoRA GFIMs; see docs/SCALING.md)
SCHULZ_STEPS = 20

#: elements of one ``(rows, K)`` product slice in the quadratic form (32 MiB in float32)
_SLICE_ELEMENTS = 1 << 23

#: random probes of the fitted inverse's residual ``‖(A X − I) p‖ / ‖p‖`` (an estimate of ``‖A X − I‖_F / √d``)
PROBES = 4


def form_cost(form: str, n: int, r: int, d: int, scored_rows: int | None = None,
              out_bytes: int = 4, fit_bytes: int = 8) -> dict[str, float]:
    """The modelled cost of one block of HyperINF in ``form`` (``"lowrank"``, ``"direct"`` or
    ``"schulz"``), fitted on ``n`` curvature gradients of shape ``(r, d)`` and scoring
    ``scored_rows`` rows (default ``n·r``) by the quadratic form: ``{"flops", "kept_bytes",
    "temp_bytes"}``: the floating-point operations of fit + score, the bytes the fitted solver
    keeps (``out_bytes`` per number), and the peak temporaries of its fit (computed in
    ``fit_bytes`` per number; the gathered gradients and the summed Gram, which the statistics
    hold, are not counted; for the low-rank form, the kept ``Q`` is made after the copy of ``G``
    is freed, so its bytes are taken off the temporaries)."""
    k = n * r
    rows = k if scored_rows is None else scored_rows
    if form == "lowrank":
        # the fit's copy of G and Q (fit dtype), the Gram, its eigenvectors and eigh's workspace
        return {"flops": 3.0 * k * k * d + 9.0 * k ** 3 + 4.0 * k * d * rows,
                "kept_bytes": float(k * d * out_bytes),
                "temp_bytes": float(2 * k * d * fit_bytes + 3 * k * k * fit_bytes - k * d * out_bytes)}
    if form == "direct":
        # A, its factor L and X = cholesky_inverse(L) in the fit dtype (L is freed before X is
        # symmetrised, one d x d at a time), plus one d x d in the output dtype as margin (with the
        # solver's 4 MiB for LAPACK, estimate_bytes is 1.03-1.18x the live peak at d = 768 and 2304
        # and 1.09x the RSS peak at d = 3072); potrf d³/3 and potri 2d³/3 flops
        return {"flops": float(k) * d * d + 1.0 * d ** 3 + 2.0 * d * d * rows,
                "kept_bytes": float(d * d * out_bytes),
                "temp_bytes": float(d * d * (3 * fit_bytes + out_bytes))}
    if form == "schulz":
        # A, X, R and X's update in the fit dtype; A, X, R in float32 for the first steps; X symmetrised
        return {"flops": float(k) * d * d + SCHULZ_STEPS * 4.0 * d ** 3 + 2.0 * d * d * rows,
                "kept_bytes": float(d * d * out_bytes),
                "temp_bytes": float(d * d * (5 * fit_bytes + 3 * 4))}
    raise ValueError(f"unknown hyperinf form {form!r}; choose 'auto', 'lowrank', 'direct' or 'schulz'")


def choose_form(n: int, r: int, d: int) -> str:
    """``"lowrank"`` when it keeps no more bytes than the dense ``X`` and needs no more flops (fit +
    scoring ``n·r`` rows) than the Schulz iteration, else ``"direct"``. In practice: ``n·r <= d``.

    The flops are compared with the Schulz iteration's, not the direct form's: for
    ``d/2 < n·r <= d`` the direct form needs fewer modelled flops (about 4x fewer at ``n·r = d``)
    and scores a row in ``2d²`` instead of ``4·n·r·d``, but the low-rank form is kept there: its
    float32 quadratic form is a sum of non-negative terms (5.6e-7 relative error on a test block
    where a float32 ``d × d`` inverse loses 6.6e-5 to cancellation, docs/SCALING.md), its fit
    is no slower in practice (24 blocks of (40, 8, 384) on 2 CPU threads: 0.3 s against 0.4-0.6 s
    for the direct form with its Gram) and it keeps ``n·r·d`` numbers instead of ``d²``."""
    low, dense = form_cost("lowrank", n, r, d), form_cost("schulz", n, r, d)
    if n * r > 0 and low["flops"] <= dense["flops"] and low["kept_bytes"] <= dense["kept_bytes"]:
        return "lowrank"
    return "direct"


#: below this ``K`` the CPU eigendecomposition runs on one thread (see :func:`_lapack_threads`)
_EIGH_ONE_THREAD = 2048


@contextlib.contextmanager
def _lapack_threads(k: int, device: torch.device) -> Iterator[None]:
    """One torch thread for a CPU eigendecomposition of ``K < 2048`` matrices: LAPACK's ``syevd``
    at that size is mostly memory-bound reduction to tridiagonal form and gains little from more
    threads, while on a loaded machine its threads wait on each other (measured on this 2-core
    machine under load: batched ``eigh`` of 12 matrices 384 x 384, 0.4 s on one thread, 7.9 s on
    two; one 1600 x 1600, 4.7 s against 8.4 s). The thread count is restored on exit."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or k >= _EIGH_ONE_THREAD or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def factor(grads: Tensor, counts: Sequence[int], dampings: Sequence[float],
           dtype: torch.dtype) -> tuple[Tensor, Tensor, list[float]]:
    """``Q`` and ``w`` of a stack of blocks ``grads`` ``(B, K, d)`` (``K = N·r`` rows each),
    computed in ``dtype``: ``(Q (B, K, d) — the right singular vectors as rows —, w (B, K),
    residuals)``. Directions whose ``σ²`` is under ``K·ε·σ_max²`` (rounding, not curvature) are
    left out (zero rows of ``Q``): their weight ``w`` would be 1 to that precision anyway.

    ``residuals[b]`` is ``max_p ‖(A X − I) p‖ / ‖p‖`` over :data:`PROBES` Gaussian probes ``p``,
    whose square estimates ``‖A X − I‖_F² / d``: the measure the Schulz iteration stops on.
    Every damping must be positive (``A`` is singular otherwise)."""
    b, k, d = grads.shape
    if any(not float(lam) > 0 for lam in dampings):
        raise ValueError("hyperinf's low-rank form needs damping > 0: with N·r < d rows the GFIM is singular")
    g = grads.to(dtype)
    shift = torch.tensor([float(n) * float(lam) for n, lam in zip(counts, dampings)], dtype=dtype, device=g.device)
    with _lapack_threads(k, g.device):
        evals, evecs = torch.linalg.eigh(torch.bmm(g, g.mT))     # GGᵀ = U Σ² Uᵀ, (B, K), (B, K, K)
    if not bool(torch.isfinite(evals).all()):
        raise ValueError("hyperinf's low-rank form: the curvature gradients are not finite")
    floor = evals[:, -1:].clamp_min(0) * (k * torch.finfo(dtype).eps)
    keep = evals > floor
    inv_sigma = torch.where(keep, evals.clamp_min(torch.finfo(dtype).tiny).rsqrt(), torch.zeros_like(evals))
    q = torch.bmm(evecs.mT, g).mul_(inv_sigma.unsqueeze(-1))    # Qᵀ = Σ^{-1} Uᵀ G, (B, K, d)
    del evecs
    w = torch.where(keep, shift.view(b, 1) / (shift.view(b, 1) + evals.clamp_min(0)), torch.ones_like(evals))
    lam = torch.tensor([float(x) for x in dampings], dtype=dtype, device=g.device).view(b, 1, 1)
    inv_n = torch.tensor([1.0 / max(int(n), 1) for n in counts], dtype=dtype, device=g.device).view(b, 1, 1)
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(d, PROBES, generator=gen, dtype=torch.float64).to(g.device, dtype).expand(b, d, PROBES)
    y = (p - q.mT @ ((q @ p) * (1 - w).unsqueeze(-1))) / lam    # X p
    res = g.mT @ (g @ y) * inv_n + lam * y - p                   # A X p − p
    residual = (res.norm(dim=1) / p.norm(dim=1)).amax(dim=1)
    return q, w, [float(x) for x in residual.double().cpu()]


def quadratic(qs: Sequence[Tensor], ws: Sequence[Tensor], lams: Sequence[float], vectors: Tensor) -> Tensor:
    """``v A^{-1} vᵀ = (‖v − (vQ)Qᵀ‖² + Σ_k w_k (v·q_k)²)/λ`` summed over the ``r`` rows of each
    vector, per block: ``qs[b]`` ``(K, d)``, ``ws[b]`` ``(K,)``, ``vectors`` ``(B, M, r, d)`` →
    ``(B, M)``. Two ``(rows, d) × (d, K)`` products per block and row slice (no ``d × d`` matrix,
    no ``(M·r, K)`` temporary)."""
    b, m, r, d = vectors.shape
    v = vectors.reshape(b, m * r, d)
    out = torch.empty(b, m * r, dtype=v.dtype, device=v.device)
    for i, (q, w, lam) in enumerate(zip(qs, ws, lams)):
        step = max(r, (max(1, _SLICE_ELEMENTS // max(q.shape[0], 1)) // r) * r)
        for s in range(0, m * r, step):
            part = v[i, s:s + step]
            p = part @ q.T                                            # (rows, K)
            perp = torch.addmm(part, p, q, alpha=-1.0)                # v − (vQ) Qᵀ
            out[i, s:s + step] = (row_sq_norms(perp) + (p * p) @ w) / lam
    return out.reshape(b, m, r).sum(-1)


def apply(q: Tensor, w: Tensor, lam: float, vectors: Tensor) -> Tensor:
    """``v A^{-1} = (v − ((vQ) ⊙ (1 − w)) Qᵀ)/λ`` for ``vectors`` ``(M, r, d)``: ``(M, r, d)``."""
    v = vectors.reshape(-1, vectors.shape[-1])
    return (torch.addmm(v, (v @ q.T) * (1 - w), q, alpha=-1.0) / lam).reshape(vectors.shape)
