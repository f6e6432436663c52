"""Validation tuning for ``vm``/``fvm``: move a *copy* of the model to a validation minimum.

``vm`` takes plain SGD steps on the validation set; ``fvm`` takes SAM steps (a flat minimum),
with the maintained SAM of ``pytorch-optimizer``. Only the model passed in is changed: the
pipeline always hands over its own copy. :func:`tune` runs the steps in order: the checks at θ*
(:func:`theta_star_checks`), the learning-rate probe (:func:`~.probe.probe_learning_rate`), the
optimiser (:func:`make_optimizer`), the step loop (:func:`step_loop`) and its final figures.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import TuningConfig
from ..losses import LossFn
from ..modes import preserved
from .budget import (
    FORWARD_COST,
    batches_per_pass,
    budget_epochs,
    endless_batches,
    planned_steps,
    steps_after_checks,
    validation_size,
)
from .evaluation import evaluate, finite_mean_loss, grads_finite, mean_gradient
from .probe import GRAD_CHECK_SAMPLES, ThetaStarCheck, probe_learning_rate, tensor_scales
from .report import StepFigures, ThetaStarFigures, TuningReport

#: SGD: the momentum's horizon ``1/(1-β)`` is at most a tenth of the planned steps, but long
#: enough to average the mini-batches of one probe's worth of samples:
#: ``β = min(momentum, max(1 - batch_size / GRAD_CHECK_SAMPLES, 1 - MOMENTUM_HORIZON / steps))``
MOMENTUM_HORIZON = 10.0

def theta_star_checks(model: nn.Module, params: list[nn.Parameter], eval_loader: Any, check_loader: Any,
                      loss_fn: LossFn | None, to_device: Callable[[Any], Any],
                      reference: list[nn.Parameter] | None,
                      ) -> tuple[ThetaStarFigures | None, ThetaStarCheck | None, float]:
    """The validation figures at θ* (see :func:`tune`): with ``eval_loader`` (the samples *outside*
    the check subset) and ``check_loader`` (the check subset) the full-set loss and accuracy (forward
    passes only outside the subset, the subset's own from its gradient pass: no sample is forwarded
    twice) and the full-set gradient norm of ``reference`` *estimated* on the check subset
    (:func:`mean_gradient` with ``others``), whose batches, gradient with respect to ``params`` and
    loss the probe reuses; with ``eval_loader`` only (then the whole set),
    the exact full-set figures; neither: nothing. Returns ``(figures, the check for the probe,
    forward-backward passes of one sample spent)``."""
    nan = float("nan")
    spent = 0.0
    if eval_loader is not None and check_loader is not None:  # θ*: full-set loss (forward only), gradient on a subset
        with torch.no_grad():
            loss_r, acc_r, m_r, _ = evaluate(model, eval_loader, loss_fn, to_device)
        union = list({id(p): p for p in [*(reference or []), *params]}.values())
        batches_c = [to_device(b) for b in check_loader]
        tally: dict[str, float] = {}
        with preserved(model, params=(), training=False):
            grads_c, loss_c, count_c, sq = mean_gradient(model, union, batches_c, loss_fn, reference, others=m_r,
                                                         tally=tally)
        by_id = {id(p): g for p, g in zip(union, grads_c)}
        grad0 = math.sqrt(sq) if math.isfinite(sq) and sq > 0 else nan  # ≤ 0: a degenerate draw, no yardstick
        check = (batches_c, [by_id[id(p)] for p in params], loss_c)
        spent += m_r * FORWARD_COST + count_c
        total = m_r + count_c
        loss0 = ((loss_r * m_r if m_r else 0.0) + (loss_c * count_c if count_c else 0.0)) / total if total else nan
        labelled = (m_r if acc_r == acc_r else 0) + tally.get("labelled", 0.0)
        correct = (acc_r * m_r if acc_r == acc_r else 0.0) + tally.get("correct", 0.0)
        acc0 = correct / labelled if labelled else nan
        return ThetaStarFigures(loss0, acc0, grad0, float(count_c)), check, spent
    if eval_loader is not None:  # θ*: full validation-set loss, accuracy and gradient norm (the yardstick)
        with torch.enable_grad():
            loss0, acc0, m0, grad0 = evaluate(model, eval_loader, loss_fn, to_device, grad_of=reference)
        spent += m0
        return ThetaStarFigures(loss0, acc0, grad0, float(m0)), None, spent
    return None, None, spent


def relative_groups(params: list[nn.Parameter], lr: float) -> list[dict[str, Any]]:
    """One parameter group per tensor with ``lr x RMS(tensor)``: a step moves every tensor by the
    same fraction of its own scale (scale-free). Tensors near 0 (a fresh bias, LoRA's B before
    training) get the floor ``0.1 x`` the median RMS, itself proportional to the parameters' scale."""
    return [{"params": [p], "lr": lr * s} for p, s in zip(params, tensor_scales(params))]


def momentum_for(config: TuningConfig, total: int) -> float:
    """SGD: momentum averages over ~1/(1-β) steps; a short budget of ``total`` steps gets a
    shorter horizon (at most a tenth of the steps), else most of its steps go to building the
    momentum up. 0 for Adam."""
    floor = 1.0 - config.batch_size / max(GRAD_CHECK_SAMPLES, config.batch_size)
    return (min(config.momentum, max(floor, 1.0 - MOMENTUM_HORIZON / total))
            if config.optimizer == "sgd" else 0.0)


def make_optimizer(params: list[nn.Parameter], config: TuningConfig, lr: float, momentum: float, total: int,
                   sharpness_aware: bool) -> tuple[torch.optim.Optimizer, Any | None]:
    """The optimiser (SAM over the base optimiser for fvm) and the learning-rate schedule over
    ``total`` steps (``None`` for a constant one)."""
    if config.optimizer == "adam":
        base: type = torch.optim.Adam
        kwargs: dict[str, Any] = dict(lr=lr, weight_decay=config.weight_decay)
        groups: Any = relative_groups(params, lr) if config.lr_scale == "relative" else params
    else:
        base = torch.optim.SGD
        kwargs = dict(lr=lr, momentum=momentum, weight_decay=config.weight_decay)
        groups = params
    if sharpness_aware:
        # not a cycle: importing pytorch_optimizer costs ~0.6 s, paid only by an fvm audit
        from pytorch_optimizer import SAM

        optimizer: torch.optim.Optimizer = SAM(groups, base, rho=config.rho, adaptive=config.adaptive, **kwargs)
    else:
        optimizer = base(groups, **kwargs)
    stepped = getattr(optimizer, "base_optimizer", optimizer)  # SAM steps through its base optimiser
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(stepped, T_max=total)
                if config.schedule == "cosine" else None)
    return optimizer, schedule


@dataclass
class _Loop:
    """The step loop's running tallies."""

    skipped: int = 0
    pass_means: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    pass_loss: float = 0.0
    pass_count: int = 0
    gap: float = 0.0
    gap_count: int = 0
    last_gap: float = float("nan")
    steps_run: int = 0
    stopped: bool = False
    runaway: bool = False


def _skip_step(optimizer: Any, params: list[nn.Parameter], state: _Loop) -> None:
    """A SAM step whose loss or gradient at θ + ε is not finite: the gradients are dropped, so
    ``second_step`` restores θ and takes no step. A non-finite θ itself means SAM's ε (ρ|θ|² g for
    ASAM) overflowed: θ ran away."""
    optimizer.zero_grad(set_to_none=True)
    state.skipped += 1
    state.runaway = not all(bool(torch.isfinite(p).all()) for p in params)


def _sam_step(optimizer: Any, model: nn.Module, params: list[nn.Parameter], batch: Any, loss: torch.Tensor,
              size: int, loss_fn: LossFn | None, state: _Loop) -> None:
    """SAM's two passes for a batch whose clean loss ``loss`` has been backpropagated."""
    optimizer.first_step(zero_grad=True)
    perturbed, _, _ = finite_mean_loss(model, batch, loss_fn)
    if perturbed is not None:
        perturbed.backward()
    if perturbed is None or not grads_finite(params):
        _skip_step(optimizer, params, state)
    else:
        state.runaway = False
        state.gap += (float(perturbed.detach()) - float(loss.detach())) * size
        state.gap_count += size
    optimizer.second_step(zero_grad=True)


def _momentum_sam_step(optimizer: Any, model: nn.Module, params: list[nn.Parameter], batch: Any,
                       loss_fn: LossFn | None, state: _Loop, ascent: list[torch.Tensor] | None,
                       ) -> tuple[torch.Tensor | None, int, list[torch.Tensor] | None]:
    """Momentum-SAM (MSAM, Becker, Altrock & Risse, 2024): one forward-backward pass per step.
    θ is perturbed to θ + ε with SAM's ε (radius ``rho``, ASAM's ``|θ|`` scaling included:
    :meth:`first_step` reads the direction from ``.grad``) along *minus* ``ascent``, the
    accumulated momentum (MSAM's perturbation, motivated by Nesterov's look-ahead along the
    momentum, with a SAM-sized radius), the batch's gradient is taken there, θ
    restored and stepped with it. The next direction is the base optimiser's momentum (SGD's
    ``momentum_buffer``, Adam's ``exp_avg``), or this step's gradient without one. Returns the
    perturbed mean loss (``None``: skipped), the samples it covers and the next direction."""
    if ascent is not None:
        for p, a in zip(params, ascent):
            p.grad = a.detach().neg()  # MSAM: ε along the *negative* momentum
        optimizer.first_step()
    optimizer.zero_grad(set_to_none=True)
    loss, _, size = finite_mean_loss(model, batch, loss_fn)
    if loss is not None:
        loss.backward()
    if loss is None or not grads_finite(params):
        _skip_step(optimizer, params, state)
        optimizer.second_step(zero_grad=True)
        return loss, size, ascent  # no step: the direction stays
    state.runaway = False
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    optimizer.second_step(zero_grad=True)
    base = getattr(optimizer, "base_optimizer", optimizer)
    moments = [base.state.get(p, {}) for p in params]
    return loss, size, [m.get("momentum_buffer", m.get("exp_avg", g)) for m, g in zip(moments, grads)]


def step_loop(model: nn.Module, params: list[nn.Parameter], loader_factory: Callable[[int], DataLoader],
              config: TuningConfig, optimizer: torch.optim.Optimizer, schedule: Any | None, total: int,
              per_pass: int, sharpness_aware: bool, loss_fn: LossFn | None, to_device: Callable[[Any], Any],
              progress: Callable[[int], None] | None, trained: float | None,
              ascent: list[torch.Tensor] | None = None) -> _Loop:
    """Up to ``total`` SGD/SAM steps on the validation mini-batches, skipping a step whose loss or
    gradient is not finite, stopping early at the end of a pass whose mean loss moved by at most
    ``config.tol`` (and is below ``trained``, the full-set loss at θ*, else the first pass's).
    With ``config.sam="momentum"`` (fvm) a step is one pass at θ + ε (:func:`_momentum_sam_step`;
    ``ascent``: the first step's ascent direction, one tensor per parameter, e.g. the θ* check's
    gradient; ``None``: the first step is not perturbed) and the losses tallied are the perturbed
    ones. The gradients are cleared afterwards."""
    nan = float("nan")
    state = _Loop()
    batches = endless_batches(loader_factory)
    one_pass = sharpness_aware and config.sam == "momentum"
    try:
        with torch.enable_grad():
            for step in range(total):
                batch = to_device(next(batches))
                if one_pass:
                    loss, size, ascent = _momentum_sam_step(optimizer, model, params, batch, loss_fn, state, ascent)
                else:
                    loss, batch, size = finite_mean_loss(model, batch, loss_fn)
                    optimizer.zero_grad(set_to_none=True)
                    if loss is not None:
                        loss.backward()
                    if loss is None or not grads_finite(params):
                        state.skipped += 1  # a non-finite gradient would poison the weights: no step
                    elif sharpness_aware:
                        _sam_step(optimizer, model, params, batch, loss, size, loss_fn, state)
                    else:
                        optimizer.step()
                if schedule is not None:
                    with warnings.catch_warnings():  # a skipped step still advances the schedule
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                        schedule.step()
                if loss is not None:
                    value = float(loss.detach())
                    if step == 0:
                        state.first.append(value)
                    state.pass_loss += value * size
                    state.pass_count += size
                state.steps_run = step + 1
                if progress is not None:
                    progress(1)
                if state.steps_run % per_pass == 0 or state.steps_run == total:  # a pass ends
                    mean = state.pass_loss / state.pass_count if state.pass_count else nan
                    state.last_gap = state.gap / state.gap_count if state.gap_count else nan
                    state.pass_means.append(mean)
                    state.pass_loss, state.pass_count, state.gap, state.gap_count = 0.0, 0, 0.0, 0
                    pass_means = state.pass_means
                    if (config.tol > 0 and len(pass_means) >= 2 and state.steps_run < total and math.isfinite(mean)
                            and mean < (trained if trained is not None else pass_means[0])  # no plateau of a divergence
                            and pass_means[-2] * (1 - config.tol) < mean <= pass_means[-2] * (1 + config.tol)):
                        state.stopped = True  # a plateau: at (or near) a validation minimum. A rising loss is an
                        break  # overshoot at a high learning rate: the decaying schedule goes on
    finally:
        optimizer.zero_grad(set_to_none=True)
    return state


def step_figures(state: _Loop, params: list[nn.Parameter], per_pass: int, sharpness_aware: bool,
                 seconds: float) -> StepFigures:
    """The step loop's figures; raises ``FloatingPointError`` when tuning diverged (non-finite
    weights or last pass) or every step was skipped, and warns when some were."""
    nan = float("nan")
    if state.runaway or not all(bool(torch.isfinite(p).all()) for p in params):
        raise FloatingPointError("validation tuning diverged (non-finite weights); lower tuning.lr")
    if state.skipped == state.steps_run:
        raise FloatingPointError(f"validation tuning: all {state.skipped} steps had a non-finite validation loss or "
                                 "gradient; check the validation data for NaN/inf")
    if not state.pass_means or not math.isfinite(state.pass_means[-1]):
        raise FloatingPointError("validation tuning diverged (non-finite loss over the last pass); lower tuning.lr")
    if state.skipped:
        warnings.warn(f"validation tuning skipped {state.skipped} of {state.steps_run} steps with a non-finite loss "
                      "or gradient (samples with a non-finite loss are left out of every step)", RuntimeWarning)
    return StepFigures(steps=float(state.steps_run), epochs=state.steps_run / per_pass,
                       stopped_early=float(state.stopped), val_loss_start=state.pass_means[0],
                       val_loss_end=state.pass_means[-1],
                       val_loss_first_batch=state.first[0] if state.first else nan,
                       sharpness=state.last_gap if sharpness_aware else nan, sharpness_aware=float(sharpness_aware),
                       steps_s=seconds)


def tune(model: nn.Module, params: list[nn.Parameter], loader_factory: Callable[[int], DataLoader],
         config: TuningConfig, sharpness_aware: bool, loss_fn: LossFn | None = None,
         to_device: Callable[[Any], Any] = lambda b: b,
         progress: Callable[[int], None] | None = None, eval_loader: Any = None,
         reference: list[nn.Parameter] | None = None, train_size: float | None = None,
         check_loader: Any = None) -> TuningReport:
    """Tune ``params`` of ``model`` in place on the validation data, for ``config.epochs`` passes
    (or ``config.steps`` steps), stopping early once a pass's mean loss falls by less than
    ``config.tol``.

    ``loader_factory(epoch)`` returns a shuffled loader over the validation set for that
    epoch (seeded by the caller, so tuning is deterministic). ``eval_loader`` (optional) is a
    sequential loader over the whole validation set: the full-set loss, accuracy and the
    gradient norm of ``reference`` (the audited parameters; ``grad_norm_start``, the yardstick
    for the gradient norm at θ̃, see :func:`~.checks.verify`) at θ* are measured on it before the
    first step. ``check_loader`` (optional, with ``eval_loader``): a sequential loader over a
    subset of the validation set (:func:`~.probe.grad_check_ids`); the loss at θ* is then
    measured over the full set with forward passes only, the full-set gradient norm at θ* is
    *estimated* on this subset, unbiased (:func:`~.evaluation.mean_gradient` with
    ``population``), and the learning-rate probe reuses that gradient and loss (eval mode), so
    the checks cost little.

    With ``epochs="auto"`` the checks are counted inside the budget (``config.budget`` training
    epochs of compute, ``train_size`` forward-backward passes): the tuning steps get what the full-set
    loss at θ*, the gradient check and the probe leave (at least ``MIN_STEP_SHARE`` of it).

    Returns a :class:`~.report.TuningReport`; its :meth:`~.report.TuningReport.as_dict` has
    ``steps``, ``epochs`` (passes run), ``planned_steps``, ``stopped_early``,
    ``val_loss_start``/``val_loss_end`` (mean mini-batch loss over the first and the last
    pass), ``val_loss_trained``/``val_acc_trained`` (full set at θ*, with ``eval_loader``),
    ``sharpness`` (fvm: SAM's perturbed-minus-clean mini-batch loss, mean over the last pass),
    ``grad_norm_start`` (full set at θ*, estimated with ``check_loader``), ``budget_epochs``
    (the budget in passes), ``check_epochs`` (the checks' estimated share of one training
    epoch), ``momentum`` and ``lr`` (used), ``check_s`` / ``probe_s`` / ``steps_s`` (seconds).
    """
    clock = time.perf_counter()
    m = validation_size(loader_factory)
    theta_star, check, spent = theta_star_checks(model, params, eval_loader, check_loader, loss_fn, to_device,
                                                 reference)
    check_s = time.perf_counter() - clock
    per_pass = batches_per_pass(loader_factory)
    epochs = budget_epochs(config, train_size, m, sharpness_aware)
    total = planned_steps(config, per_pass, epochs)
    budget = float(config.budget) if config.epochs == "auto" and config.steps is None else None
    report = TuningReport(check_s=check_s, budget_epochs=epochs, batches_per_pass=float(per_pass),
                          budget_training_epochs=budget, theta_star=theta_star)
    if total == 0:
        return report
    with preserved(model, training=config.train_mode, requires_grad=params):
        lr = config.lr
        curve: dict[str, float] | None = None
        clock = time.perf_counter()
        if lr == "auto":
            samples = theta_star.grad_check_samples if theta_star is not None else 0.0
            lr, curve, probed = probe_learning_rate(model, params, loader_factory, config, loss_fn, to_device, check,
                                                    samples)
            spent += probed
        probe_s = time.perf_counter() - clock
        total, check_epochs = steps_after_checks(config, total, per_pass, epochs, spent, m, train_size,
                                                 sharpness_aware)
        momentum = momentum_for(config, total)
        if config.lr == "auto" and config.optimizer == "sgd":
            lr = lr * (1 - momentum)
        optimizer, schedule = make_optimizer(params, config, lr, momentum, total, sharpness_aware)
        clock = time.perf_counter()
        state = step_loop(model, params, loader_factory, config, optimizer, schedule, total, per_pass,
                          sharpness_aware, loss_fn, to_device, progress,
                          theta_star.val_loss_trained if theta_star is not None else None,
                          ascent=check[1] if check is not None else None)
    loop = step_figures(state, params, per_pass, sharpness_aware, time.perf_counter() - clock)
    return TuningReport(check_s=check_s, budget_epochs=epochs, batches_per_pass=float(per_pass),
                        budget_training_epochs=budget,
                        planned_steps=float(total), planned_epochs=total / max(per_pass, 1), theta_star=theta_star,
                        probe_curve=curve, probe_s=probe_s, check_epochs=check_epochs, momentum=momentum,
                        lr=float(lr), loop=loop)
