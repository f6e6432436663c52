"""The identity "inverse": influence becomes a plain gradient dot product (TracIn at θ*)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import InverseSolver, register_solver


@register_solver("identity")
class IdentitySolver(InverseSolver):
    """No curvature: ``apply(v) = v``. ``info`` stays ``{}``. It needs no statistics of the
    curvature gradients, so fitting it reads nothing."""

    reductions: dict[str, str] = {}
    needs_damping = False  # fit_solvers computes no λ statistics for it

    def statistics(self, grads: Tensor) -> dict[str, Tensor]:
        return {}

    def estimate_bytes(self, shapes: Sequence[tuple[int, int]], n_curvature: int, compute_bytes: int,
                       gathered: bool = True) -> int:
        """Nothing: no statistics, nothing kept."""
        return 0

    def fit_statistics(self, stats: dict[str, Tensor], n: int, damping: float) -> "IdentitySolver":
        self.info = {}
        return self

    def fit(self, grads: Tensor, damping: float) -> "IdentitySolver":
        """Ignore ``grads`` ``(N, r, d)`` and ``damping``; returns ``self``."""
        self.info = {}
        return self

    def apply(self, vectors: Tensor) -> Tensor:
        """Return a copy of ``vectors`` ``(M, r, d)``."""
        return vectors.clone()

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``‖v‖²`` per vector of ``vectors`` ``(M, r, d)``."""
        flat = vectors.reshape(vectors.shape[0], 1, -1)
        return (flat @ flat.transpose(1, 2)).reshape(-1)

    @classmethod
    def quadratic_group(cls, solvers: Sequence["IdentitySolver"], vectors: Tensor) -> Tensor:
        """``‖v‖²`` of every vector of a group of blocks, ``vectors`` ``(B, M, r, d)`` → ``(B, M)``:
        one reduction over the (strided) group chunk, read once at memory speed, no copy."""
        return torch.linalg.vector_norm(vectors, dim=(2, 3)).square()
