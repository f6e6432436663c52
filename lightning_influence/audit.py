"""The audit pipeline, in order: copy -> tune -> gradients -> curvature + solve -> score -> metrics.

``audit()`` is the whole thing as one function; ``InfluenceCallback`` is thin glue over it.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .config import AuditOptions, CurvatureConfig, TuningConfig, as_dict, parse_grad_dtype
from .data import dataset_of, selected_ids, to_device, sequential_loader, subset_loader
from .losses import LossFn
from .modes import isolated_rng
from .metrics import detection_metrics, nan_last_ranking, score_summary
from .params import Block, ParamsSpec, select_blocks
from .precision import full_precision
from .preflight import PreflightReport, check
from .progress import NullProgress, Progress, StageTimes
from .projection import project_blocks
from .result import AuditResult, on_dataset_positions
from .gathering import Gathered, gather_gradients, handle_nonfinite, training_losses
from .models import copy_model, model_device
from .distributed import Collectives, default_collectives, shard_ids, unshard
from .exceptions import NonFiniteGradientError
from .scoring import fit_solvers, method_scores, per_validation_scores, solver_info
from .attribution import coerce_attribution, explain, query_outcomes as query_outcomes_at
from .solvers import solver_name
from .solvers.base import SolverSpec
from .store import GradientStore, chunk_bytes


def preflight_check(model: nn.Module, train_data: Any, val_data: Any, options: AuditOptions,
                    **extra: Any) -> PreflightReport:
    """:func:`~lightning_influence.preflight.check` under the audit's ``options`` (``extra``: the
    callback's ``reference_loss`` and ``convert``)."""
    o = options
    return check(model, train_data, val_data, loss_fn=o.loss_fn, params=o.params, method=o.method, solver=o.solver,
                 fisher=o.curvature.fisher, grad_dtype=parse_grad_dtype(o.grad_dtype, None), device=o.device,
                 max_memory=o.max_memory, spill_dir=o.spill_dir, projection=o.projection, batch_size=o.batch_size,
                 **extra)


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
    loss_trained: Optional[Tensor]
    tune_stats: Dict[str, float]
    stages: StageTimes
    dist: Collectives
    device: torch.device
    compute_dtype: torch.dtype
    chunk: int
    config: Dict[str, Any]
    #: attribution: a separate query set's gradients (this rank's shard, ``mq`` in all), and the
    #: query candidates' ``(losses, labels, predicted)`` at θ* when they were not gathered there
    queries: Optional[Gathered] = None
    mq: int = 0
    query_outcomes: Optional[Tuple[Tensor, Tensor, Tensor]] = None
    max_memory: Optional[int] = None

    def close(self) -> None:
        kept = (self.train, self.val, self.curvature) + ((self.queries,) if self.queries is not None else ())
        for gathered in {id(g): g for g in kept}.values():
            gathered.store.close()


def _autograd_allowed(fn: Callable) -> Callable:
    """Run ``fn`` with inference mode off: the audit needs autograd even when it is called
    inside ``torch.inference_mode()`` (as Lightning runs its validation and test hooks). The
    global RNGs (Python's, NumPy's, torch's CPU and initialised CUDA ones: :func:`modes.isolated_rng`,
    the callback's rule too) are restored afterwards, so an audit in the middle of training never
    changes what the training draws next."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), isolated_rng():
            return fn(*args, **kwargs)

    return wrapper


@_autograd_allowed
def prepare(model: nn.Module, train_data: Any, val_data: Any, *, loss_fn: Optional[LossFn] = None,
            method: str = "fvm", params: ParamsSpec = "auto", tuning: Union[None, TuningConfig, Mapping] = None,
            fisher: str = "empirical", seed: int = 0, batch_size: int = 32,
            grad_dtype: Union[None, str, torch.dtype] = None, device: Union[None, str, torch.device] = None,
            nonfinite: str = "exclude", max_memory: Optional[int] = None, spill_dir: Optional[str] = None,
            progress: Optional[Progress] = None, dist: Optional[Collectives] = None,
            projection: Optional[int] = None, attribution: Any = None, loss_at_trained: bool = True) -> Prepared:
    """Stages 1-3: copy the model, tune the copy (vm/fvm), gather per-sample gradients.

    ``loss_at_trained``: for vm/fvm, also each training sample's loss at θ* (a forward pass over
    the training set, about 0.4 of a training epoch, needed only by the ``loss_trained`` ranking
    and its baseline metrics: :func:`audit` asks for it when ``noisy`` or ``rank_by="loss_trained"``
    is given); ``standard`` has it free from its gradient pass.

    With ``attribution`` (an :class:`~lightning_influence.attribution.AttributionConfig`) also
    the query candidates' outcomes at θ* (before tuning) and a separate query set's gradients.

    Under several ranks each gathers its own disjoint shard of the training and validation
    samples; tuning runs on every rank with the same seed and rank 0's result is broadcast."""
    tuning_cfg = AuditOptions(loss_fn=loss_fn, method=method, params=params, tuning=tuning, curvature={"fisher": fisher},
                              seed=seed, batch_size=batch_size, grad_dtype=grad_dtype, device=device,
                              nonfinite=nonfinite, max_memory=max_memory, spill_dir=spill_dir,
                              projection=projection).tuning  # the options' one check
    n = len(dataset_of(train_data, "train_data"))
    m = len(dataset_of(val_data, "val_data"))
    if n == 0:
        raise ValueError("train_data is empty: there is nothing to audit")
    if m == 0:
        raise ValueError("val_data is empty: influence is measured on validation samples")
    device = torch.device(device) if device is not None else model_device(model)
    dist = dist or default_collectives(device)
    progress = progress or NullProgress()
    first = next(iter(model.parameters()), None)
    param_dtype = first.dtype if first is not None else torch.float32
    store_dtype = parse_grad_dtype(grad_dtype, torch.float64 if param_dtype == torch.float64 else torch.float32)
    compute_dtype = torch.float64 if store_dtype == torch.float64 else torch.float32
    stages = StageTimes(device)
    train_ids, val_ids = shard_ids(n, dist.rank, dist.world_size), shard_ids(m, dist.rank, dist.world_size)
    gather = dict(batch_size=batch_size, device=device, dtype=store_dtype, loss_fn=loss_fn)
    tuned = method in ("vm", "fvm")

    def copy_and_select() -> Tuple[nn.Module, List[Block]]:
        with stages("copy"):
            working = copy_model(model).to(device)
        blocks = select_blocks(working, params)
        return working, (blocks if projection is None else project_blocks(blocks, projection, seed))

    working, blocks = dist.checkpoint(copy_and_select)
    attribution = coerce_attribution(attribution)
    query_data = attribution.data if attribution is not None else None
    mq = len(dataset_of(query_data, "attribution.data")) if query_data is not None else 0
    query_ids = shard_ids(mq, dist.rank, dist.world_size) if query_data is not None else val_ids
    query_outcomes = None
    if attribution is not None and (tuned or query_data is not None):  # the trained model's outcomes, at θ*
        query_outcomes = dist.checkpoint(lambda: query_outcomes_at(
            working, query_data if query_data is not None else val_data, batch_size, device, loss_fn, query_ids,
            "attribution.data" if query_data is not None else "val_data"))
    queries: Optional[Gathered] = None
    try:
        loss_trained: Optional[Tensor] = None
        tune_stats: Dict[str, float] = {}
        if tuned:  # θ̃, checked on the full validation set from its gradients at θ̃
            loss_trained, tune_stats, val = _tune_and_check(
                working, blocks, train_data, val_data, tuning_cfg, method == "fvm", loss_fn, batch_size, device,
                seed, n, m, train_ids, val_ids, gather, stages, progress, dist, exact_gradients=projection is None,
                loss_at_trained=loss_at_trained)
        else:
            val = dist.checkpoint(lambda: _validation_gradients(working, blocks, val_data, val_ids, gather, stages,
                                                                progress))

        def gradient_stage() -> Tuple[Gathered, Gathered]:
            with stages("gradients"), progress.stage("gradients", int(train_ids.numel())) as up:
                train = gather_gradients(working, blocks, train_data, max_memory=max_memory, spill_dir=spill_dir,
                                         progress=up, name="train_data", indices=train_ids, **gather)
                try:
                    curv = val if tuned else train
                    if fisher == "true":
                        with stages("true_fisher"):
                            source, ids = (val_data, val_ids) if tuned else (train_data, train_ids)
                            generator = torch.Generator().manual_seed((seed + 7919 * dist.rank) % 2**64)
                            curv = gather_gradients(working, blocks, source, sample_labels=generator,
                                                    max_memory=max_memory, spill_dir=spill_dir, name="curvature",
                                                    indices=ids, **gather)
                except BaseException:
                    train.store.close()
                    raise
            return train, curv

        try:
            train, curv = dist.checkpoint(gradient_stage)
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
        del working
    return Prepared(method, n, m, train_ids, val_ids, train, val, curv,
                    train.losses if not tuned else loss_trained, tune_stats, stages, dist, device,
                    compute_dtype, train.store.chunk_size(chunk_bytes(max_memory)),  # rows read at once
                    {"method": method, "params": params if isinstance(params, str) else list(params), "seed": seed,
                     "batch_size": batch_size, "grad_dtype": str(store_dtype), "tuning": as_dict(tuning_cfg),
                     "blocks": len(blocks), "projection": projection, "audited_parameters": sum(b.param.numel() for b in blocks)},
                    queries=queries, mq=mq, query_outcomes=query_outcomes, max_memory=max_memory)


@_autograd_allowed
@full_precision()  # the callback keeps autocast on around the audit for the model: not for the solves
def score(prepared: Prepared, solver: SolverSpec = "hyperinf", curvature: Union[None, CurvatureConfig, Mapping] = None, *,
          noisy: Any = None, clean_labels: Any = None, top_k: int = 50, per_validation: bool = False,
          nonfinite: str = "exclude", progress: Optional[Progress] = None, rank_by: str = "auto",
          attribution: Any = None, normalize: str = "none") -> AuditResult:
    """Stages 4-6: curvature + solve, scores, metrics. Can be called several times on one
    :class:`Prepared` (e.g. to compare solvers on the same gradients). ``rank_by``,
    ``attribution``, ``normalize``: see :func:`audit` (a separate query set must have been given to
    :func:`prepare`)."""
    p, dist = prepared, prepared.dist
    options = AuditOptions(method=p.method, solver=solver, curvature=curvature, noisy=noisy, clean_labels=clean_labels,
                           top_k=top_k, per_validation=per_validation, nonfinite=nonfinite, rank_by=rank_by,
                           normalize=normalize, n=p.n)  # the options' one check
    stages = StageTimes(p.device)  # this call's own solve/score/metrics times, after prepare()'s stages
    stages.seconds = dict(p.stages.seconds)
    curvature_cfg = options.curvature
    progress = progress or NullProgress()
    noisy_flags, clean = options.noisy, options.clean_labels
    args = (p.device, p.compute_dtype)

    # every rank learns which samples are invalid before anything depends on it
    train_valid = unshard(dist.all_gather_cat(p.train.valid), p.n, dist.world_size)
    val_valid = unshard(dist.all_gather_cat(p.val.valid), p.m, dist.world_size)
    excluded = dist.checkpoint(lambda: (handle_nonfinite(train_valid, nonfinite, "training"),
                                        handle_nonfinite(val_valid, nonfinite, "validation"))[0])
    if not bool(val_valid.any()):
        raise NonFiniteGradientError("every validation sample has a non-finite loss or gradient")
    if not bool(train_valid.any()):
        raise NonFiniteGradientError("every training sample has a non-finite loss or gradient: nothing to score")

    with stages("solve"), progress.stage("solve", 1) as update:
        solvers = fit_solvers(p.curvature.store, p.curvature.valid, solver, curvature_cfg, *args, p.chunk, dist)
        update(1)

    with stages("score"), progress.stage("score", int(p.train_ids.numel())) as update:
        local = method_scores(p.method, p.train.store, p.val.store, p.val.valid, float(val_valid.sum()), solvers,
                              p.chunk, *args, dist)
        update(int(p.train_ids.numel()))
        matrix = None
        if per_validation:
            matrix = per_validation_scores(p.train.store, p.val.store, solvers, p.n, p.m, p.chunk, *args, dist,
                                           normalize=options.normalize, train_valid=p.train.valid)
            matrix[:, ~train_valid] = float("nan")
            matrix[~val_valid] = float("nan")
    explained = None
    config_attr = coerce_attribution(attribution)
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
    rankings = {"influence": influence}
    if loss_trained is not None:
        rankings["loss_trained"] = loss_trained.clone()
    if p.method in ("vm", "fvm"):
        rankings["loss_tuned"] = loss_tuned.clone()
    for values in rankings.values():
        values[~train_valid] = float("nan")  # excluded samples rank last whatever the ranking
    chosen = options.rank_by_resolved
    if chosen not in rankings:
        raise ValueError(f"rank_by={chosen!r}: this Prepared has no loss at θ* (prepare(..., loss_at_trained=True))")
    scores = rankings[chosen]

    def metrics_stage() -> Tuple[Tensor, Dict[str, float], Dict[str, Dict[str, float]]]:
        with stages("metrics"):
            order = nan_last_ranking(scores)
            metrics: Dict[str, float] = score_summary(scores[train_valid])
            by: Dict[str, Dict[str, float]] = {}
            if noisy_flags is not None:
                keep = train_valid
                sub_pred = None if predicted is None or clean is None else predicted[keep]
                for name, values in rankings.items():
                    by[name] = detection_metrics(values[keep], noisy_flags[keep], k=top_k, predicted=sub_pred,
                                                 clean_labels=None if clean is None or sub_pred is None else clean[keep])
                metrics.update(by[chosen])
        return order, metrics, by

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
                "curvature": as_dict(curvature_cfg), "normalize": options.normalize, "world_size": dist.world_size},
    )


def audit(
    model: nn.Module,
    train_data: Any,
    val_data: Any,
    *,
    loss_fn: Optional[LossFn] = None,
    method: Optional[str] = None,
    solver: Optional[SolverSpec] = None,
    params: ParamsSpec = "auto",
    noisy: Any = None,
    top_k: int = 50,
    seed: int = 0,
    tuning: Union[None, TuningConfig, Mapping[str, Any]] = None,
    curvature: Union[None, CurvatureConfig, Mapping[str, Any]] = None,
    damping: Optional[float] = None,
    batch_size: int = 32,
    grad_dtype: Union[None, str, torch.dtype] = None,
    device: Union[None, str, torch.device] = None,
    clean_labels: Any = None,
    per_validation: bool = False,
    nonfinite: str = "exclude",
    max_memory: Optional[int] = None,
    spill_dir: Optional[str] = None,
    progress: Optional[Progress] = None,
    dist: Optional[Collectives] = None,
    projection: Optional[int] = None,
    preflight: bool = True,
    rank_by: str = "auto",
    attribution: Any = None,
    normalize: str = "auto",
    options: Optional[AuditOptions] = None,
) -> AuditResult:
    """Score every training sample's influence; higher = more harmful.

    The pipeline: copy the model -> tune the copy on the validation data (vm/fvm) -> per-sample
    gradients -> curvature + inverse solve per block -> scores -> detection metrics.

    Args:
        model: any ``nn.Module`` (a LightningModule, a PEFT model...). It is never changed: the
            audit works on a copy, and the original stays bit-identical even if the audit fails.
        train_data, val_data: map-style Datasets or DataLoaders over one; sample id = position.
        loss_fn: ``(model, batch) -> (B,)`` per-sample losses; default: see ``losses.py``.
        method: ``"fvm"`` (SAM-tuned flat validation minimum), ``"vm"`` (SGD-tuned) or
            ``"standard"`` (Koh & Liang at the trained weights). ``None`` (default): ``"fvm"``, or
            with ``per_validation=True`` and no ``solver`` either, the attribution defaults
            (:data:`~lightning_influence.config.ATTRIBUTION_DEFAULTS`: standard, kronecker,
            damping 1e-4 unless ``curvature``/``damping`` is given, ``normalize="centered"``).
        solver: ``"hyperinf"``, ``"datainf"``, ``"lissa"``, ``"exact"``, ``"identity"``,
            ``"kronecker"``, or an ``InverseSolver`` instance/class. ``None`` (default):
            ``"hyperinf"``, or the attribution defaults (see ``method``).
        params: ``"auto"``, ``"lora"``, ``"trainable"`` or parameter-name glob patterns.
        noisy: optional ``(n,)`` bool ground-truth flags; enables ``result.metrics``.
        top_k: k for precision/recall at k.
        seed: seeds the tuning order and the true-Fisher label draws (the global RNG is untouched).
        tuning: :class:`TuningConfig` (or dict) for ``vm``/``fvm``.
        curvature: :class:`CurvatureConfig` (or dict): damping, damping rule, Fisher type, solver options.
        damping: shortcut for ``curvature.damping``.
        batch_size: batch size of the gradient passes.
        grad_dtype: storage dtype of the per-sample gradients (default float32, or float64 for a
            float64 model).
        device: where to compute (default: the model's device).
        clean_labels: optional ``(n,)`` true labels, for the relabel accuracy.
        per_validation: also compute the ``(m, n)`` per-validation-point score matrix.
        normalize: gradient normalisation of the per-validation scores: ``"unit"`` (unit-norm
            gradients), ``"centered"`` (queries centred on the mean training gradient, then unit
            norms; :mod:`~lightning_influence.normalize`), ``"none"``, or ``"auto"`` (default):
            ``"centered"`` under the attribution defaults, else ``"none"``.
        nonfinite: ``"exclude"`` samples with non-finite loss/gradient (with a warning), or ``"raise"``.
        max_memory: bytes of training gradients kept in RAM; past it they spill to disk.
        spill_dir: where spilled gradients go (a temporary directory by default).
        progress: a :class:`~lightning_influence.progress.Progress` for per-stage progress bars.
        dist: collectives for multi-process runs (default: ``torch.distributed`` when initialised).
        projection: project each side of big Linear blocks to this many dimensions with a
            Gaussian sketch (LoGra-style; the full per-sample gradient is never formed).
        rank_by: what ``result.scores`` and ``result.ranking`` rank by (most harmful first):
            ``"auto"`` (default: ``"loss_tuned"`` for vm/fvm, ``"influence"`` for standard),
            ``"influence"`` (the method's influence score), ``"loss_tuned"`` (each sample's
            loss at θ̃) or ``"loss_trained"`` (at θ*). The influence score is always in
            ``result.influence``, and with ``noisy`` the detection metrics of every ranking
            are in ``result.metrics_by``. Why the loss at θ̃ is the default: README,
            *Which ranking*.
        attribution: explain predictions: ``True``, a dict or an
            :class:`~lightning_influence.AttributionConfig` (which queries: by default the
            validation samples the trained model gets wrong; ``k`` per side). For each query,
            the ``k`` most helpful and most harmful training samples, computed streaming (no
            ``(m, n)`` matrix): ``result.attribution``, written beside the scores file by ``save()``.
        preflight: first run :func:`~lightning_influence.preflight.check` on a few training
            samples (the loss matches the model's own, the gradients match autograd, the store
            fits in memory); ``result.preflight`` holds its report.
        options: all of the options above as one :class:`~lightning_influence.config.AuditOptions`
            (then leave their keywords at their defaults). Either way every option is checked
            once, before any work, by ``AuditOptions``.

    A DataLoader whose sampler selects a subset (e.g. ``SubsetRandomSampler``) is honoured:
    only the samples it yields are scored, ids stay dataset positions (the others score NaN,
    ``result.audited`` lists the scored ones), and ``noisy``/``clean_labels`` are given per
    dataset position.
    """
    n = len(dataset_of(train_data, "train_data"))
    # every option checked, once, before any work (the pre-flight check's loss calls included)
    o = AuditOptions.from_keywords(
        options, n, loss_fn=loss_fn, method=method, solver=solver, params=params, noisy=noisy, top_k=top_k, seed=seed,
        tuning=tuning, curvature=curvature, damping=damping, batch_size=batch_size, grad_dtype=grad_dtype,
        device=device, clean_labels=clean_labels, per_validation=per_validation, nonfinite=nonfinite,
        max_memory=max_memory, spill_dir=spill_dir, projection=projection, preflight=preflight, rank_by=rank_by,
        attribution=attribution, normalize=normalize)
    noisy, clean_labels = o.noisy, o.clean_labels
    report = None
    if o.preflight:
        report = (dist or default_collectives(o.device if o.device is not None else model_device(model))
                  ).checkpoint(lambda: _autograd_allowed(preflight_check)(model, train_data, val_data, o))
    # the loss the check confirmed where the default loss takes none on its own (float targets: the MSE)
    confirmed_loss = o.loss_fn if o.loss_fn is not None or report is None else report.loss_fn
    # a sampler that selects a subset is honoured: the pipeline runs on those samples, in order
    train_ids, val_ids = selected_ids(train_data, "train_data"), selected_ids(val_data, "val_data")
    if train_ids is not None:
        train_data = subset_loader(train_data, train_ids)
        noisy = None if noisy is None else noisy[train_ids]
        clean_labels = None if clean_labels is None else clean_labels[train_ids]
    if val_ids is not None:
        val_data = subset_loader(val_data, val_ids)
    prepared = prepare(model, train_data, val_data, loss_fn=confirmed_loss, method=o.method, params=o.params,
                       tuning=o.tuning, fisher=o.curvature.fisher, seed=o.seed, batch_size=o.batch_size,
                       grad_dtype=o.grad_dtype, device=o.device, nonfinite=o.nonfinite, max_memory=o.max_memory,
                       spill_dir=o.spill_dir, progress=progress, dist=dist, projection=o.projection,
                       attribution=o.attribution,
                       # the loss at θ* is a forward pass over the training set: only when a ranking uses it
                       loss_at_trained=noisy is not None or o.rank_by == "loss_trained")
    try:
        result = score(prepared, o.solver, o.curvature, noisy=noisy, clean_labels=clean_labels, top_k=o.top_k,
                       per_validation=o.per_validation, nonfinite=o.nonfinite, progress=progress, rank_by=o.rank_by,
                       attribution=o.attribution, normalize=o.normalize)
    finally:
        prepared.close()
    result.preflight = report
    if report is not None:
        result.stage_seconds = {"preflight": report.seconds, **result.stage_seconds}
    return result if train_ids is None else on_dataset_positions(result, train_ids, n, val_ids)


#: the first tuning attempt's figures at θ* (and their cost), which a retry keeps
_THETA_STAR_FIGURES = ("val_loss_trained", "val_acc_trained", "grad_norm_start", "grad_check_samples", "probe_loss@",
                       "probe_s", "check_")


def _tune_and_check(working: nn.Module, blocks: List[Block], train_data: Any, val_data: Any, config: TuningConfig,
                    sharpness_aware: bool, loss_fn: Optional[LossFn], batch_size: int, device: torch.device, seed: int,
                    n: int, m: int, train_ids: Tensor, val_ids: Tensor, gather: Dict[str, Any], stages: StageTimes,
                    progress: Progress, dist: Collectives, exact_gradients: bool, loss_at_trained: bool = True,
                    ) -> Tuple[Optional[Tensor], Dict[str, float], Gathered]:
    """Stage 2 (vm/fvm): tune ``working`` in place to θ̃ and check it on the full validation set.

    Returns the training losses at θ* ``(n_r,)`` (this rank's shard; ``None`` unless
    ``loss_at_trained``), the tuning statistics
    (:func:`tuning.tune`, checked by :func:`tuning.verify`) and the validation gradients at θ̃,
    which the check needs and the scores reuse. When the full-set loss rose with a probed
    learning rate, tuning restarts from θ* at a smaller one (:func:`tuning.retry_config`,
    ``config.retries`` times at most); every rank takes the same decision (all-reduced figures)."""
    tuned_params = ([b.param for b in blocks] if config.params == "audited"
                    else [p for p in working.parameters() if p.requires_grad])

    def losses_stage() -> Tensor:
        with stages("loss_at_trained"):
            return training_losses(working, train_data, batch_size, device, loss_fn, train_ids)

    loss_trained = dist.checkpoint(losses_stage) if loss_at_trained else None
    factory = bucketed_loader_factory(val_data, config.batch_size, seed, "val_data", pool=50 if config.bucket else 0)
    cost = relative_sample_cost(train_data, val_data, seed) if config.epochs == "auto" else 1.0
    check_ids = grad_check_ids(m, seed)  # the samples of the gradient yardstick at θ* and the lr probe
    # at least four batches: the yardstick pairs samples from different batches
    check_batch = min(config.batch_size, max(1, -(-len(check_ids) // 4)))
    # θ* kept (on the CPU) for a retry
    start = [p.detach().to("cpu", copy=True) for p in tuned_params] if config.lr == "auto" and config.retries else []
    attempt_cfg, first = config, None
    for attempt in range(config.retries + 1):
        total = planned_steps(attempt_cfg, len(factory(0)), budget_epochs(attempt_cfg, n * cost, m, sharpness_aware))

        def tune_stage() -> Dict[str, float]:
            checks = first is None  # the θ* figures and the probe: the first attempt only
            with stages("tuning"), progress.stage("tuning", total) as update:
                return tune_model(working, tuned_params, factory, attempt_cfg, sharpness_aware, loss_fn,
                                  lambda b: to_device(b, device), update,
                                  eval_loader=sequential_loader(val_data, batch_size, name="val_data") if checks else None,
                                  reference=[b.param for b in blocks], train_size=n * cost,
                                  check_loader=sequential_loader(val_data, check_batch, check_ids, "val_data")
                                  if checks else None)

        # a retry's own θ* figures are absent (or 0, e.g. check_epochs): the first attempt's stand
        stats = {**dist.checkpoint(tune_stage), **(first or {}), "train_sample_cost": cost, "retries": float(attempt)}
        if first is None:
            first = {k: v for k, v in stats.items() if k.startswith(_THETA_STAR_FIGURES)}
        dist.broadcast_(tuned_params)  # every rank scores at exactly rank 0's θ̃

        val = dist.checkpoint(lambda: _validation_gradients(working, blocks, val_data, val_ids, gather, stages,
                                                            progress))
        try:
            figures = _tuning_figures(val, dist, exact_gradients)  # θ̃ on the full validation set
            checked = verify_tuning(stats, attempt_cfg, *figures, warn=False)
            if not dist.any(retry_due(config, checked, attempt)):  # all ranks retry, or none
                return loss_trained, dist.checkpoint(lambda: verify_tuning(stats, attempt_cfg, *figures)), val
        except BaseException:
            val.store.close()
            raise
        val.store.close()
        with torch.no_grad():
            for p, s0 in zip(tuned_params, start):
                p.copy_(s0)
        attempt_cfg = retry_config(config, checked)
        first["lr_attempt_" + str(attempt)] = checked["lr"]
        first["val_loss_tuned_attempt_" + str(attempt)] = checked["val_loss_tuned"]
    raise AssertionError("unreachable: the last attempt returns")


def _validation_gradients(working: nn.Module, blocks: List[Block], val_data: Any, val_ids: Tensor,
                          gather: Dict[str, Any], stages: StageTimes, progress: Progress) -> Gathered:
    """This rank's validation samples' per-sample gradients (stage 3, validation half)."""
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
def _tuning_figures(val: Gathered, dist: Collectives, exact_gradients: bool) -> Tuple[float, float, float, float, float]:
    """The full validation-set loss, accuracy and mean-gradient norm at θ̃ (eval mode), summed
    over ranks from each rank's validation shard, and the gradient noise test's ratio and
    ``z``: the arguments :func:`tuning.verify` takes after ``config``."""
    keep = val.valid
    labelled = keep & (val.labels >= 0)
    sums = torch.stack([val.losses[keep].sum(), keep.sum().double(),
                        (val.predicted[labelled] == val.labels[labelled]).sum().double(), labelled.sum().double()])
    sums = dist.all_reduce_sum(sums.double()).cpu()
    count = float(sums[1])
    nan = float("nan")
    # the mean gradient against its own sampling noise, from every validation sample's gradient (a ratio of
    # norms and inner products, so a random projection, which keeps them, leaves it meaningful)
    norm, noise_ratio, z = gradient_noise_test(_column_slices(val.store, keep, int(count)), int(count), dist.all_reduce_sum)
    grad = norm if exact_gradients else nan
    return (float(sums[0]) / count if count else nan, float(sums[2] / sums[3]) if float(sums[3]) else nan, grad,
            noise_ratio, z)


from .tuning import budget_epochs, bucketed_loader_factory, grad_check_ids, gradient_noise_test, planned_steps, relative_sample_cost, retry_config, retry_due, tune as tune_model, verify as verify_tuning  # noqa: E402  (kept at the end: the pipeline reads top-down)
