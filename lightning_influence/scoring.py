"""Score modes: curvature + solve per block, then the scores, streamed over gradient chunks.

Convention: a higher score means more harmful.

- ``standard`` (Koh & Liang): ``s_i = − v̄ᵀ (C_tr + λI)^{-1} g_i`` with ``v̄`` the mean
  validation gradient; curvature from the training gradients.
- ``vm`` / ``fvm`` (Ye et al., 2025): at a validation minimum, ``s_i = g̃_iᵀ (C̃_val + λI)^{-1} g̃_i``;
  curvature from the validation gradients.
- per-validation-point: ``S_ji = − g'_jᵀ (C + λI)^{-1} g_i``, an ``(m, n)`` matrix.

Every score is a sum over blocks (block-diagonal curvature).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from .config import CurvatureConfig
from .solvers import InverseSolver, make_solver
from .store import GradientStore

Blocks = Mapping[str, Tensor]


def damping_for(grads: Tensor, config: CurvatureConfig) -> float:
    """λ for one block: ``config.damping · mean(g²)`` over the curvature gradients
    ``(N, r, d)`` (DataInf's rule), or ``config.damping`` itself when the rule is absolute."""
    if config.damping_rule == "absolute":
        return float(config.damping)
    mean_sq = float(grads.double().pow(2).mean()) if grads.numel() else 0.0
    # an all-zero block (e.g. a LoRA B at init) still needs a positive λ for the inverse to exist
    return float(config.damping) * mean_sq if mean_sq > 0 else 1e-12


def fit_solvers(curvature: GradientStore, solver: Any, config: CurvatureConfig,
                device: torch.device, compute_dtype: torch.dtype) -> Dict[str, InverseSolver]:
    """One fitted solver per block, on the curvature gradients (``(N, r, d)`` per block)."""
    fitted: Dict[str, InverseSolver] = {}
    options = config.solver_options or {}
    for name in curvature.names:
        grads = curvature.block(name).to(device, compute_dtype)
        instance = make_solver(solver, **options) if isinstance(solver, (str, type)) else make_solver(solver)
        fitted[name] = instance.fit(grads, damping_for(grads, config))
    return fitted


def solver_info(solvers: Mapping[str, InverseSolver]) -> Dict[str, Any]:
    """The solvers' reports (iterations, residuals), per block and summarised."""
    per_block = {name: dict(getattr(s, "info", {}) or {}) for name, s in solvers.items()}
    iterations = [i["iterations"] for i in per_block.values() if "iterations" in i]
    residuals = [i["residual"] for i in per_block.values() if "residual" in i]
    summary: Dict[str, Any] = {"blocks": per_block}
    if iterations:
        summary["max_iterations"] = max(iterations)
    if residuals:
        summary["max_residual"] = max(residuals)
    return summary


def self_influence(train: GradientStore, solvers: Mapping[str, InverseSolver], chunk: int,
                   device: torch.device, compute_dtype: torch.dtype) -> Tensor:
    """``vm``/``fvm`` scores ``Σ_l g_lᵀ (C_l + λ_l I)^{-1} g_l`` for every stored sample: ``(n,)``."""
    scores = torch.zeros(len(train), dtype=torch.float64)
    for start, blocks in train.chunks(chunk):
        total = None
        for name, g in blocks.items():
            g = g.to(device, compute_dtype)
            part = (g * solvers[name].apply(g)).sum(dim=(1, 2))
            total = part if total is None else total + part
        scores[start:start + total.shape[0]] = total.double().cpu()
    return scores


def inverse_direction(direction: Blocks, solvers: Mapping[str, InverseSolver], device: torch.device,
                      compute_dtype: torch.dtype) -> Dict[str, Tensor]:
    """``(C_l + λ_l I)^{-1} v_l`` for a set of vectors per block, ``(M, r, d)`` each."""
    return {name: solvers[name].apply(v.to(device, compute_dtype)) for name, v in direction.items()}


def cross_influence(train: GradientStore, inverse: Blocks, chunk: int, device: torch.device,
                   compute_dtype: torch.dtype) -> Tensor:
    """``− Σ_l ⟨u_l, g_il⟩`` for precomputed ``u = (C + λI)^{-1} v`` of shape ``(M, r, d)`` per
    block: ``(M, n)``. With ``M = 1`` and ``v = v̄`` these are the ``standard`` scores."""
    m = next(iter(inverse.values())).shape[0]
    scores = torch.zeros(m, len(train), dtype=torch.float64)
    for start, blocks in train.chunks(chunk):
        total = None
        for name, g in blocks.items():
            u = inverse[name]
            part = u.reshape(m, -1) @ g.to(device, compute_dtype).reshape(g.shape[0], -1).T
            total = part if total is None else total + part
        scores[:, start:start + total.shape[1]] = -total.double().cpu()
    return scores
