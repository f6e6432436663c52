"""The audit pipeline, in order: copy -> tune -> gradients -> curvature + solve -> score -> metrics.

``audit()`` is the whole thing as one function; ``InfluenceCallback`` is thin glue over it.
"""
from __future__ import annotations

import copy
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .config import METHODS, CurvatureConfig, TuningConfig, as_dict, coerce
from .data import dataset_of, sequential_loader, shuffled_loader_factory
from .gradients import gradient_mode, per_sample_gradients
from .losses import LossFn, default_loss, with_sampled_labels
from .metrics import detection_metrics, score_summary
from .params import Block, ParamsSpec, select_blocks
from .progress import NullProgress, Progress
from .result import AuditResult
from .scoring import fit_solvers, inverse_direction, self_influence, solver_info, cross_influence
from .solvers import check_solver
from .store import GradientStore

NONFINITE = ("exclude", "raise")


class NonFiniteGradientError(FloatingPointError):
    """Some samples have a non-finite loss or gradient and ``nonfinite="raise"``."""


def _parse_dtype(value: Union[None, str, torch.dtype], default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"grad_dtype must be a floating dtype such as 'float32', got {value!r}")
    return dtype


def check_noisy(noisy: Any, n: int, name: str = "noisy") -> Optional[Tensor]:
    """``noisy`` as a bool tensor ``(n,)``; a clear error for a wrong length or dtype."""
    if noisy is None:
        return None
    flags = torch.as_tensor(noisy)
    if flags.dim() != 1 or flags.shape[0] != n:
        raise ValueError(f"{name} must have one flag per training sample ({n}), got shape {tuple(flags.shape)}")
    if flags.dtype != torch.bool:
        if flags.dtype.is_floating_point or flags.dtype.is_complex or not bool(((flags == 0) | (flags == 1)).all()):
            raise ValueError(f"{name} must be booleans (or 0/1 integers), got dtype {flags.dtype}")
        flags = flags.bool()
    return flags


def validate_options(method: str, solver: Any, nonfinite: str = "exclude") -> None:
    """Raise ``ValueError`` for an unknown method, solver or non-finite policy."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    check_solver(solver)
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares (does not copy) an attached Lightning trainer."""
    memo: Dict[int, Any] = {}
    for attr in ("_trainer", "_fabric"):
        owner = getattr(model, attr, None)
        if owner is not None:
            memo[id(owner)] = owner
    return copy.deepcopy(model, memo)


def model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _move(batch: Any, device: torch.device) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


class _Stages:
    """Times the pipeline's stages (synchronising CUDA so the figures are honest)."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: Dict[str, float] = {}
        self.device = device

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def training_losses(model: nn.Module, data: Any, batch_size: int, device: torch.device,
                    loss_fn: Optional[LossFn]) -> Tensor:
    """Each sample's loss ``(n,)`` under ``model`` in eval mode (no gradients)."""
    out: List[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in sequential_loader(data, batch_size, name="train_data"):
                out.append(default_loss(model, _move(batch, device), loss_fn).losses.detach().double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


class _Gathered:
    """What one gradient pass over a dataset produced."""

    def __init__(self, store: GradientStore, losses: Tensor, valid: Tensor,
                 labels: Optional[Tensor], predicted: Optional[Tensor]) -> None:
        self.store, self.losses, self.valid, self.labels, self.predicted = store, losses, valid, labels, predicted


def gather_gradients(model: nn.Module, blocks: List[Block], data: Any, *, batch_size: int,
                     device: torch.device, dtype: torch.dtype, loss_fn: Optional[LossFn],
                     sample_labels: Optional[torch.Generator] = None, max_memory: Optional[int] = None,
                     spill_dir: Optional[str] = None, progress: Optional[Callable[[int], None]] = None,
                     name: str = "data") -> _Gathered:
    """Per-sample gradients of ``blocks`` for every sample of ``data``, in order, into a store
    (``(n, r, d)`` per block), with each sample's loss, a validity flag (finite loss and
    gradient), and the labels and predicted labels for classification.

    With ``sample_labels`` the labels are drawn from the model's predictions (true Fisher)."""
    n = len(dataset_of(data, name))
    store = GradientStore(n, {b.name: b.shape for b in blocks}, dtype, max_memory, spill_dir)
    losses = torch.zeros(n, dtype=torch.float64)
    valid = torch.ones(n, dtype=torch.bool)
    labels: Optional[Tensor] = None
    predicted: Optional[Tensor] = None
    start = 0
    try:
        with gradient_mode(model, blocks):
            for batch in sequential_loader(data, batch_size, name=name):
                batch = _move(batch, device)
                if sample_labels is not None:
                    batch = with_sampled_labels(model, batch, sample_labels, loss_fn)
                grads, out = per_sample_gradients(model, blocks, batch, loss_fn)
                size = out.losses.shape[0]
                ok = torch.isfinite(out.losses)
                for g in grads.values():
                    ok &= torch.isfinite(g).flatten(1).all(1)
                    g.masked_fill_(~ok.view(-1, 1, 1), 0.0)  # excluded samples never reach the solvers
                store.write(start, grads)
                losses[start:start + size] = out.losses.double().cpu()
                valid[start:start + size] = ok.cpu()
                if out.logits is not None and out.labels is not None:
                    if labels is None:
                        labels = torch.full((n,), -1, dtype=torch.long)
                        predicted = torch.full((n,), -1, dtype=torch.long)
                    labels[start:start + size] = out.labels.long().cpu()
                    predicted[start:start + size] = out.logits.argmax(-1).cpu()  # type: ignore[index]
                start += size
                if progress is not None:
                    progress(size)
    except BaseException:
        store.close()
        raise
    return _Gathered(store, losses, valid, labels, predicted)


def _valid_only(gathered: _Gathered) -> GradientStore:
    """The store restricted to valid rows (a compact in-memory copy when some are excluded)."""
    if bool(gathered.valid.all()):
        return gathered.store
    keep = gathered.valid.nonzero().squeeze(1)
    src = gathered.store
    compact = GradientStore(int(keep.numel()), src.shapes, src.dtype)
    compact.blocks = {name: src.block(name)[keep] for name in src.names}
    return compact


def _handle_nonfinite(valid: Tensor, policy: str, what: str) -> List[int]:
    bad = (~valid).nonzero().squeeze(1).tolist()
    if bad:
        message = (f"{len(bad)} {what} sample(s) have a non-finite loss or gradient (ids {bad[:20]}"
                   f"{' ...' if len(bad) > 20 else ''})")
        if policy == "raise":
            raise NonFiniteGradientError(message)
        warnings.warn(message + "; they are excluded from the curvature and score NaN", RuntimeWarning)
    return bad


def audit(
    model: nn.Module,
    train_data: Any,
    val_data: Any,
    *,
    loss_fn: Optional[LossFn] = None,
    method: str = "fvm",
    solver: Any = "hyperinf",
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
) -> AuditResult:
    """Score every training sample's influence; higher = more harmful.

    Args:
        model: any ``nn.Module`` (a LightningModule, a PEFT model...). It is never changed: the
            audit works on a copy, and the original stays bit-identical even if the audit fails.
        train_data, val_data: map-style Datasets or DataLoaders over one; sample id = position.
        loss_fn: ``(model, batch) -> (B,)`` per-sample losses; default: see ``losses.py``.
        method: ``"fvm"`` (SAM-tuned flat validation minimum), ``"vm"`` (SGD-tuned) or
            ``"standard"`` (Koh & Liang at the trained weights).
        solver: ``"hyperinf"``, ``"datainf"``, ``"lissa"``, ``"exact"``, ``"identity"``, or an
            ``InverseSolver`` instance/class.
        params: ``"auto"``, ``"lora"``, ``"trainable"`` or parameter-name glob patterns.
        noisy: optional ``(n,)`` bool ground-truth flags; enables ``result.metrics``.
        top_k: k for precision/recall at k.
        seed: seeds the tuning order and the true-Fisher label draws (the global RNG is untouched).
        tuning: :class:`TuningConfig` (or dict) for ``vm``/``fvm``.
        curvature: :class:`CurvatureConfig` (or dict): damping, damping rule, Fisher type.
        damping: shortcut for ``curvature.damping``.
        batch_size: batch size of the gradient passes.
        grad_dtype: storage dtype of the per-sample gradients (default float32, or float64 for a
            float64 model).
        device: where to compute (default: the model's device).
        clean_labels: optional ``(n,)`` true labels, for the relabel accuracy.
        per_validation: also compute the ``(m, n)`` per-validation-point score matrix.
        nonfinite: ``"exclude"`` samples with non-finite loss/gradient (with a warning), or ``"raise"``.
        max_memory: bytes of per-sample gradients kept in RAM; past it they spill to disk.
        spill_dir: where spilled gradients go (a temporary directory by default).
        progress: a :class:`~lightning_influence.progress.Progress` for per-stage progress bars.
    """
    validate_options(method, solver, nonfinite)
    tuning_cfg = coerce(TuningConfig, tuning)
    curvature_cfg = coerce(CurvatureConfig, curvature)
    if damping is not None:
        curvature_cfg = CurvatureConfig(**{**as_dict(curvature_cfg), "damping": damping})
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset_of(train_data, "train_data"))
    m = len(dataset_of(val_data, "val_data"))
    if n == 0:
        raise ValueError("train_data is empty: there is nothing to audit")
    if m == 0:
        raise ValueError("val_data is empty: influence is measured on validation samples")
    noisy_flags = check_noisy(noisy, n)
    clean = None if clean_labels is None else torch.as_tensor(clean_labels).long()
    if clean is not None and clean.shape != (n,):
        raise ValueError(f"clean_labels must have one label per training sample ({n}), got {tuple(clean.shape)}")
    progress = progress or NullProgress()
    device = torch.device(device) if device is not None else model_device(model)
    param_dtype = next(iter(model.parameters())).dtype if any(True for _ in model.parameters()) else torch.float32
    store_dtype = _parse_dtype(grad_dtype, torch.float64 if param_dtype == torch.float64 else torch.float32)
    compute_dtype = torch.float64 if store_dtype == torch.float64 else torch.float32
    stages = _Stages(device)
    generator = torch.Generator().manual_seed(seed)

    with stages("copy"):
        working = copy_model(model).to(device)
    blocks = select_blocks(working, params)
    chunk = max(1, batch_size * 8)
    gather = dict(batch_size=batch_size, device=device, dtype=store_dtype, loss_fn=loss_fn)
    train = val = curv = None
    try:
        loss_trained = None
        tune_stats: Dict[str, float] = {}
        if method in ("vm", "fvm"):
            with stages("loss_at_trained"):
                loss_trained = training_losses(working, train_data, batch_size, device, loss_fn)
            tuned_params = ([b.param for b in blocks] if tuning_cfg.params == "audited"
                            else [p for p in working.parameters() if p.requires_grad])
            with stages("tuning"), progress.stage("tuning", tuning_cfg.steps) as update:
                factory = shuffled_loader_factory(val_data, tuning_cfg.batch_size, seed, "val_data")
                tune_stats = tune_model(working, tuned_params, factory, tuning_cfg, method == "fvm",
                                        loss_fn, lambda b: _move(b, device), update)

        with stages("gradients"), progress.stage("gradients", n + m) as update:
            train = gather_gradients(working, blocks, train_data, max_memory=max_memory, spill_dir=spill_dir,
                                     progress=update, name="train_data", **gather)
            val = gather_gradients(working, blocks, val_data, progress=update, name="val_data", **gather)
        excluded = _handle_nonfinite(train.valid, nonfinite, "training")
        _handle_nonfinite(val.valid, nonfinite, "validation")
        if not bool(val.valid.any()):
            raise NonFiniteGradientError("every validation sample has a non-finite loss or gradient")
        if loss_trained is None:
            loss_trained = train.losses

        curvature_source = val_data if method in ("vm", "fvm") else train_data
        with stages("curvature"):
            if curvature_cfg.fisher == "true":
                curv = gather_gradients(working, blocks, curvature_source, sample_labels=generator,
                                        max_memory=max_memory, spill_dir=spill_dir, name="curvature", **gather)
            else:
                curv = val if method in ("vm", "fvm") else train
        with stages("solve"), progress.stage("solve", 1) as update:
            solvers = fit_solvers(_valid_only(curv), solver, curvature_cfg, device, compute_dtype)
            update(1)

        with stages("score"), progress.stage("score", n) as update:
            if method in ("vm", "fvm"):
                scores = self_influence(train.store, solvers, chunk, device, compute_dtype)
            else:
                valid_val = val.valid.nonzero().squeeze(1)
                mean_val = {name: val.store.block(name)[valid_val].to(device, compute_dtype).mean(0, keepdim=True)
                            for name in val.store.names}
                scores = cross_influence(train.store, inverse_direction(mean_val, solvers, device, compute_dtype),
                                        chunk, device, compute_dtype)[0]
            update(n)
            matrix = None
            if per_validation:
                rows = []
                for start in range(0, m, chunk):
                    part = {name: val.store.block(name, slice(start, start + chunk)) for name in val.store.names}
                    rows.append(cross_influence(train.store, inverse_direction(part, solvers, device, compute_dtype),
                                               chunk, device, compute_dtype))
                matrix = torch.cat(rows)
        scores[~train.valid] = float("nan")

        with stages("metrics"):
            order = _ranking(scores)
            metrics: Dict[str, float] = score_summary(scores[train.valid])
            if noisy_flags is not None:
                keep = train.valid
                sub_pred = None if train.predicted is None or clean is None else train.predicted[keep]
                metrics.update(detection_metrics(scores[keep], noisy_flags[keep], k=top_k, predicted=sub_pred,
                                                 clean_labels=None if clean is None else clean[keep]))
    finally:
        for gathered in (train, val, curv):
            if gathered is not None:
                gathered.store.close()
        del working

    return AuditResult(
        scores=scores, ranking=order, metrics=metrics, method=method,
        solver=solver if isinstance(solver, str) else type(solver).__name__,
        loss_trained=loss_trained, loss_tuned=train.losses if method in ("vm", "fvm") else None,
        labels=train.labels, predicted=train.predicted, noisy=noisy_flags, per_validation=matrix,
        excluded=excluded, stage_seconds=stages.seconds, solver_info=solver_info(solvers), tuning=tune_stats,
        config={"method": method, "params": params if isinstance(params, str) else list(params), "seed": seed,
                "batch_size": batch_size, "grad_dtype": str(store_dtype), "tuning": as_dict(tuning_cfg),
                "curvature": as_dict(curvature_cfg), "blocks": len(blocks),
                "audited_parameters": sum(b.param.numel() for b in blocks)},
    )


def _ranking(scores: Tensor) -> Tensor:
    """Sample ids, most harmful first; ties by lower id; NaN (excluded) last."""
    key = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    return torch.sort(-key, stable=True).indices


from .tuning import tune as tune_model  # noqa: E402  (kept at the end: the pipeline reads top-down)
