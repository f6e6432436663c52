"""The identity "inverse": influence becomes a plain gradient dot product (TracIn at θ*)."""
from __future__ import annotations

from torch import Tensor

from .base import InverseSolver, register_solver


@register_solver("identity")
class IdentitySolver(InverseSolver):
    """No curvature: ``apply(v) = v``. ``info`` stays ``{}``."""

    def fit(self, grads: Tensor, damping: float) -> "IdentitySolver":
        """Ignore ``grads`` ``(N, r, d)`` and ``damping``; returns ``self``."""
        self.info = {}
        return self

    def apply(self, vectors: Tensor) -> Tensor:
        """Return a copy of ``vectors`` ``(M, r, d)``."""
        return vectors.clone()
