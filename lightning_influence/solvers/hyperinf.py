"""HyperINF (Zhou, Fan, Jaggi): the damped GFIM inverted by Schulz's hyperpower iteration (the
paper's method), by a float64 Cholesky factorisation (the same inverse, exact, for ~1/60 of the flops),
or in its low-rank Woodbury form."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _lowrank
from ._linalg import gram
from .base import InverseSolver, register_solver

#: rows of the (rows, d) slices of the CPU quadratic form (about 1.5 MiB at d = 384, float32)
_CACHE_ROWS = 1024

#: resident bytes the first Cholesky factorisation and inverse add beyond their matrices (LAPACK's
#: code and workspace: 3.5 MiB measured at d = 768 and 2304), counted once by :meth:`estimate_bytes`
_LAPACK_BYTES = 4 << 20


@register_solver("hyperinf")
class HyperINFSolver(InverseSolver):
    """``v ↦ v X`` with ``X = A^{-1}``, ``A = (1/N) Σ_i g_iᵀ g_i + λI`` (``d × d``, no ``1/r``).

    Three forms of the same inverse (``form``):

    - ``"direct"``: ``A`` (from the summed Gram) is factored ``A = L Lᵀ`` in ``compute_dtype``
      (batched ``torch.linalg.cholesky_ex``) and ``X = torch.cholesky_inverse(L)``: about ``d³``
      flops, exact to the rounding of ``compute_dtype`` (``‖A X − I‖ ≈ κ(A)·ε``). A block whose
      ``A`` is not positive definite to that precision (damping 0 and a singular Gram) falls back
      to the Schulz iteration (``info["cholesky_failed"] = True``).
    - ``"schulz"``: HyperINF's hyperpower iteration ``X_{k+1} = X_k (2I − A X_k)`` from
      ``X_0 = 2I / (‖A‖_1 + λ)`` (always convergent for the symmetric positive-definite ``A``),
      until ``‖I − A X‖_F / sqrt(d) < tol`` or ``max_iter`` updates; ``X`` is then symmetrised.
      While the residual is above ``float32_until`` (``None``: never) its products run in
      float32, the last quadratically converging steps in ``compute_dtype``: 12-25 steps of
      ``4d³`` flops, all matrix products (what a GPU runs nearest its peak).
    - ``"lowrank"``: when the curvature rows are few (``N·r <= d``: LoRA's MLP blocks, validation
      sets of tens to hundreds of samples) the inverse is exact by the Woodbury identity,
      ``A^{-1} = (I − Q diag(1 − w) Qᵀ)/λ`` with ``G = U Σ Qᵀ`` the SVD of the ``(N·r, d)`` stack of
      the curvature gradients and ``w = Nλ/(Nλ + σ²)``, computed in ``compute_dtype`` (from the
      eigendecomposition of ``GGᵀ``) and kept as ``Q`` and ``w``: ``O((Nr)²d)`` flops and
      ``N·r·d`` numbers instead of ``d²`` (see :mod:`._lowrank`).

    ``"auto"`` (the default) decides per block from ``N``, ``r``, ``d`` before the store is read
    (:meth:`plan`, :func:`._lowrank.choose_form`): ``"lowrank"`` when ``N·r <= d``, else
    ``"direct"``; ``"schulz"`` only when asked for. The low-rank form's statistics are the
    gradients themselves (``"cat"``), the dense forms' their ``d × d`` Gram (``"sum"``): a
    symmetric rank-k update with float32 products accumulated in ``compute_dtype`` (``None``: the
    input dtype). The fitted inverse is kept in the gradients' dtype. Blocks of equal ``d`` fitted
    together (:meth:`fit_group`) run as one batch, in batches whose temporaries stay under
    ``group_bytes``.

    ``info = {"form": "direct", "iterations": 0, "residual": float}``,
    ``{"form": "schulz", "iterations": k, "residual": float, "float32_iterations": k32}`` or
    ``{"form": "lowrank", "iterations": 0, "residual": float, "rank": N·r}``: the residual
    ``‖A X − I‖_F / √d``, estimated by :data:`._lowrank.PROBES` random probes for the direct and
    low-rank forms. A residual not under ``tol`` (an unconverged or stalled iteration, or an
    ill-conditioned ``A``) warns with both numbers.
    """

    def __init__(self, tol: float = 1e-6, max_iter: int = 100,
                 compute_dtype: torch.dtype | None = torch.float64,
                 float32_until: float | None = 1e-2, form: str = "auto",
                 group_bytes: int = 256 << 20) -> None:
        super().__init__()
        self.tol, self.max_iter, self.compute_dtype = float(tol), int(max_iter), compute_dtype
        self.float32_until = None if float32_until is None else float(float32_until)
        if form not in ("auto", "lowrank", "direct", "schulz"):
            raise ValueError(f"hyperinf form must be 'auto', 'lowrank', 'direct' or 'schulz', got {form!r}")
        self.form, self.group_bytes = form, int(group_bytes)
        self._form = "direct" if form == "auto" else form  # until plan() or fit() sees the shapes
        self.reductions = {"grads": "cat"} if self._form == "lowrank" else {"gram": "sum"}

    reductions = {"gram": "sum"}  # direct, Schulz: the d x d sum of g_iᵀ g_i, all-reduced, never the gradients

    def plan(self, n: int, r: int, d: int) -> str:
        """Choose this block's form for ``n`` curvature gradients of shape ``(r, d)`` (known before
        any is read; the same on every rank) and set :attr:`reductions` to match. Returns the form."""
        self._form = _lowrank.choose_form(n, r, d) if self.form == "auto" else self.form
        self.reductions = {"grads": "cat"} if self._form == "lowrank" else {"gram": "sum"}
        return self._form

    def estimate_bytes(self, shapes: Sequence[tuple[int, int]], n_curvature: int, compute_bytes: int,
                       gathered: bool = True) -> int:
        """Peak bytes of fitting these blocks (and keeping the fitted inverses), see
        :meth:`InverseSolver.estimate_bytes`: per block the kept ``Q`` or ``X``, the summed Gram
        (direct, Schulz) or the gathered gradients (low-rank, when ``gathered``), and the temporaries of
        the largest fitting batch (at most ``group_bytes``, at least one block). Not counted: a
        direct block whose factorisation fails and falls back to the Schulz iteration."""
        fit_bytes = 4 if self.compute_dtype == torch.float32 else 8
        total, temp = 0, 0
        counts: dict[tuple[int, int], int] = {}
        for shape in shapes:
            counts[tuple(shape)] = counts.get(tuple(shape), 0) + 1
        for (r, d), count in counts.items():
            form = _lowrank.choose_form(n_curvature, r, d) if self.form == "auto" else self.form
            cost = _lowrank.form_cost(form, n_curvature, r, d, out_bytes=compute_bytes, fit_bytes=fit_bytes)
            total += count * int(cost["kept_bytes"])
            if form != "lowrank":
                total += count * d * d * fit_bytes                    # the summed Grams, held until the fit
            elif gathered:
                total += count * n_curvature * r * d * compute_bytes  # the gathered gradients
            per = int(cost["temp_bytes"])
            batch = min(count, max(1, self.group_bytes // max(per, 1)))
            temp = max(temp, batch * per + (_LAPACK_BYTES if form == "direct" else 0))
        return total + temp

    def _dtype(self, like: Tensor) -> torch.dtype:
        dtype = self.compute_dtype or like.dtype
        return torch.float32 if dtype == torch.float64 and like.device.type == "mps" else dtype  # no fp64 on MPS

    def statistics(self, grads: Tensor) -> dict[str, Tensor]:
        """Direct and Schulz forms: ``{"gram": Σ_i g_iᵀ g_i}`` ``(d, d)`` of a chunk ``(N_c, r, d)``, a symmetric
        rank-k update with products in the gradients' precision, accumulated in ``compute_dtype``.
        Low-rank form: ``{"grads": grads}`` (no copy). The fitted inverse is kept in the
        gradients' dtype (float32 or float64)."""
        if grads.dtype in (torch.float32, torch.float64):
            self._out_dtype = grads.dtype
        if self._form == "lowrank":
            return {"grads": grads.detach()}
        gm = grads.detach().reshape(-1, grads.shape[-1])
        if gm.dtype not in (torch.float32, torch.float64):
            gm = gm.to(self._dtype(grads))
        return {"gram": gram(gm, self._dtype(grads))}

    def fit(self, grads: Tensor, damping: float) -> "HyperINFSolver":
        """Invert the damped GFIM of ``grads`` ``(N, r, d)`` (the form chosen from this shape
        unless fixed by ``form``); returns ``self``."""
        self._out_dtype = grads.dtype
        self.plan(*grads.shape)
        return self.fit_statistics(self.statistics(grads), grads.shape[0], damping)

    def fit_statistics(self, stats: dict[str, Tensor], n: int, damping: float) -> "HyperINFSolver":
        """Invert ``A = gram / n + λI`` (direct or Schulz form), or by the low-rank form from
        ``stats["grads"]``; returns ``self``."""
        return type(self).fit_group([self], [stats], [n], [damping])[0]

    @classmethod
    def fit_group(cls, solvers: Sequence["HyperINFSolver"], stats: Sequence[dict[str, Tensor]],
                  counts: Sequence[int], dampings: Sequence[float]) -> list["HyperINFSolver"]:
        """Fit several solvers at once: blocks with the same shape, form and options run as
        batched products (``(B, d, d)`` Cholesky factors or Schulz steps; ``(B, N·r, d)``
        low-rank factors), in batches whose temporaries stay under ``group_bytes`` (at least one
        block per batch)."""
        groups: dict[Any, list[int]] = {}
        for i, (solver, st) in enumerate(zip(solvers, stats)):
            if "grads" in st:
                g = st["grads"]
                key = (type(solver), "lowrank", tuple(g.shape), g.device, solver._dtype(g), solver.tol)
            else:
                form = "schulz" if solver._form == "schulz" else "direct"
                key = (type(solver), form, st["gram"].shape[0], st["gram"].device, solver._dtype(st["gram"]),
                       solver.tol, solver.max_iter, solver.float32_until)
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            first = solvers[idx[0]]
            fit_bytes = torch.empty((), dtype=key[4]).element_size()
            if key[1] == "lowrank":
                n, r, d = key[2]
                per = _lowrank.form_cost("lowrank", n, r, d, fit_bytes=fit_bytes)["temp_bytes"]
            else:
                per = _lowrank.form_cost(key[1], 1, 1, key[2], fit_bytes=fit_bytes)["temp_bytes"]
            size = max(1, int(first.group_bytes // max(per, 1)))
            for s in range(0, len(idx), size):
                part = idx[s:s + size]
                members = [solvers[i] for i in part]
                if key[1] == "lowrank":
                    cls._fit_lowrank(members, [stats[i]["grads"] for i in part], [counts[i] for i in part],
                                     [dampings[i] for i in part], key[4])
                    continue
                grams, ns, lams = [stats[i]["gram"] for i in part], [counts[i] for i in part], \
                    [dampings[i] for i in part]
                if key[1] == "direct":
                    xs, infos = first._direct(grams, ns, lams)
                else:
                    xs, infos = first._schulz(torch.stack(grams), ns, lams)
                for i, solver, x, info in zip(part, members, xs, infos):
                    solver._done(info, "Cholesky inverse" if info["form"] == "direct" else "Schulz iteration")
                    solver._x = x.to(solver._out_dtype or stats[i]["gram"].dtype)
                    solver._w = solver._cast = None
                del xs, x  # a batch's X in the fit dtype is not kept through the next batch's fit
        return list(solvers)

    def _direct(self, grams: Sequence[Tensor], counts: Sequence[int], dampings: Sequence[float]):
        """``X = (gram/n + λI)^{-1}`` for ``B`` Grams ``(d, d)`` by one batched Cholesky
        factorisation and ``cholesky_inverse`` in the fit dtype: ``(X (B, d, d), [info])``.

        Temporaries: ``A``, ``L`` and ``X`` (``(B, d, d)`` each; ``L`` freed once ``X`` exists).
        A block whose factorisation fails (``A`` not positive definite to working precision) is
        inverted by :meth:`_schulz` instead, alone (its temporaries are then a Schulz block's)."""
        b, d = len(grams), grams[0].shape[-1]
        dtype, device = self._dtype(grams[0]), grams[0].device
        a = _damped(grams, counts, dampings, dtype)
        try:  # below d = 2048 on one CPU thread: two wait on each other (10 s, not 0.08, on a loaded machine)
            with _lowrank._lapack_threads(d, device):
                chol, err = torch.linalg.cholesky_ex(a)
                failed = [int(i) for i in torch.nonzero(err).flatten().cpu()]
                if failed:  # potri would raise on their (partial) factors: identity in their place
                    chol[failed] = torch.eye(d, dtype=dtype, device=device)
                x = torch.cholesky_inverse(chol)
        except NotImplementedError:  # a backend without LAPACK's factorisations (MPS): the iteration
            del a
            return self._schulz(torch.stack(list(grams)), counts, dampings)
        del chol
        for xi in x:  # cholesky_inverse mirrors one triangle: symmetric already; this costs one d x d
            xi.copy_((xi + xi.mT).mul_(0.5))
        # ‖(A X − I) p‖ / ‖p‖ for PROBES Gaussian p: 4d² flops per probe, no d x d product
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(d, _lowrank.PROBES, generator=gen, dtype=torch.float64).to(device, dtype)
        res = torch.bmm(a, torch.bmm(x, p.expand(b, d, -1))).sub_(p)
        residual = (res.norm(dim=1) / p.norm(dim=0)).amax(dim=1).double().cpu()
        del a, res
        infos: list[dict[str, Any]] = [{"form": "direct", "iterations": 0, "residual": float(r)} for r in residual]
        for i in failed:  # one at a time: the fallback's temporaries stay a single block's
            xf, (info,) = self._schulz(grams[i].unsqueeze(0), [counts[i]], [dampings[i]])
            x[i] = xf[0]
            infos[i] = dict(info, cholesky_failed=True)
        return x, infos

    @classmethod
    def _fit_lowrank(cls, members: Sequence["HyperINFSolver"], grads: Sequence[Tensor], counts: Sequence[int],
                     dampings: Sequence[float], dtype: torch.dtype) -> None:
        """The low-rank factors ``Q``, ``w`` of blocks of equal shape ``(N, r, d)``, as one batch."""
        n, r, d = grads[0].shape
        g = torch.empty(len(grads), n * r, d, dtype=dtype, device=grads[0].device)  # one copy, in the fit dtype
        for i, x in enumerate(grads):
            g[i].copy_(x.reshape(n * r, d))
        qs, ws, residuals = _lowrank.factor(g, counts, dampings, dtype)
        del g
        for solver, q, w, lam, res, x in zip(members, qs, ws, dampings, residuals, grads):
            solver._done({"form": "lowrank", "iterations": 0, "residual": res, "rank": n * r}, "low-rank solve")
            out = solver._out_dtype or x.dtype
            solver._w, solver._weights = q.to(out), w.to(out)
            solver._lam = float(lam)
            solver._x = solver._cast = None

    def _done(self, info: dict[str, Any], what: str) -> None:
        """Record ``info``; warn if its residual is not under ``tol``."""
        if not info["residual"] < self.tol:
            warnings.warn(f"hyperinf: {what} did not converge: {info['iterations']} iterations, "
                          f"residual {info['residual']:.3g} >= tol {self.tol:.3g}", RuntimeWarning, stacklevel=4)
        self.info = info

    def _schulz(self, grams: Tensor, counts: Sequence[int], dampings: Sequence[float]):
        """``X ≈ (gram/n + λI)^{-1}`` for a stack ``(B, d, d)``: ``(X (B, d, d), [info])``.

        While the residual is above ``float32_until`` the products run in float32 (half the
        time of float64 on a CPU, far less on a GPU); the last, quadratically converging steps
        and the residual that decides convergence run in ``compute_dtype``."""
        b, d = grams.shape[0], grams.shape[-1]
        dtype = self._dtype(grams)
        eye = torch.eye(d, dtype=dtype, device=grams.device)
        lam = torch.tensor([float(x) for x in dampings], dtype=dtype, device=grams.device).view(b, 1, 1)
        a = _damped(grams, counts, dampings, dtype)  # no (B, d, d) temporaries beyond A
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
        if first:  # X_1 = 2αI − α²A
            x = a * -(alpha * alpha)
            x.diagonal(dim1=-2, dim2=-1).add_(2 * alpha.view(b, 1))
        else:
            x = alpha * eye.expand(b, d, d)
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
        x = (x + x.transpose(-1, -2)).mul_(0.5)
        infos = [{"form": "schulz", "iterations": int(iters[i]), "residual": float(res[i]),
                  "float32_iterations": int(low_iters[i])} for i in range(b)]
        return x, infos

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``Σ_{r,d} v ⊙ (v X)`` per vector of ``vectors`` ``(M, r, d)``: ``(M,)``."""
        return type(self).quadratic_group([self], vectors.unsqueeze(0))[0]

    @classmethod
    def quadratic_group(cls, solvers: Sequence["HyperINFSolver"], vectors: Tensor) -> Tensor:
        """The quadratic forms of a group of blocks at once: ``vectors`` ``(B, M, r, d)`` →
        ``(B, M)``: one batched product with the stacked ``X`` ``(B, d, d)`` (Schulz), or one
        ``(M·r, d) × (d, N·r)`` product and its way back per block (low-rank:
        ``(‖v − (vQ)Qᵀ‖² + Σ_k w_k (v·q_k)²)/λ``, a sum of non-negative terms)."""
        low = [i for i, s in enumerate(solvers) if s._w is not None]
        if low:
            if len(low) < len(solvers):  # mixed forms: each part on its own
                out = torch.empty(vectors.shape[:2], dtype=vectors.dtype, device=vectors.device)
                dense = [i for i in range(len(solvers)) if i not in low]
                out[low] = cls.quadratic_group([solvers[i] for i in low], vectors[low])
                out[dense] = cls.quadratic_group([solvers[i] for i in dense], vectors[dense])
                return out
            qs = [s._w_for(vectors.dtype) for s in solvers]
            v = vectors if qs[0].dtype == vectors.dtype else vectors.to(qs[0].dtype)
            ws = [s._weights.to(qs[0].dtype) for s in solvers]
            return _lowrank.quadratic(qs, ws, [s._lam for s in solvers], v).to(vectors.dtype)
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

    _x: Tensor | None = None
    _w: Tensor | None = None  # the low-rank form's Q (K, d); its weights w in _weights
    _cast: Tensor | None = None  # the kept X or Q in the vectors' dtype (_kept_for)
    _out_dtype: torch.dtype | None = None  # the fitted inverse's dtype: the gradients' (statistics, fit)

    def _x_for(self, dtype: torch.dtype) -> Tensor:
        """``X`` in ``dtype`` for float32/float64 vectors (X was computed in float64, the product
        needn't be), cached."""
        return self._kept_for(self._x, dtype)

    def _w_for(self, dtype: torch.dtype) -> Tensor:
        """``Q`` (low-rank form) in ``dtype`` for float32/float64 vectors, cached."""
        return self._kept_for(self._w, dtype)

    def _kept_for(self, kept: Tensor, dtype: torch.dtype) -> Tensor:
        if kept.dtype == dtype or dtype not in (torch.float32, torch.float64):
            return kept
        cast = self._cast
        if cast is None or cast.dtype != dtype:
            self._cast = cast = kept.to(dtype)
        return cast

    def apply(self, vectors: Tensor) -> Tensor:
        """Return ``vectors A^{-1}`` for ``vectors`` ``(M, r, d)``: shape ``(M, r, d)`` (``vectors @ X``,
        or ``(v − ((vQ) ⊙ (1 − w)) Qᵀ)/λ`` in the low-rank form)."""
        if self._w is not None:
            q = self._w_for(vectors.dtype)
            return _lowrank.apply(q, self._weights.to(q.dtype), self._lam, vectors.to(q.dtype)).to(vectors.dtype)
        x = self._x_for(vectors.dtype)
        if x.dtype == vectors.dtype:
            return vectors @ x
        return (vectors.to(self._x) @ self._x).to(vectors.dtype)


def _damped(grams: Sequence[Tensor], counts: Sequence[int], dampings: Sequence[float], dtype: torch.dtype) -> Tensor:
    """``A = gram/n + λI`` for each of ``B`` Grams ``(d, d)`` (a list or a stacked tensor), as one
    ``(B, d, d)`` tensor in ``dtype``, built in place: no stacked copy of the Grams beside it."""
    d = grams[0].shape[-1]
    a = torch.empty(len(grams), d, d, dtype=dtype, device=grams[0].device)
    for i, (g, n, lam) in enumerate(zip(grams, counts, dampings)):
        a[i].copy_(g).mul_(1.0 / max(int(n), 1)).diagonal().add_(float(lam))
    return a
