"""Gram matrices at the machine's limit: symmetric rank-k updates, float32 products with
float64 accumulation; and the Cholesky factor of the damped ones.

torch has no symmetric rank-k update (BLAS ``syrk``), which does half the work of the general
product ``xᵀx``. On the CPU, when SciPy is installed, its BLAS ``syrk`` is used (on the same
thread count as torch when ``threadpoolctl`` is there too); elsewhere (GPU, no SciPy) the
general product is used. Either way long sums are cut into row chunks whose products run in
the input's precision and are accumulated in ``accumulate`` (float64 by default).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

#: rows per product before accumulating in the wider dtype (float32 rounding grows with the sum's length)
ACCUMULATE_ROWS = 8192

try:  # optional: SciPy's BLAS for syrk, its LAPACK for Cholesky
    from scipy.linalg import blas as _blas
    from scipy.linalg import lapack as _lapack
except ImportError:  # pragma: no cover - SciPy is an optional dependency
    _blas = _lapack = None

_SYRK = {torch.float32: "ssyrk", torch.float64: "dsyrk"}
_POTRF = {torch.float32: "spotrf", torch.float64: "dpotrf"}


_CONTROLLER: list = []


@contextlib.contextmanager
def blas_threads() -> Iterator[None]:
    """Run SciPy's BLAS on torch's thread count (no-op without SciPy or ``threadpoolctl``)."""
    if _blas is None:
        yield
        return
    if not _CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
            _CONTROLLER.append(ThreadpoolController())  # scans the loaded libraries once
        except Exception:  # noqa: BLE001 - ImportError, or a platform threadpoolctl can't inspect
            _CONTROLLER.append(None)
    controller = _CONTROLLER[0]
    if controller is None:
        yield
        return
    with controller.limit(limits=torch.get_num_threads(), user_api="blas"):
        yield


def _syrk(x: Tensor, rows_first: bool, full: bool = True) -> Tensor | None:
    """``xᵀx`` (``rows_first``) or ``x xᵀ`` of a 2-D CPU tensor by BLAS syrk, or None; not
    ``full``: only the lower triangle is the product's (the upper is zero)."""
    if _blas is None or x.device.type != "cpu" or x.dtype not in _SYRK or x.requires_grad:
        return None
    x = x.contiguous()
    if x.shape[0] == 0 or x.shape[1] == 0:
        return None
    fn = getattr(_blas, _SYRK[x.dtype])
    a = x.numpy().T  # Fortran-ordered (cols, rows): no copy
    # syrk(trans=0): a aᵀ = xᵀx ; syrk(trans=1): aᵀ a = x xᵀ. The upper triangle is filled.
    upper = torch.from_numpy(fn(1.0, a, trans=0 if rows_first else 1, lower=0))
    if not full:  # the Fortran-ordered upper triangle is the C-ordered lower one of the transpose
        return upper.T
    return upper + upper.triu(1).T


def gram(x: Tensor, accumulate: torch.dtype | None = torch.float64, full: bool = True) -> Tensor:
    """``xᵀx`` of ``x`` ``(K, d)``: products in ``x``'s dtype over row chunks of
    :data:`ACCUMULATE_ROWS`, summed in ``accumulate`` (None: ``x``'s dtype). Not ``full``: only
    the lower triangle is guaranteed (enough for a Cholesky factor; saves the O(d²) passes that
    mirror it, which cost as much as a third of the product at d = 3072, K = 4000)."""
    acc = accumulate or x.dtype
    if x.device.type == "mps" and acc == torch.float64:
        acc = torch.float32  # no float64 on MPS
    out = None
    for part in (x.split(ACCUMULATE_ROWS) if x.shape[0] > ACCUMULATE_ROWS else (x,)):
        g = _syrk(part, rows_first=True, full=full)
        if g is None:
            g = part.T @ part
        out = g.to(acc) if out is None else out.add_(g.to(acc))
    if out is None:
        out = torch.zeros(x.shape[1], x.shape[1], dtype=acc, device=x.device)
    return out


def outer_gram(x: Tensor, full: bool = True) -> Tensor:
    """``x xᵀ`` of ``x`` ``(N, D)`` in ``x``'s dtype (a syrk where available); not ``full``: only
    the lower triangle is guaranteed."""
    g = _syrk(x, rows_first=False, full=full)
    return g if g is not None else x @ x.T


def cholesky_lower(matrix: Tensor, overwrite: bool = False):
    """The lower Cholesky factor of a symmetric positive-definite 2-D ``matrix``: ``(L, info)``
    as :func:`torch.linalg.cholesky_ex` (``info`` 0 on success). On the CPU with SciPy, its
    LAPACK ``potrf`` (OpenBLAS: ~1.35× the single-thread speed of the ``potrf`` torch calls
    at ``k = 3072``, float32); ``overwrite``: the factor may reuse ``matrix``'s memory."""
    if (_lapack is None or matrix.device.type != "cpu" or matrix.dtype not in _POTRF or matrix.requires_grad
            or matrix.ndim != 2 or matrix.shape[0] == 0):
        chol, info = torch.linalg.cholesky_ex(matrix)
        return chol, int(info)
    # a C-ordered symmetric matrix is its own Fortran-ordered transpose: potrf(lower) on the
    # transpose writes Lᵀ's upper triangle = L row-major, so no copy either way
    a = matrix.detach().contiguous().numpy().T
    factor, info = getattr(_lapack, _POTRF[matrix.dtype])(a, lower=0, overwrite_a=int(overwrite), clean=1)
    return torch.from_numpy(factor.T), int(info)
