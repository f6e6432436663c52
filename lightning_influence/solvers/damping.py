"""DataInf's damping rule: ``λ = factor · mean(g²)`` over the samples and entries of a block."""
from __future__ import annotations

import torch
from torch import Tensor


def datainf_damping(grads: Tensor, factor: float = 0.1) -> float:
    """Return ``factor * mean(grads**2)`` for ``grads`` of shape ``(N, r, d)``.

    If that is not positive (all-zero gradients, or an empty block), a tiny positive value
    ``sqrt(finfo(dtype).tiny)`` is returned instead, so the damped inverse stays defined.
    """
    if factor < 0:
        raise ValueError(f"damping factor must be non-negative, got {factor}")
    dtype = grads.dtype if grads.is_floating_point() else torch.get_default_dtype()
    value = factor * float(grads.detach().to(dtype).pow(2).mean()) if grads.numel() else 0.0
    if not value > 0.0:  # also catches NaN
        return float(torch.finfo(dtype).tiny) ** 0.5
    return value
