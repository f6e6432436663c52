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

from typing import Any, Dict, Mapping

import torch
from torch import Tensor

from .config import CurvatureConfig
from .solvers import InverseSolver, make_solver
from .distributed import Collectives
from .store import GradientStore

Blocks = Mapping[str, Tensor]


def fit_solvers(curvature: GradientStore, valid: Tensor, solver: Any, config: CurvatureConfig,
                device: torch.device, compute_dtype: torch.dtype, chunk: int,
                dist: Collectives = Collectives()) -> Dict[str, InverseSolver]:
    """One fitted solver per block. The curvature gradients (``(N, r, d)`` per block, this
    rank's shard, only rows where ``valid``) are streamed in chunks into each solver's
    statistics, combined across ranks (sum or concatenation), then fitted with DataInf's
    damping computed from the global mean of ``g²``. Every rank ends with identical solvers."""
    options = config.solver_options or {}
    fitted: Dict[str, InverseSolver] = {}
    for name in curvature.names:
        instance = make_solver(solver, **options) if isinstance(solver, (str, type)) else make_solver(solver)
        streaming = hasattr(instance, "statistics") and hasattr(instance, "fit_statistics")
        reductions = getattr(instance, "reductions", {"grads": "cat"}) if streaming else {"grads": "cat"}
        parts: Dict[str, list] = {key: [] for key in reductions}
        sumsq = torch.zeros((), dtype=torch.float64)
        for start, blocks in curvature.chunks(chunk):
            g = blocks[name][valid[start:start + blocks[name].shape[0]]].to(device, compute_dtype)
            sumsq += g.double().pow(2).sum().cpu()
            stats = instance.statistics(g) if streaming else {"grads": g}
            for key, value in stats.items():
                parts[key].append(value)
        r, d = curvature.shapes[name]
        count = dist.all_reduce_sum(torch.tensor([float(valid.sum()), float(sumsq)], dtype=torch.float64))
        n_total, sumsq_total = int(count[0]), float(count[1])
        combined: Dict[str, Tensor] = {}
        for key, how in reductions.items():
            if how == "sum":
                local = torch.stack(parts[key]).sum(0) if parts[key] else None
                if local is None:  # an empty shard still joins the collective with zeros
                    local = torch.zeros_like(instance.statistics(torch.zeros(1, r, d, device=device,
                                                                             dtype=compute_dtype))[key])
                combined[key] = dist.all_reduce_sum(local)
            else:
                local = torch.cat(parts[key]) if parts[key] else torch.zeros(0, r, d, device=device, dtype=compute_dtype)
                combined[key] = dist.all_gather_cat(local)
        if n_total == 0:
            raise ValueError(f"no valid curvature sample for block {name}")
        lam = _damping(sumsq_total / (n_total * r * d), config)
        fitted[name] = (instance.fit_statistics(combined, n_total, lam) if streaming
                        else instance.fit(combined["grads"], lam))
    return fitted


def _damping(mean_sq: float, config: CurvatureConfig) -> float:
    """λ: ``config.damping · mean(g²)`` (DataInf's rule), or ``config.damping`` if absolute."""
    if config.damping_rule == "absolute":
        return float(config.damping)
    # an all-zero block (e.g. a LoRA B at init) still needs a positive λ for the inverse to exist
    return float(config.damping) * mean_sq if mean_sq > 0 else 1e-12


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
