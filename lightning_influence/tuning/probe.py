"""The learning-rate probe: the validation loss along the first step's direction, for a grid of steps.

:func:`probe_lr` picks the tuning learning rate from the probe (:func:`probe_learning_rate`: on the
θ* check's batches or on a few of its own); :func:`grad_check_ids` draws the
validation samples it (and the gradient yardstick at θ*) runs on; :func:`tensor_scales` gives
each tensor's scale, which Adam's probe and its relative learning rates step by.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import TuningConfig
from ..losses import LossFn, default_loss
from .budget import FORWARD_COST
from .evaluation import mean_gradient

#: step sizes (fractions of each tensor's RMS) tried by the learning-rate probe
PROBE_STEPS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
#: the tuning learning rate is this fraction of the probe's best single step
PROBE_FACTOR = 0.25
#: validation samples the probe measures the loss on (whole mini-batches, at least one)
PROBE_SAMPLES = 64
#: the SGD probe tries η₀·4^-k for k = PROBE_OCTAVES ... -1 (η₀: the Polyak step)
PROBE_OCTAVES = 3
#: validation samples of the gradient yardstick at θ* (estimated; θ̃: the full set) and of the probe
GRAD_CHECK_SAMPLES = 32

#: the θ* check's probe batches, their mean gradient (one tensor per tuned parameter) and mean loss
ThetaStarCheck = tuple[list[Any], list[torch.Tensor], float]


def tensor_scales(params: list[nn.Parameter]) -> list[float]:
    """Each tensor's RMS, at least ``0.1 x`` the median positive RMS (1 when none is positive):
    tensors near 0 (a fresh bias, LoRA's B before training) get a floor proportional to the
    parameters' scale."""
    rms = [float(p.detach().double().pow(2).mean().sqrt()) if p.numel() else 0.0 for p in params]
    positive = sorted(r for r in rms if r > 0 and math.isfinite(r))
    floor = 0.1 * positive[len(positive) // 2] if positive else 1.0
    return [max(r, floor) for r in rms]


def grad_check_ids(val_size: int, seed: int, samples: int | None = None) -> list[int]:
    """The validation samples (sorted ids) of the gradient yardstick at θ* (the full-set norm at
    θ̃ is exact) and of the learning-rate probe: a seeded random subset of ``samples`` (default
    ``GRAD_CHECK_SAMPLES``; all when fewer)."""
    samples = GRAD_CHECK_SAMPLES if samples is None else samples
    if val_size <= samples:
        return list(range(val_size))
    g = torch.Generator().manual_seed((seed * 7_919 + 17) % 2**64)
    return sorted(torch.randperm(val_size, generator=g)[:samples].tolist())


def probe_lr(model: nn.Module, params: list[nn.Parameter], batches: list[Any], loss_fn: LossFn | None,
             optimizer: str = "sgd", factor: float = PROBE_FACTOR, grads: list[torch.Tensor] | None = None,
             base: float | None = None) -> tuple[float, dict[str, float]]:
    """A learning rate from a short probe of the validation loss (never from noise flags): the
    mean loss of ``batches`` at θ + η·d along the first step's direction ``d`` for a geometric
    grid of η, stopping once the loss rises above its value at θ or above the lowest value so far
    (past the valley's bottom: no larger η is better on a line through one valley);
    ``lr = factor x`` the best η.

    ``optimizer="sgd"``: ``d = -g`` (the probe batches' mean gradient) and the grid is
    ``η₀·2^-k`` around the Polyak step ``η₀ = L/‖g‖²`` (so the probe is scale-free: rescaling
    the parameters or the loss rescales η₀ with them). ``"adam"``: Adam's first step
    ``d = -sign(g) x RMS(tensor)`` with η a fraction of each tensor's RMS. θ is restored exactly.
    ``grads`` / ``base``: the batches' mean gradient (one tensor per parameter, of its shape) and
    mean loss at θ, when already measured (the tuning's θ* check measures both on the same
    batches), so the probe runs forward passes only. Returns ``(lr, {η: probe loss})`` (``"0"``:
    the loss at θ; the keys are η formatted ``.3g``)."""
    saved = [p.detach().clone() for p in params]

    def mean_loss() -> float:
        total, count = 0.0, 0
        for batch in batches:
            losses = default_loss(model, batch, loss_fn).losses.detach().double()
            ok = torch.isfinite(losses)
            total, count = total + float(losses[ok].sum()), count + int(ok.sum())
        return total / count if count else float("inf")

    if grads is None:
        grads, _, _, _ = mean_gradient(model, params, batches, loss_fn)
    if base is None:
        with torch.no_grad():
            base = mean_loss()
    if optimizer == "adam":
        directions = [-(g.sign() * s) for g, s in zip(grads, tensor_scales(params))]
        grid = list(PROBE_STEPS)
    else:
        sq = sum(float(g.double().pow(2).sum()) for g in grads)
        directions = [-g for g in grads]
        eta0 = base / sq if sq > 0 and math.isfinite(base) else 1.0
        grid = [eta0 * 4.0 ** -k for k in range(PROBE_OCTAVES, -2, -1)]
    curve: dict[str, float] = {"0": base}
    best, best_loss = grid[0], float("inf")
    try:
        with torch.no_grad():
            for eta in grid:
                for p, s, d in zip(params, saved, directions):
                    p.copy_(s).add_(d, alpha=eta)
                value = mean_loss()
                curve[f"{eta:.3g}"] = value
                if value < best_loss:
                    best, best_loss = eta, value
                if not value <= min(base, best_loss):  # past the valley's lowest point (or NaN): along
                    break  # a line through one valley, larger steps only get worse
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return factor * best, curve


def probe_learning_rate(model: nn.Module, params: list[nn.Parameter], loader_factory: Callable[[int], DataLoader],
                        config: TuningConfig, loss_fn: LossFn | None, to_device: Callable[[Any], Any],
                        check: ThetaStarCheck | None, check_samples: float) -> tuple[float, dict[str, float], float]:
    """``lr="auto"``: :func:`probe_lr` on the θ* check's batches, gradient and loss (eval mode;
    ``check_samples`` of them), else on ``PROBE_SAMPLES`` samples of their own shuffle. Returns
    ``(lr, {η: probe loss}, forward-backward passes of one sample spent)``."""
    factor = config.probe_factor  # for SGD times (1 - momentum) later: momentum amplifies a step 1/(1-β)
    if check is not None and not config.train_mode:  # the θ* check's batches, gradient and loss (eval mode)
        probe, grads_p, base_p = check
        lr, curve = probe_lr(model, params, probe, loss_fn, config.optimizer, factor, grads=grads_p, base=base_p)
        return lr, curve, (len(curve) - 1) * FORWARD_COST * check_samples
    probe_loader = loader_factory(-1)  # its own shuffle: not the first tuning pass's batches
    probe = [to_device(b) for b, _ in zip(probe_loader, range(max(1, PROBE_SAMPLES // config.batch_size)))]
    lr, curve = probe_lr(model, params, probe, loss_fn, config.optimizer, factor)
    size = min(PROBE_SAMPLES, max(config.batch_size, 1) * len(probe))
    return lr, curve, size * (1 + FORWARD_COST * len(curve))
