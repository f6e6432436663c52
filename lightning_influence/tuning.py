"""Validation tuning for ``vm``/``fvm``: move a *copy* of the model to a validation minimum.

``vm`` takes plain SGD steps on the validation set; ``fvm`` takes SAM steps (a flat minimum),
with the maintained SAM of ``pytorch-optimizer``. Only the model passed in is changed: the
pipeline always hands over its own copy.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import TuningConfig
from .losses import LossFn, default_loss


def _endless(loader_factory: Callable[[int], DataLoader]) -> Iterator[Any]:
    epoch = 0
    while True:
        empty = True
        for batch in loader_factory(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError("the validation data is empty; vm/fvm need validation samples")
        epoch += 1


def tune(model: nn.Module, params: List[nn.Parameter], loader_factory: Callable[[int], DataLoader],
         config: TuningConfig, sharpness_aware: bool, loss_fn: Optional[LossFn] = None,
         to_device: Callable[[Any], Any] = lambda b: b,
         progress: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """Tune ``params`` of ``model`` in place for ``config.steps`` steps on the validation data.

    ``loader_factory(epoch)`` returns a shuffled loader over the validation set for that
    epoch (seeded by the caller, so tuning is deterministic). Returns summary statistics:
    the mean validation loss over the first and the last 10 % of the steps.
    """
    if config.steps == 0:
        return {"steps": 0}
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    tuned = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in tuned)
    model.train(config.train_mode)
    sgd_kwargs = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if sharpness_aware:
        from pytorch_optimizer import SAM

        optimizer: torch.optim.Optimizer = SAM(params, torch.optim.SGD, rho=config.rho,
                                               adaptive=config.adaptive, **sgd_kwargs)
    else:
        optimizer = torch.optim.SGD(params, **sgd_kwargs)
    stepped = getattr(optimizer, "base_optimizer", optimizer)  # SAM steps through its base SGD
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(stepped, T_max=config.steps)
                if config.schedule == "cosine" else None)

    def finite_loss(batch: Any) -> Tuple[Optional[torch.Tensor], Any]:
        """The batch's mean loss over its samples with a finite loss, and the batch those samples
        form. A non-finite sample is dropped from the batch (masking its loss is not enough: its
        NaN/inf activations would still reach the weight gradients as 0 * NaN). ``None`` if no
        finite loss is left."""
        losses = default_loss(model, batch, loss_fn).losses
        finite = torch.isfinite(losses.detach())
        if bool(finite.all()):
            return losses.mean(), batch
        if not bool(finite.any()):
            return None, batch
        batch = _select_rows(batch, finite, losses.shape[0])
        losses = default_loss(model, batch, loss_fn).losses
        return (losses.mean() if bool(torch.isfinite(losses.detach()).all()) else None), batch

    def grads_finite() -> bool:
        flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        return not flags or bool(torch.stack(flags).all())  # one device sync, not one per parameter

    window = max(1, config.steps // 10)
    skipped = 0
    first: List[float] = []
    last: List[float] = []
    batches = _endless(loader_factory)
    try:
        with torch.enable_grad():
            for step in range(config.steps):
                batch = to_device(next(batches))
                loss, batch = finite_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                if loss is not None:
                    loss.backward()
                if loss is None or not grads_finite():
                    skipped += 1  # a non-finite gradient would poison the weights: no step
                elif sharpness_aware:
                    optimizer.first_step(zero_grad=True)  # type: ignore[attr-defined]
                    perturbed, _ = finite_loss(batch)
                    if perturbed is not None:
                        perturbed.backward()
                    if perturbed is None or not grads_finite():
                        optimizer.zero_grad(set_to_none=True)  # second_step restores θ, takes no step
                        skipped += 1
                    optimizer.second_step(zero_grad=True)  # type: ignore[attr-defined]
                else:
                    optimizer.step()
                if schedule is not None:
                    with warnings.catch_warnings():  # a skipped step still advances the schedule
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                        schedule.step()
                if loss is not None:
                    value = float(loss.detach())
                    if step < window:
                        first.append(value)
                    if step >= config.steps - window:
                        last.append(value)
                if progress is not None:
                    progress(1)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise FloatingPointError("validation tuning diverged (non-finite weights); lower tuning.lr")
    if skipped == config.steps:
        raise FloatingPointError(f"validation tuning: all {skipped} steps had a non-finite validation loss or "
                                 "gradient; check the validation data for NaN/inf")
    if not last:  # finite steps first, then only non-finite losses: the weights ran away
        raise FloatingPointError(f"validation tuning diverged (non-finite loss over the last {window} steps); "
                                 "lower tuning.lr")
    if skipped:
        warnings.warn(f"validation tuning skipped {skipped} of {config.steps} steps with a non-finite loss or "
                      "gradient (samples with a non-finite loss are left out of every step)", RuntimeWarning)
    nan = float("nan")
    stats = {"steps": float(config.steps), "val_loss_start": sum(first) / len(first) if first else nan,
             "val_loss_end": sum(last) / len(last)}
    if not math.isfinite(stats["val_loss_end"]):
        raise FloatingPointError(f"validation tuning diverged (loss {stats['val_loss_end']}); lower tuning.lr")
    start, end = first[0], stats["val_loss_end"]  # the loss before the first update, and at the end
    if end > max(2 * start, start + 1.0):  # far beyond mini-batch noise: not a validation minimum
        warnings.warn(f"validation tuning raised the validation loss from {start:.4g} to {end:.4g}: it diverged, "
                      "and the scores are not taken at a validation minimum; lower tuning.lr", RuntimeWarning)
    return stats


def _select_rows(batch: Any, keep: torch.Tensor, size: int) -> Any:
    """The batch restricted to the samples where ``keep`` ``(size,)``: every tensor with leading
    dimension ``size`` is indexed (a batch of another structure is returned unchanged)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t[keep.to(t.device)] if isinstance(t, torch.Tensor) and t.dim() > 0
                    and t.shape[0] == size else t, batch)
