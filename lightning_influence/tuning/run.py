"""Stage 2 of the audit (vm/fvm): tune the working copy to θ̃, check it, retry a probe that overshot.

:func:`tune_and_check` runs :func:`~.steps.tune` on every rank, gathers the validation gradients
at θ̃ (:func:`validation_gradients`, which the scores reuse), judges θ̃ on the full validation
set from them (:func:`full_set_figures`, :func:`~.checks.minimum_check`) and, when the loss rose
under a probed learning rate, restarts from θ* at a smaller one; every rank takes the same decision.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..config import TuningConfig
from ..data import sequential_loader, to_device
from ..distributed import Collectives
from ..gathering import Gathered, gather_gradients, training_losses
from ..losses import LossFn
from ..params import Block
from ..precision import full_precision
from ..progress import Progress, StageTimes
from ..store import GradientStore
from .budget import bucketed_loader_factory, budget_epochs, planned_steps, relative_sample_cost
from .checks import gradient_noise_test, minimum_check, retry_config, retry_due
from .probe import grad_check_ids
from .report import Attempt, TuningReport
from .steps import tune

#: the full validation-set figures at θ̃: loss, accuracy, mean-gradient norm, noise ratio, ``z``
Figures = tuple[float, float, float, float, float]


def tune_and_check(working: nn.Module, blocks: list[Block], train_data: Any, val_data: Any, config: TuningConfig,
                   sharpness_aware: bool, loss_fn: LossFn | None, batch_size: int, device: torch.device, seed: int,
                   n: int, m: int, train_ids: Tensor, val_ids: Tensor, gather: dict[str, Any], stages: StageTimes,
                   progress: Progress, dist: Collectives, exact_gradients: bool, loss_at_trained: bool = True,
                   ) -> tuple[Tensor | None, dict[str, float], Gathered]:
    """Tune ``working`` in place to θ̃ and check it on the full validation set.

    Returns the training losses at θ* ``(n_r,)`` (this rank's shard ``train_ids``; ``None``
    unless ``loss_at_trained``), the tuning figures (:meth:`~.report.TuningReport.as_dict` of
    :func:`~.steps.tune`'s report, checked by :func:`~.checks.minimum_check`) and the validation
    gradients at θ̃ (this rank's shard ``val_ids``: ``(m_r, ...)`` per block), which the check
    needs and the scores reuse. When the full-set loss rose with a probed learning rate, tuning
    restarts from θ* at a smaller one (:func:`~.checks.retry_config`, ``config.retries`` times
    at most); every rank takes the same decision (all-reduced figures)."""
    tuned_params = ([b.param for b in blocks] if config.params == "audited"
                    else [p for p in working.parameters() if p.requires_grad])

    def losses_stage() -> Tensor:
        with stages("loss_at_trained"):
            return training_losses(working, train_data, batch_size, device, loss_fn, train_ids)

    loss_trained = dist.checkpoint(losses_stage) if loss_at_trained else None
    factory = bucketed_loader_factory(val_data, config.batch_size, seed, "val_data", pool=50 if config.bucket else 0)
    cost = relative_sample_cost(train_data, val_data, seed) if config.epochs == "auto" else 1.0
    check_ids = grad_check_ids(m, seed)  # the samples of the gradient yardstick at θ* and the lr probe
    chosen = set(check_ids)
    others = [i for i in range(m) if i not in chosen]  # the loss at θ*: forward passes of these only
    # at least four batches: the yardstick pairs samples from different batches
    check_batch = min(config.batch_size, max(1, -(-len(check_ids) // 4)))
    # θ* kept (on the CPU) for a retry
    start = [p.detach().to("cpu", copy=True) for p in tuned_params] if config.lr == "auto" and config.retries else []
    attempt_cfg: TuningConfig = config
    first: TuningReport | None = None  # the first attempt's: its θ* figures and probe stand for every retry
    attempts: list[Attempt] = []
    for attempt in range(config.retries + 1):
        total = planned_steps(attempt_cfg, len(factory(0)), budget_epochs(attempt_cfg, n * cost, m, sharpness_aware))

        def tune_stage() -> TuningReport:
            checks = first is None  # the θ* figures and the probe: the first attempt only
            with stages("tuning"), progress.stage("tuning", total) as update:
                return tune(working, tuned_params, factory, attempt_cfg, sharpness_aware, loss_fn,
                            lambda b: to_device(b, device), update,
                            eval_loader=sequential_loader(val_data, batch_size, others, "val_data") if checks else None,
                            reference=[b.param for b in blocks], train_size=n * cost,
                            check_loader=sequential_loader(val_data, check_batch, check_ids, "val_data")
                            if checks else None)

        report = dist.checkpoint(tune_stage)
        if first is not None:  # a retry measures no θ* figures: the first attempt's stand
            report = report.retry_of(first, attempts)
        report = replace(report, train_sample_cost=cost, retries=float(attempt))
        if first is None:
            first = report
        dist.broadcast_(tuned_params)  # every rank scores at exactly rank 0's θ̃

        val = dist.checkpoint(lambda: validation_gradients(working, blocks, val_data, val_ids, gather, stages,
                                                           progress))
        try:
            figures = full_set_figures(val, dist, exact_gradients)  # θ̃ on the full validation set
            stats = report.as_dict()
            checked = replace(report, final=minimum_check(stats, attempt_cfg, *figures, warn=False)).as_dict()
            if not dist.any(retry_due(config, checked, attempt)):  # all ranks retry, or none
                final = dist.checkpoint(lambda: minimum_check(stats, attempt_cfg, *figures))
                return loss_trained, replace(report, final=final).as_dict(), val
        except BaseException:
            val.store.close()
            raise
        val.store.close()
        with torch.no_grad():
            for p, s0 in zip(tuned_params, start):
                p.copy_(s0)
        attempt_cfg = retry_config(config, checked)
        attempts.append(Attempt(lr=checked["lr"], val_loss_tuned=checked["val_loss_tuned"]))
    raise AssertionError("unreachable: the last attempt returns")


def validation_gradients(working: nn.Module, blocks: list[Block], val_data: Any, val_ids: Tensor,
                         gather: dict[str, Any], stages: StageTimes, progress: Progress) -> Gathered:
    """This rank's validation samples' (``val_ids``) per-sample gradients (stage 3, validation half)."""
    with stages("gradients"), progress.stage("gradients", int(val_ids.numel())) as up:
        return gather_gradients(working, blocks, val_data, progress=up, name="val_data", indices=val_ids, **gather)


def _column_slices(store: GradientStore, keep: Tensor, count: int, budget: int = 8 << 20) -> Iterator[Tensor]:
    """Every block's rows ``keep`` ``(M,)``, flattened to ``(M_kept, numbers)`` and cut into column
    slices of at most ``budget`` bytes once in float64 (``count``: the kept rows over all ranks,
    the same on each, so every rank slices alike and the collectives of the consumer stay matched):
    sums over samples, squares and Gram matrices summed over the slices equal those of the whole
    blocks, without a float64 copy of a whole block (8 MB per sample for a million numbers)."""
    step = max(1, budget // (8 * max(int(count), 1)))
    for name in store.names:
        block = store.block(name)
        flat = block.reshape(block.shape[0], -1)
        for s in range(0, flat.shape[1], step):
            yield flat[:, s:s + step][keep]


@full_precision()
def full_set_figures(val: Gathered, dist: Collectives, exact_gradients: bool) -> Figures:
    """The full validation-set loss, accuracy and mean-gradient norm at θ̃ (eval mode; the norm is
    NaN unless ``exact_gradients``: a projection changes it), summed over ranks from each rank's
    validation shard, and the gradient noise test's ratio and ``z``: the arguments
    :func:`~.checks.minimum_check` takes after ``config``."""
    keep = val.valid
    labelled = keep & (val.labels >= 0)
    sums = torch.stack([val.losses[keep].sum(), keep.sum().double(),
                        (val.predicted[labelled] == val.labels[labelled]).sum().double(), labelled.sum().double()])
    sums = dist.all_reduce_sum(sums.double()).cpu()
    count = float(sums[1])
    nan = float("nan")
    # the mean gradient against its own sampling noise, from every validation sample's gradient (a ratio of
    # norms and inner products, so a random projection, which keeps them, leaves it meaningful)
    slices = _column_slices(val.store, keep, int(count))
    norm, noise_ratio, z = gradient_noise_test(slices, int(count), dist.all_reduce_sum)
    grad = norm if exact_gradients else nan
    return (float(sums[0]) / count if count else nan, float(sums[2] / sums[3]) if float(sums[3]) else nan, grad,
            noise_ratio, z)
