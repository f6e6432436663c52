"""The audit pipeline, in order: copy -> tune -> gradients -> curvature + solve -> score -> metrics.

``audit()`` is the whole thing as one function; ``InfluenceCallback`` is thin glue over it.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .attribution import explain
from .attribution import query_outcomes as query_outcomes_at
from .config import AuditOptions, CurvatureConfig, TuningConfig, as_dict
from .data import dataset_of, dataset_size, selected_ids, subset_loader
from .distributed import Collectives, default_collectives, shard_ids, unshard
from .gathering import Gathered, Prepared, gather_gradients, gather_training, valid_everywhere
from .losses import LossFn
from .models import copy_model, model_device
from .modes import autograd_allowed
from .params import Block, ParamsSpec, select_blocks
from .precision import full_precision, uncached_autocast
from .preflight import check
from .progress import NullProgress, Progress, StageTimes
from .projection import project_blocks
from .ranking import ranking_metrics, rankings_of
from .result import AuditResult, on_dataset_positions
from .scoring import (
    ScoresAsGathered,
    fit_solvers,
    method_scores,
    per_validation_scores,
    scored_as_gathered,
    solver_info,
)
from .solvers import solver_name
from .solvers.base import SolverSpec
from .store import chunk_bytes
from .tuning import tune_and_check, validation_gradients


@autograd_allowed
@uncached_autocast()  # a user's autocast region computes with the weights the tuning changes
def prepare(model: nn.Module, train_data: Any, val_data: Any, options: AuditOptions, *,
            progress: Progress | None = None, dist: Collectives | None = None,
            loss_at_trained: bool = True, scores_as_gathered: bool = False) -> Prepared:
    """Stages 1-3: copy the model, tune the copy (vm/fvm), gather per-sample gradients, under
    ``options`` (an :class:`AuditOptions`; ``score()`` takes the same one).

    ``loss_at_trained``: for vm/fvm, also each training sample's loss at θ* (a forward pass over
    the training set, about 0.4 of a training epoch, needed only by the ``loss_trained`` ranking
    and its baseline metrics: :func:`audit` asks for it when ``noisy`` or ``rank_by="loss_trained"``
    is given); ``standard`` has it free from its gradient pass.

    With ``options.attribution`` also the query candidates' outcomes at θ* (before tuning) and a
    separate query set's gradients.

    ``scores_as_gathered`` (vm/fvm; :func:`audit` sets it where :func:`~.scoring.scored_as_gathered`):
    score each training batch as it is gathered (:class:`~.scoring.ScoresAsGathered`), no store kept.

    Under several ranks each gathers its own disjoint shard of the training and validation
    samples; tuning runs on every rank with the same seed and rank 0's result is broadcast."""
    o = options
    loss_fn, method, params, seed, batch_size, device = o.loss_fn, o.method, o.params, o.seed, o.batch_size, o.device
    max_memory, spill_dir, projection, fisher, tuning_cfg = o.max_memory, o.spill_dir, o.projection, \
        o.curvature.fisher, o.tuning
    n, m = dataset_size(train_data, "train_data"), dataset_size(val_data, "val_data")
    device = torch.device(device) if device is not None else model_device(model)
    dist = dist or default_collectives(device)
    progress = progress or NullProgress()
    first = next(iter(model.parameters()), None)
    param_dtype = first.dtype if first is not None else torch.float32
    store_dtype = o.grad_dtype_resolved or (torch.float64 if param_dtype == torch.float64 else torch.float32)
    compute_dtype = torch.float64 if store_dtype == torch.float64 else torch.float32
    stages = StageTimes(device)
    train_ids, val_ids = shard_ids(n, dist.rank, dist.world_size), shard_ids(m, dist.rank, dist.world_size)
    gather = dict(batch_size=batch_size, device=device, dtype=store_dtype, loss_fn=loss_fn)
    tuned = method in ("vm", "fvm")
    streamed = ScoresAsGathered(len(train_ids), o, device, compute_dtype, stages, dist) \
        if scores_as_gathered else None  # refuses options it can't serve, before any work

    def copy_and_select() -> tuple[nn.Module, list[Block]]:
        with stages("copy"):
            working = copy_model(model).to(device)
        blocks = select_blocks(working, params)
        return working, (blocks if projection is None else project_blocks(blocks, projection, seed))

    working, blocks = dist.checkpoint(copy_and_select)
    attribution = o.attribution
    query_data = attribution.data if attribution is not None else None
    mq = len(dataset_of(query_data, "attribution.data")) if query_data is not None else 0
    query_ids = shard_ids(mq, dist.rank, dist.world_size) if query_data is not None else val_ids
    query_outcomes = None
    if attribution is not None and (tuned or query_data is not None):  # the trained model's outcomes, at θ*
        query_outcomes = dist.checkpoint(lambda: query_outcomes_at(
            working, query_data if query_data is not None else val_data, batch_size, device, loss_fn, query_ids,
            "attribution.data" if query_data is not None else "val_data"))
    queries: Gathered | None = None
    try:
        loss_trained: Tensor | None = None
        tune_stats: dict[str, float] = {}
        if tuned:  # θ̃, checked on the full validation set from its gradients at θ̃
            loss_trained, tune_stats, val = tune_and_check(
                working, blocks, train_data, val_data, tuning_cfg, method == "fvm", loss_fn, batch_size, device,
                seed, n, m, train_ids, val_ids, gather, stages, progress, dist, exact_gradients=projection is None,
                loss_at_trained=loss_at_trained)
        else:
            val = dist.checkpoint(lambda: validation_gradients(working, blocks, val_data, val_ids, gather, stages,
                                                               progress))
        try:
            train, curv = gather_training(
                working, blocks, train_data, train_ids, val, (val_data, val_ids) if tuned else None, fisher == "true",
                (seed + 7919 * dist.rank) % 2**64, gather, max_memory, spill_dir, stages, progress, dist,
                streamed.fit if streamed is not None else None)
        except BaseException:
            val.store.close()
            raise
        if query_data is not None:  # a separate query set (attribution): its gradients at the scoring weights
            try:
                queries = dist.checkpoint(lambda: gather_gradients(working, blocks, query_data, name="attribution.data",
                                                                   indices=query_ids, **gather))
            except BaseException:
                for gathered in {id(g): g for g in (val, train, curv)}.values():
                    gathered.store.close()
                raise
    finally:
        working = None  # the copy is freed here, even when a stage failed (a traceback keeps this frame)
    return Prepared(method, n, m, train_ids, val_ids, train, val, curv,
                    train.losses if not tuned else loss_trained, tune_stats, stages, dist, device,
                    compute_dtype, (train.store or val.store).chunk_size(chunk_bytes(max_memory)),  # rows at once
                    {"method": method, "params": params if isinstance(params, str) else list(params), "seed": seed,
                     "batch_size": batch_size, "grad_dtype": str(store_dtype), "tuning": as_dict(tuning_cfg),
                     "blocks": len(blocks), "projection": projection, "scored_as_gathered": streamed is not None,
                     "audited_parameters": sum(b.param.numel() for b in blocks)},
                    queries=queries, mq=mq, query_outcomes=query_outcomes, max_memory=max_memory, streamed=streamed)


@autograd_allowed
@full_precision()  # the callback keeps autocast on around the audit for the model: not for the solves
def score(prepared: Prepared, options: AuditOptions, *, progress: Progress | None = None) -> AuditResult:
    """Stages 4-6: curvature + solve, scores, metrics, under ``options`` (its ``method`` must be
    the one ``prepared`` was made with). Can be called several times on one :class:`Prepared`
    (e.g. with ``dataclasses.replace(options, solver=...)`` to compare solvers on the same
    gradients); a separate attribution query set must have been given to :func:`prepare`."""
    p, dist = prepared, prepared.dist
    if options.method != p.method:
        raise ValueError(f"score(): options.method={options.method!r}, but the gradients were prepared for "
                         f"method={p.method!r}")
    options.check_samples(p.n)
    solver, nonfinite, top_k, per_validation = options.solver, options.nonfinite, options.top_k, options.per_validation
    stages = StageTimes(p.device)  # this call's own solve/score/metrics times, after prepare()'s stages
    stages.seconds = dict(p.stages.seconds)
    progress = progress or NullProgress()
    noisy_flags, clean = options.noisy, options.clean_labels
    args = (p.device, p.compute_dtype)

    # every rank learns which samples are invalid before anything depends on it
    train_valid, val_valid, excluded = valid_everywhere(p.train, p.val, p.n, p.m, nonfinite, dist)

    streamed = p.streamed  # scored as the training gradients were gathered: no training store
    if streamed is not None:
        streamed.check(options)
    with stages("solve"), progress.stage("solve", 1) as update:
        solvers = streamed.solvers if streamed is not None else fit_solvers(
            p.curvature.store, p.curvature.valid, solver, options.curvature, *args, p.chunk, dist)
        update(1)

    with stages("score"), progress.stage("score", int(p.train_ids.numel())) as update:
        local = streamed.scores if streamed is not None else method_scores(
            p.method, p.train.store, p.val.store, p.val.valid, float(val_valid.sum()), solvers, p.chunk, *args, dist)
        update(int(p.train_ids.numel()))
        matrix = None
        if per_validation:
            matrix = per_validation_scores(p.train.store, p.val.store, solvers, p.n, p.m, p.chunk, *args, dist,
                                           normalize=options.normalize, train_valid=p.train.valid)
            matrix[:, ~train_valid] = float("nan")
            matrix[~val_valid] = float("nan")
    explained = None
    config_attr = options.attribution
    if config_attr is not None:
        if config_attr.data is not None and p.queries is None:
            raise ValueError("attribution.data: this Prepared has no query gradients; pass attribution= to prepare()")
        with stages("attribution"), progress.stage("attribution", 1) as update:
            source = p.queries if config_attr.data is not None else p.val
            outcomes = p.query_outcomes if p.query_outcomes is not None else (source.losses, source.labels,
                                                                              source.predicted)
            explained = explain(config_attr, p.train.store, p.train_ids, train_valid[p.train_ids], source,
                                p.mq if config_attr.data is not None else p.m, outcomes, solvers, p.chunk, *args, dist,
                                from_queries=config_attr.data is not None, max_memory=p.max_memory,
                                normalize=options.normalize)
            update(1)

    def full(local_values: Tensor, size: int) -> Tensor:
        return unshard(dist.all_gather_cat(local_values), size, dist.world_size)

    scores = full(local, p.n)
    scores[~train_valid] = float("nan")
    if bool((scores[train_valid] == 0).all()):
        warnings.warn("every score is 0: the audited parameters' per-sample gradients all vanish, so the ranking "
                      "carries no information (check params= and the loss)", RuntimeWarning)
    loss_trained = None if p.loss_trained is None else full(p.loss_trained, p.n)
    loss_tuned = full(p.train.losses, p.n)
    labels, predicted = full(p.train.labels, p.n), full(p.train.predicted, p.n)
    if bool((labels < 0).all()):
        labels = predicted = None

    influence = scores
    rankings = rankings_of(influence, loss_trained, loss_tuned if p.method in ("vm", "fvm") else None, train_valid)
    chosen = options.rank_by_resolved
    if chosen not in rankings:
        raise ValueError(f"rank_by={chosen!r}: this Prepared has no loss at θ* (prepare(..., loss_at_trained=True))")
    scores = rankings[chosen]

    def metrics_stage() -> tuple[Tensor, dict[str, float], dict[str, dict[str, float]]]:
        with stages("metrics"):
            return ranking_metrics(rankings, chosen, train_valid, noisy_flags, predicted, clean, top_k)

    order, metrics, metrics_by = dist.checkpoint(metrics_stage)
    return AuditResult(
        scores=scores, ranking=order, metrics=metrics, method=p.method, rank_by=chosen, influence=influence,
        metrics_by=metrics_by,
        solver=solver_name(solver),
        loss_trained=loss_trained, loss_tuned=loss_tuned if p.method in ("vm", "fvm") else None,
        labels=labels, predicted=predicted, noisy=noisy_flags, per_validation=matrix, excluded=excluded,
        attribution=explained,
        stage_seconds=dict(stages.seconds), solver_info=solver_info(solvers), tuning=p.tune_stats,
        config={**p.config, "solver": solver_name(solver),
                "curvature": as_dict(options.curvature), "normalize": options.normalize, "world_size": dist.world_size},
    )


def audit(
    model: nn.Module, train_data: Any, val_data: Any, *, loss_fn: LossFn | None = None,
    method: str | None = None, solver: SolverSpec | None = None, params: ParamsSpec = "auto",
    noisy: Any = None, top_k: int = 50, seed: int = 0, tuning: None | TuningConfig | Mapping[str, Any] = None,
    curvature: None | CurvatureConfig | Mapping[str, Any] = None, damping: float | None = None,
    batch_size: int = 32, grad_dtype: None | str | torch.dtype = None,
    device: None | str | torch.device = None, clean_labels: Any = None, per_validation: bool = False,
    nonfinite: str = "exclude", max_memory: int | None = None, spill_dir: str | None = None,
    progress: Progress | None = None, dist: Collectives | None = None, projection: int | None = None,
    preflight: bool = True, rank_by: str = "auto", attribution: Any = None, normalize: str = "auto",
    options: AuditOptions | None = None,
) -> AuditResult:
    """Score every training sample's influence; higher = more harmful.

    The pipeline: copy the model -> tune the copy on the validation data (vm/fvm) -> per-sample
    gradients -> curvature + inverse solve per block -> scores -> detection metrics. ``model``
    (any ``nn.Module``: a LightningModule, a PEFT model...) is never changed: the audit works on
    a copy, and the original stays bit-identical even if the audit fails. ``train_data`` and
    ``val_data`` are map-style Datasets or DataLoaders over one; sample id = dataset position.

    Every keyword is an option of :class:`~lightning_influence.config.AuditOptions`, documented
    there; ``options=`` gives them as one object (keywords given beside it replace its values).
    All are checked once, before any work. ``progress`` takes a
    :class:`~lightning_influence.progress.Progress` for per-stage progress bars; ``dist`` the
    collectives of a multi-process run (default: ``torch.distributed`` when initialised).

    A DataLoader whose sampler selects a subset (e.g. ``SubsetRandomSampler``) is honoured:
    only the samples it yields are scored, ids stay dataset positions (the others score NaN,
    ``result.audited`` lists the scored ones), and ``noisy``/``clean_labels`` are given per
    dataset position.
    """
    n = dataset_size(train_data, "train_data")
    o = AuditOptions.from_keywords(
        options, n, loss_fn=loss_fn, method=method, solver=solver, params=params, noisy=noisy, top_k=top_k, seed=seed,
        tuning=tuning, curvature=curvature, damping=damping, batch_size=batch_size, grad_dtype=grad_dtype,
        device=device, clean_labels=clean_labels, per_validation=per_validation, nonfinite=nonfinite,
        max_memory=max_memory, spill_dir=spill_dir, projection=projection, preflight=preflight, rank_by=rank_by,
        attribution=attribution, normalize=normalize)
    report = None
    if o.preflight:
        report = (dist or default_collectives(o.device if o.device is not None else model_device(model))
                  ).checkpoint(lambda: autograd_allowed(check)(model, train_data, val_data, o))
    # a sampler that selects a subset is honoured: the pipeline runs on those samples, in order
    train_ids, val_ids = selected_ids(train_data, "train_data"), selected_ids(val_data, "val_data")
    if train_ids is not None:
        train_data = subset_loader(train_data, train_ids)
    if val_ids is not None:
        val_data = subset_loader(val_data, val_ids)
    if (report is not None and o.loss_fn is None) or train_ids is not None:
        # the loss the check confirmed where the default loss takes none on its own (float targets:
        # the MSE), and the flags of the selected subset
        pick = (lambda x: x) if train_ids is None else (lambda x: None if x is None else x[train_ids])
        o = replace(o, loss_fn=o.loss_fn if report is None else o.loss_fn or report.loss_fn, noisy=pick(o.noisy),
                    clean_labels=pick(o.clean_labels))
    # the loss at θ* is a forward pass over the training set: only when a ranking uses it
    prepared = prepare(model, train_data, val_data, o, progress=progress, dist=dist,
                       loss_at_trained=o.noisy is not None or o.rank_by == "loss_trained",
                       scores_as_gathered=scored_as_gathered(o))
    try:
        result = score(prepared, o, progress=progress)
    finally:
        prepared.close()
    result.preflight = report
    if report is not None:
        result.stage_seconds = {"preflight": report.seconds, **result.stage_seconds}
    return result if train_ids is None else on_dataset_positions(result, train_ids, n, val_ids)
