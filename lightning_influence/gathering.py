"""The gradient stage: passes over a dataset that put each sample's loss and per-sample gradients
of the audited blocks into a :class:`~lightning_influence.store.GradientStore`
(:func:`gather_gradients`, :func:`gather_training`), the validity flags every rank agrees on
(:func:`valid_everywhere`), and :class:`Prepared`, what this stage hands to the scoring stage.

Kept apart from :mod:`gradients` (how one batch's per-sample gradients are computed) because
this is the loop around it: batching, the store and its float16 overflow, validity flags."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .data import dataset_of, sequential_loader, to_device
from .distributed import Collectives, unshard
from .exceptions import NonFiniteGradientError
from .gradients import gradient_mode, per_sample_gradients
from .losses import LossFn, default_loss, with_sampled_labels
from .modes import preserved
from .params import Block
from .progress import Progress, StageTimes
from .store import GradientStore

#: what takes a batch's gradients instead of a store: ``sink(start, {block: (B, r, d)})``
Sink = Callable[[int, dict[str, Tensor]], None]


def training_losses(model: nn.Module, data: Any, batch_size: int, device: torch.device,
                    loss_fn: LossFn | None, indices: Tensor | None = None) -> Tensor:
    """Each sample's loss ``(n,)`` (or of the ``indices`` subset) under ``model`` in eval mode."""
    out: list[Tensor] = []
    with preserved(model, params=(), training=False), torch.no_grad():
        for batch in sequential_loader(data, batch_size, ids_list(indices), name="train_data"):
            out.append(default_loss(model, to_device(batch, device), loss_fn).losses.detach().double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class Gathered:
    """What one gradient pass over (this rank's shard of) a dataset produced, per sample: the
    gradients ``store``, the ``losses``, a ``valid`` flag (finite loss and gradient), and the
    ``labels`` and ``predicted`` labels (-1 where the loss has no class labels)."""

    store: GradientStore | None  # None when each batch went to a ``sink`` instead (scored as gathered)
    losses: Tensor
    valid: Tensor
    labels: Tensor
    predicted: Tensor


def gather_gradients(model: nn.Module, blocks: list[Block], data: Any, *, batch_size: int,
                     device: torch.device, dtype: torch.dtype, loss_fn: LossFn | None,
                     sample_labels: torch.Generator | None = None, max_memory: int | None = None,
                     spill_dir: str | None = None, progress: Callable[[int], None] | None = None,
                     name: str = "data", indices: Tensor | None = None, sink: Sink | None = None) -> Gathered:
    """Per-sample gradients of ``blocks`` for every sample of ``data``, in order, into a store
    (``(n, r, d)`` per block), with each sample's loss, a validity flag (finite loss and
    gradient), and the labels and predicted labels for classification.

    With ``sample_labels`` the labels are drawn from the model's predictions (true Fisher).
    With ``sink`` no store is made: each batch's gradients (``(B, r, d)`` per block, as computed:
    float32 or wider, invalid samples zeroed) are handed to ``sink(start, grads)`` instead, then freed."""
    n = len(dataset_of(data, name)) if indices is None else int(indices.numel())
    store = None if sink is not None else GradientStore(n, {b.name: b.shape for b in blocks}, dtype, max_memory,
                                                        spill_dir)
    losses = torch.zeros(n, dtype=torch.float64)
    valid = torch.ones(n, dtype=torch.bool)
    labels = torch.full((n,), -1, dtype=torch.long)  # stays -1 where the loss has no class labels
    predicted = torch.full((n,), -1, dtype=torch.long)
    start = 0
    try:
        with gradient_mode(model, blocks):
            for batch in sequential_loader(data, batch_size, ids_list(indices), name=name):
                batch = to_device(batch, device)
                if sample_labels is not None:
                    batch = with_sampled_labels(model, batch, sample_labels, loss_fn)
                grads, out = per_sample_gradients(model, blocks, batch, loss_fn)
                size = out.losses.shape[0]
                if size != min(batch_size, n - start):
                    raise ValueError(f"{name}: the loss gave {size} value(s) for a batch of "
                                     f"{min(batch_size, n - start)} "
                                     "samples; loss_fn must return one loss per sample, shape (B,), unreduced")
                ok = torch.isfinite(out.losses)
                for g in grads.values():
                    ok &= torch.isfinite(g).flatten(1).all(1)
                for g in grads.values():
                    g.masked_fill_(~ok.view(-1, 1, 1), 0.0)  # excluded samples never reach the solvers
                if store is None:
                    sink(start, grads)
                else:
                    store = _fit_storage(store, grads, start, name, max_memory, spill_dir)
                    store.write(start, grads)
                losses[start:start + size] = out.losses.double().cpu()
                valid[start:start + size] = ok.cpu()
                if out.logits is not None and out.labels is not None:
                    labels[start:start + size] = out.labels.long().cpu()
                    predicted[start:start + size] = out.logits.argmax(-1).cpu()
                start += size
                del grads, out  # one batch's gradients alive at a time, not two (the next replaces them)
                if progress is not None:
                    progress(size)
    except BaseException:
        if store is not None:
            store.close()
        raise
    return Gathered(store, losses, valid, labels, predicted)


def _fit_storage(store: GradientStore, grads: dict[str, Tensor], rows: int, name: str,
                 max_memory: int | None, spill_dir: str | None) -> GradientStore:
    """``store``, or a float32 copy of its first ``rows`` rows (with a warning) when ``grads``
    would overflow its dtype: a float16 store can't hold values above 65504 (they would
    silently become inf). The gradients themselves are computed in at least float32."""
    limit = torch.finfo(store.dtype).max
    for block, g in grads.items():
        if not g.numel() or limit >= torch.finfo(g.dtype).max:
            continue
        peak = float(g.detach().abs().amax())
        lost = _rounding_loss(g.detach(), store.dtype)
        if peak > limit or lost > MAX_STORE_ROUNDING:
            why = (f"reach {peak:.3g}, beyond the range of grad_dtype={store.dtype} (max {limit:.3g})" if peak > limit
                   else f"lose up to {lost:.2g} of their norm in grad_dtype={store.dtype} (values below its normal "
                        f"range, {torch.finfo(store.dtype).tiny:.2g}, round coarsely or to 0)")
            warnings.warn(f"{name}: per-sample gradients of {block} {why}; storing them in float32 instead",
                          RuntimeWarning)
            wide = GradientStore(store.n, store.shapes, torch.float32, max_memory, spill_dir)
            try:
                step = max(1, store.chunk_size(64 << 20))
                for s in range(0, rows, step):
                    part = slice(s, min(s + step, rows))
                    wide.write(s, {b: store.block(b, part) for b in store.names})
            except BaseException:
                wide.close()
                raise
            store.close()
            return wide
    return store


#: the largest relative error of a sample's gradient norm a reduced-range store (float16) may add
MAX_STORE_ROUNDING = 0.01


def _rounding_loss(g: Tensor, dtype: torch.dtype) -> float:
    """The largest relative error ``‖g − round(g)‖ / ‖g‖`` over the samples of a block ``(B, r, d)``
    stored in ``dtype`` (float16's normal range ends at 6.1e-5: the gradients of a well-fit model
    can lie below it). 0 for dtypes with float32's range (bfloat16: a fixed 8-bit rounding)."""
    if torch.finfo(dtype).tiny <= torch.finfo(torch.float32).tiny:
        return 0.0
    flat = g.flatten(1)
    err = (flat - flat.to(dtype).to(flat.dtype)).norm(dim=1)
    norm = flat.norm(dim=1)
    return float((err / norm.clamp_min(torch.finfo(flat.dtype).tiny)).max()) if flat.shape[0] else 0.0


def ids_list(indices: Tensor | None) -> list[int] | None:
    return None if indices is None else indices.tolist()


def handle_nonfinite(valid: Tensor, policy: str, what: str) -> list[int]:
    """Warn about (or raise for) the ids flagged invalid ``(n,)``; returns them."""
    bad = (~valid).nonzero().squeeze(1).tolist()
    if bad:
        message = (f"{len(bad)} {what} sample(s) have a non-finite loss or gradient (ids {bad[:20]}"
                   f"{' ...' if len(bad) > 20 else ''})")
        if policy == "raise":
            raise NonFiniteGradientError(message)
        warnings.warn(message + "; they are excluded from the curvature and score NaN", RuntimeWarning)
    return bad


@dataclass
class Prepared:
    """What the gradient stage hands to the scoring stage (this rank's shard of it).

    ``train``/``val`` hold this rank's per-sample gradients at the scoring weights (θ̃ for
    vm/fvm, θ* for standard); ``curvature`` those the curvature is built from (``val`` or
    ``train``, or true-Fisher gradients). Call :meth:`close` to free the stores."""

    method: str
    n: int
    m: int
    train_ids: Tensor
    val_ids: Tensor
    train: Gathered
    val: Gathered
    curvature: Gathered
    loss_trained: Tensor | None
    tune_stats: dict[str, float]
    stages: StageTimes
    dist: Collectives
    device: torch.device
    compute_dtype: torch.dtype
    chunk: int
    config: dict[str, Any]
    #: attribution: a separate query set's gradients (this rank's shard, ``mq`` in all), and the
    #: query candidates' ``(losses, labels, predicted)`` at θ* when they were not gathered there
    queries: Gathered | None = None
    mq: int = 0
    query_outcomes: tuple[Tensor, Tensor, Tensor] | None = None
    max_memory: int | None = None
    #: vm/fvm: this rank's scores ``(n_r,)`` made as the training gradients were gathered, with
    #: the solvers that made them (:class:`~.scoring.ScoresAsGathered`; ``train.store`` is None)
    streamed: Any = None

    def close(self) -> None:
        kept = (self.train, self.val, self.curvature) + ((self.queries,) if self.queries is not None else ())
        for gathered in {id(g): g for g in kept}.values():
            if gathered.store is not None:
                gathered.store.close()


def gather_training(model: nn.Module, blocks: list[Block], train_data: Any, train_ids: Tensor, val: Gathered,
                    tuned_on: tuple[Any, Tensor] | None, true_fisher: bool, fisher_seed: int,
                    gather: dict[str, Any], max_memory: int | None, spill_dir: str | None,
                    stages: StageTimes, progress: Progress, dist: Collectives,
                    scorer: Callable[[Gathered], Sink] | None = None) -> tuple[Gathered, Gathered]:
    """Stage 3, training half: this rank's training samples ``train_ids`` ``(n_r,)`` into a store
    (spilling past ``max_memory``), and the gradients the curvature is built from: the validation
    gradients ``val`` when tuned on ``tuned_on = (val_data, val_ids)`` (vm/fvm), else the training
    gradients; with ``true_fisher`` those of the same samples at labels drawn from the model's own
    predictions (``fisher_seed``). ``gather``: :func:`gather_gradients`' batch options.

    ``scorer`` (vm/fvm only): called with the curvature gradients before the training pass, it
    returns the sink each training batch goes to instead of a store (the scores made as the
    gradients are gathered: no ``(n, r, d)`` training store at all; ``train.store`` is None).
    Every rank calls it (it may run collectives: the solvers' fit); the passes themselves are
    local, each a :meth:`Collectives.checkpoint` (the ranks agree whether one failed)."""
    def fisher_of(source: Any, ids: Tensor) -> Gathered:
        def local() -> Gathered:
            with stages("true_fisher"):
                return gather_gradients(model, blocks, source, sample_labels=torch.Generator().manual_seed(fisher_seed),
                                        max_memory=max_memory, spill_dir=spill_dir, name="curvature", indices=ids,
                                        **gather)
        return dist.checkpoint(local)

    def training(sink: Sink | None) -> Gathered:
        with stages("gradients"), progress.stage("gradients", int(train_ids.numel())) as up:
            return gather_gradients(model, blocks, train_data, max_memory=max_memory, spill_dir=spill_dir,
                                    progress=up, name="train_data", indices=train_ids, sink=sink, **gather)

    if scorer is not None and tuned_on is None:
        raise ValueError("scores made as the gradients are gathered need the validation curvature (vm/fvm)")
    curv = None
    if tuned_on is not None:  # the curvature comes first: a scorer fits the solvers on it
        curv = fisher_of(*tuned_on) if true_fisher else val
    try:
        sink = scorer(curv) if scorer is not None else None
        train = dist.checkpoint(lambda: training(sink))
    except BaseException:
        if curv is not None and curv is not val:
            curv.store.close()
        raise
    if curv is None:  # standard: the curvature of the training gradients
        try:
            curv = fisher_of(train_data, train_ids) if true_fisher else train
        except BaseException:
            train.store.close()
            raise
    return train, curv


def valid_everywhere(train: Gathered, val: Gathered, n: int, m: int, policy: str,
                     dist: Collectives) -> tuple[Tensor, Tensor, list[int]]:
    """Every rank's validity flags gathered: ``(n,)`` training and ``(m,)`` validation (finite
    loss and gradient), and the excluded training ids, after :func:`handle_nonfinite` warned
    about (or, with ``policy="raise"``, refused) the invalid samples of both. Raises when no
    validation or no training sample is valid."""
    train_valid = unshard(dist.all_gather_cat(train.valid), n, dist.world_size)
    val_valid = unshard(dist.all_gather_cat(val.valid), m, dist.world_size)
    excluded = dist.checkpoint(lambda: (handle_nonfinite(train_valid, policy, "training"),
                                        handle_nonfinite(val_valid, policy, "validation"))[0])
    if not bool(val_valid.any()):
        raise NonFiniteGradientError("every validation sample has a non-finite loss or gradient")
    if not bool(train_valid.any()):
        raise NonFiniteGradientError("every training sample has a non-finite loss or gradient: nothing to score")
    return train_valid, val_valid, excluded
