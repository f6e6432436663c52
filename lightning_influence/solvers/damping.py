"""DataInf's damping rule: ``λ = factor · mean(g²)`` over the samples and entries of a block.

The one home of the rule: the pipeline (:func:`lightning_influence.scoring.fit_solvers`,
from a mean of ``g²`` streamed over the store and summed across ranks) and
:func:`datainf_damping` (from a gradient tensor) both go through :func:`damping_from_mean_square`.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: λ for a block whose ``factor · mean(g²)`` is not positive (all-zero gradients, e.g. a LoRA
#: ``B`` at init, or an empty block): the damped inverse must still exist. Fixed, not tied to a
#: dtype: the solvers compute in float32 or float64, where it is a normal number, and ``1/λ``
#: (about ``1e12``) keeps ``|g|²/λ`` finite in float32 for any gradient the store can hold.
ZERO_FLOOR = 1e-12


def check_damping(factor: float) -> float:
    """The one rule for a damping factor (the option ``damping``, relative or absolute): a finite
    number > 0, else ``ValueError``. Returns it as a float."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise ValueError(f"damping must be a finite number > 0, got {factor!r}")  # also rejects NaN
    return float(factor)


def damping_from_mean_square(mean_sq: float, factor: float = 0.1, rule: str = "relative") -> float:
    """λ for a block: ``factor · mean_sq`` (``rule="relative"``, DataInf's rule), or ``factor``
    itself (``rule="absolute"``). A relative λ that is not positive (``mean_sq`` zero or NaN)
    becomes :data:`ZERO_FLOOR`."""
    factor = check_damping(factor)
    if rule == "absolute":
        return factor
    value = float(factor) * float(mean_sq)
    if not value > 0.0:  # also catches NaN
        return ZERO_FLOOR
    return value


def datainf_damping(grads: Tensor, factor: float = 0.1) -> float:
    """Return ``factor * mean(grads**2)`` for ``grads`` of shape ``(N, r, d)``.

    If that is not positive (all-zero gradients, or an empty block), :data:`ZERO_FLOOR`
    is returned instead, so the damped inverse stays defined — the value the pipeline uses."""
    check_damping(factor)
    dtype = grads.dtype if grads.is_floating_point() else torch.get_default_dtype()
    mean_sq = float(grads.detach().to(dtype).pow(2).mean()) if grads.numel() else 0.0
    return damping_from_mean_square(mean_sq, factor)
