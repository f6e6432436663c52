"""Validation tuning for ``vm``/``fvm``: move a *copy* of the model to a validation minimum.

``vm`` takes plain SGD steps on the validation set; ``fvm`` takes SAM steps (a flat minimum),
with the maintained SAM of ``pytorch-optimizer``. Only the model passed in is changed: the
pipeline always hands over its own copy.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, List, Optional

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

    def loss_of(batch: Any) -> torch.Tensor:
        losses = default_loss(model, batch, loss_fn).losses
        finite = torch.isfinite(losses)
        return losses[finite].mean() if bool(finite.any()) else losses.sum() * 0.0

    window = max(1, config.steps // 10)
    first: List[float] = []
    last: List[float] = []
    batches = _endless(loader_factory)
    try:
        with torch.enable_grad():
            for step in range(config.steps):
                batch = to_device(next(batches))
                loss = loss_of(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if sharpness_aware:
                    optimizer.first_step(zero_grad=True)  # type: ignore[attr-defined]
                    loss_of(batch).backward()
                    optimizer.second_step(zero_grad=True)  # type: ignore[attr-defined]
                else:
                    optimizer.step()
                if schedule is not None:
                    schedule.step()
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
    stats = {"steps": float(config.steps), "val_loss_start": sum(first) / len(first),
             "val_loss_end": sum(last) / len(last)}
    if not math.isfinite(stats["val_loss_end"]):
        raise FloatingPointError(f"validation tuning diverged (loss {stats['val_loss_end']}); lower tuning.lr")
    return stats
