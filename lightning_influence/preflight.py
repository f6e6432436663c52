"""The pre-flight check: before any expensive stage (and, in the callback, before the first
training step), prove on a few of the user's own samples that the audit will be right and fit.

On the first ``samples`` training samples (collated by the user's own ``collate_fn``):

1. the per-sample loss runs on the batch as it is (a batch-format error surfaces here, naming
   the format, the offending key and ``loss_fn``);
2. where the model reports a loss of its own (a Hugging Face output's ``.loss``, or the
   LightningModule's ``training_step`` via ``reference_loss``), each sample's loss equals it for
   that sample alone; a mismatch is a :class:`PreflightError` that says what to pass;
3. every audited block's per-sample gradients equal autograd of each sample's loss (a
   gradient check, cheap at this size);
4. the gradient store (numbers per sample × samples × bytes) and the solve's peak memory fit
   the available RAM and ``max_memory`` (:mod:`~lightning_influence.memory`); past it, an error
   that names ``max_memory=``, ``projection=``, ``params=`` and ``grad_dtype=`` with the figure
   each would give.

The original model is used in eval mode without gradients on its own ``.grad``; its modes,
flags and weights are restored, as in the audit itself.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .config import AuditOptions
from .data import dataset_size, selected_ids, sequential_loader, to_device
from .exceptions import PreflightError
from .gradients import gradient_mode, per_sample_gradients
from .losses import (
    DEFAULT_LOSS,
    LossFn,
    default_loss,
    float_targets,
    float_targets_message,
    hf_model_of,
    mean_squared_error,
)
from .memory import MemoryPlan, check_memory, format_bytes
from .models import copy_model
from .modes import preserved
from .params import Block, select_blocks
from .precision import _autocast_dtype, compute_tolerance
from .scoring import scored_as_gathered
from .trainer_data import training_step_loss

#: a block's gradient below this share of the whole audited gradient's norm is judged against that
#: share (its own norm may be rounding noise around an exact 0, e.g. an attention key's bias)
NEGLIGIBLE = 1e-2


@dataclass
class PreflightReport(MemoryPlan):
    """What the pre-flight check measured: the memory plan's figures
    (:class:`~lightning_influence.memory.MemoryPlan`, filled in by the check) and the following.

    Attributes:
        seconds: the check's wall time.
        samples: training samples it ran on.
        loss_reference: what the per-sample losses were compared with (``"the model's own
            loss"``, ``"training_step"``), or ``None`` when nothing reports a loss.
        loss_error: the largest relative difference from that reference.
        gradient_error: the largest relative gradient error per audited block.
        numbers_per_sample: audited gradient numbers per sample (after projection).
        train_samples, val_samples: how many samples the audit will score / tune on.
        store_bytes: the training-gradient store; ``val_bytes`` the validation one.
        solve_bytes: the solver's estimated peak memory.
        peak_bytes: the audit's estimated peak memory growth, the largest of its stages (a bound
            on the measured peak RSS growth of ``audit()``; what the RAM check compares):
            ``val + store in RAM + max(model copy + tuning state + one batch's gradients,
            chunk buffers + solve)``, their sum without the store when ``streamed`` (vm/fvm scored
            as the gradients are gathered); ``peak_parts`` holds each term in bytes.
        available_bytes: RAM available when the check ran (``None`` if unknown).
        notes: anything the user should know (e.g. a sampler that selects a subset).
        loss_fn: the per-sample loss the check confirmed for a batch the default loss does not
            take on its own (float targets: :func:`~lightning_influence.losses.mean_squared_error`),
            which the audit then uses; ``None`` otherwise.
    """

    seconds: float = 0.0
    samples: int = 0
    loss_reference: str | None = None
    loss_error: float = 0.0
    gradient_error: dict[str, float] = field(default_factory=dict)
    train_samples: int = 0
    val_samples: int = 0
    notes: list[str] = field(default_factory=list)
    loss_fn: LossFn | None = None

    def summary(self) -> str:
        """One line for the log."""
        worst = max(self.gradient_error.values(), default=0.0)
        ref = f"loss = {self.loss_reference} (rel. err {self.loss_error:.1e})" if self.loss_reference else \
            "no reference loss to compare"
        return (f"pre-flight check passed in {self.seconds:.2f} s on {self.samples} samples: {ref}; gradients of "
                f"{len(self.gradient_error)} blocks = autograd (max rel. err {worst:.1e}); "
                + ("no gradient store (scored as gathered): " if self.streamed else
                   f"gradient store {format_bytes(self.store_bytes)} for ")
                + f"{self.train_samples} samples × {self.numbers_per_sample:,} numbers"
                + "".join(f"; {note}" for note in self.notes))


def check(model: nn.Module, train_data: Any, val_data: Any, options: AuditOptions, *,
          reference_loss: Callable[[Any], Tensor | None] | None = None, samples: int = 3,
          convert: Callable[[Any], Any] | None = None) -> PreflightReport:
    """Run the pre-flight check (see the module docstring) of an audit of ``model`` under
    ``options`` (an :class:`~lightning_influence.AuditOptions`); raise on the first problem.

    Args:
        reference_loss: ``batch -> scalar loss`` that the module itself computes (the
            callback passes the LightningModule's ``training_step``); compared sample by sample.
        samples: how many training samples to check (2-3 keep it cheap).
        convert: applied to each batch after collation (the precision plugin's input conversion).
    Returns:
        A :class:`PreflightReport`.
    """
    start = time.perf_counter()
    report = PreflightReport()
    loss_fn, device = options.loss_fn, options.device
    n_all, m_all = dataset_size(train_data, "train_data"), dataset_size(val_data, "val_data")
    train_ids, val_ids = selected_ids(train_data, "train_data"), selected_ids(val_data, "val_data")
    report.train_samples = n_all if train_ids is None else int(train_ids.numel())
    report.val_samples = m_all if val_ids is None else int(val_ids.numel())
    if train_ids is not None:
        report.notes.append(f"the training loader's sampler selects {report.train_samples} of {n_all} samples: "
                            "only those are scored (ids stay dataset positions)")
    first = next((p for p in model.parameters()), None)
    device = torch.device(device) if device is not None else (first.device if first is not None
                                                              else torch.device("cpu"))
    store_dtype = options.grad_dtype_resolved or (torch.float64 if first is not None and first.dtype == torch.float64
                                                  else torch.float32)
    if any(p.is_inference() for p in model.parameters()):  # made under inference_mode: no autograd on them
        model = copy_model(model)
    blocks = select_blocks(model, options.params)
    check_memory(report.train_samples, report.val_samples, blocks, store_dtype, options.method, options.solver,
                 options.curvature.fisher, options.max_memory, options.spill_dir, options.projection, model=model,
                 batch_size=options.batch_size, solver_options=options.curvature.solver_options, plan=report,
                 streamed=scored_as_gathered(options), per_validation=options.per_validation)

    ids = (torch.arange(n_all) if train_ids is None else train_ids)[:max(1, samples)]
    to_device = _to_device(device, convert)
    batch = to_device(next(iter(sequential_loader(train_data, len(ids), ids.tolist(), name="train_data"))))
    singles = [to_device(b) for b in sequential_loader(train_data, 1, ids.tolist(), name="train_data")]
    report.samples = len(ids)
    targets: Tensor | None = None
    if loss_fn is None and float_targets(model, batch):  # regression: the MSE, if training_step confirms it
        loss_fn, targets, reference_loss = _float_targets_loss(report, model, batch, reference_loss)
    with preserved(model, params=(), training=False):
        with torch.no_grad():
            losses = default_loss(model, batch, loss_fn).losses.detach()
        finite = torch.isfinite(losses).cpu()
        if not bool(finite.any()):
            report.loss_fn = None  # nothing confirmed it (float targets are then refused by the default loss)
            report.notes.append("the first training samples have a non-finite loss: the loss and gradient checks "
                                "were skipped (the audit excludes such samples)")
        else:
            _check_loss(report, model, batch, singles, losses, loss_fn, reference_loss, finite, targets)
            _check_gradients(report, model, blocks, batch, loss_fn, finite)
    report.seconds = time.perf_counter() - start
    return report


def _to_device(device: torch.device, convert: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    def move(batch: Any) -> Any:
        batch = to_device(batch, device)
        return convert(batch) if convert is not None else batch

    return move


def _rel(a: Tensor, b: Tensor, floor: float = 0.0) -> float:
    """``‖a - b‖ / max(‖b‖, floor)`` (the difference itself where both are 0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = max(float(b.norm()), floor)
    diff = float((a - b).norm())
    return diff / scale if scale > 0 else diff


def _check_loss(report: PreflightReport, model: nn.Module, batch: Any, singles: list[Any], losses: Tensor,
                loss_fn: LossFn | None, reference_loss: Callable[[Any], Tensor | None] | None,
                finite: Tensor, targets: Tensor | None = None) -> None:
    """Each sample's loss in the batch = the model's own loss for it alone (finite ones only).
    ``targets``: the float targets whose mean squared error is on trial (:func:`_float_targets_loss`)."""
    reference: list[float] | None = None
    if loss_fn is None and not hasattr(model, "per_sample_loss") and isinstance(batch, Mapping) and "labels" in batch:
        reference, report.loss_reference = _own_losses(model, singles), "the model's own loss"
    if reference is None and reference_loss is not None:
        reference, report.loss_reference = _reference_losses(reference_loss, singles), "training_step"
    if reference is None:
        report.loss_reference = None
        if targets is not None:
            raise PreflightError(float_targets_message(targets, ", and the LightningModule's training_step could "
                                                                "not be run on one sample to confirm the loss"))
        return
    expected = torch.tensor(reference, dtype=torch.float64)[finite]
    got = losses.double().cpu()[finite]
    first = next(iter(model.parameters()), None)  # the model's arithmetic, autocast included (precision.py)
    tol = compute_tolerance(first.dtype if first is not None else losses.dtype, losses.device)
    error = float(((got - expected).abs() / expected.abs().clamp_min(1e-8)).max())
    report.loss_error = error
    if error > max(tol, 1e-5):
        rows = ", ".join(f"{g:.5g} vs {e:.5g}" for g, e in zip(got.tolist(), expected.tolist()))
        if targets is not None:
            raise PreflightError(float_targets_message(
                targets, f"; their per-sample mean squared error is not the loss training_step computes (each alone: "
                         f"{rows}; relative error {error:.2g})"))
        raise PreflightError(
            f"the audit's per-sample loss does not match {report.loss_reference} on the first training samples "
            f"(each alone: {rows}; relative error {error:.2g}). The scores would belong to another objective. Pass "
            "loss_fn=(model, batch) -> per-sample losses of shape (B,) that computes the training loss sample by "
            "sample (or define per_sample_loss(batch) on the module); preflight=False skips this check")


def _float_targets_loss(report: PreflightReport, model: nn.Module, batch: Any,
                        reference_loss: Callable[[Any], Tensor | None] | None
                        ) -> tuple[LossFn, Tensor, Callable[[Any], Tensor | None]]:
    """``(loss_fn, targets, reference_loss)`` for an ``(inputs, targets)`` batch with float
    targets: :func:`~lightning_influence.losses.mean_squared_error`, to be confirmed sample by
    sample against ``reference_loss`` (else the module's own ``training_step``); with neither, a
    :class:`PreflightError` that says the targets are floats and names ``loss_fn``. Once the loss
    check confirms it, ``report.loss_fn`` holds it for the audit."""
    if reference_loss is None:  # audit() of a LightningModule, outside a fit
        reference_loss = training_step_loss(model) if callable(getattr(model, "training_step", None)) else None
    if reference_loss is None:
        raise PreflightError(float_targets_message(batch[1], ", and the model has no training_step to confirm a "
                                                             "mean squared error against"))
    report.loss_fn = mean_squared_error
    report.notes.append("float targets: the per-sample mean squared error (mean over outputs), confirmed against "
                        "training_step")
    return mean_squared_error, batch[1], reference_loss


def _own_losses(model: nn.Module, singles: list[Any]) -> list[float] | None:
    """The loss the model (or the Hugging Face model inside it) reports for each sample alone."""
    inner = hf_model_of(model)
    for owner in [model] + ([inner] if inner is not None and inner is not model else []):
        values: list[float] = []
        try:
            with torch.no_grad():
                for one in singles:
                    loss = DEFAULT_LOSS.model_loss(owner, one)
                    if loss is None:
                        break
                    values.append(float(loss.double()))
        except Exception:  # noqa: BLE001 - this owner can't be asked: try the next one
            continue
        if len(values) == len(singles):
            return values
    return None


def _reference_losses(reference_loss: Callable[[Any], Tensor | None], singles: list[Any]) -> list[float] | None:
    values = []
    with torch.no_grad():
        for one in singles:
            loss = reference_loss(one)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                return None
            values.append(float(loss.double()))
    return values


def _check_gradients(report: PreflightReport, model: nn.Module, blocks: list[Block], batch: Any,
                     loss_fn: LossFn | None, finite: Tensor) -> None:
    """The batched per-sample gradients of every block = autograd of each sample's loss
    (samples with a finite loss only: the audit excludes the others)."""
    with gradient_mode(model, blocks):
        got, _ = per_sample_gradients(model, blocks, batch, loss_fn)
        out = default_loss(model, batch, loss_fn)
        params = [b.param for b in blocks]
        expected = {b.name: [] for b in blocks}
        for i in finite.nonzero().squeeze(1).tolist():  # a handful of samples: the independent reference
            found = torch.autograd.grad(out.losses[i], params, retain_graph=True, allow_unused=True)
            for b, g in zip(blocks, found):
                expected[b.name].append(b.to_matrix((torch.zeros_like(b.param) if g is None else g).unsqueeze(0))[0])
    bad, allowed, pairs = [], {}, {}
    for b in blocks:
        want = torch.stack(expected[b.name])
        have = got[b.name][finite.to(got[b.name].device)]
        rows = torch.isfinite(want).flatten(1).all(1)  # a non-finite gradient is excluded by the audit
        pairs[b.name] = (have[rows].detach().double().cpu(), want[rows].detach().double().cpu())
    # a block whose gradient is a sliver of the whole is rounding noise around 0 in both (a key bias under
    # softmax): it is measured against NEGLIGIBLE x the whole gradient, not against its own noise
    floor = NEGLIGIBLE * sum(float(w.pow(2).sum()) for _, w in pairs.values()) ** 0.5
    for b in blocks:
        have, want = pairs[b.name]
        error = _rel(have, want, floor) if want.shape[0] else 0.0
        report.gradient_error[b.name] = error
        tol = compute_tolerance(b.param.dtype, b.param.device)  # what this precision's rounding allows
        if not error <= tol:
            bad.append(f"{b.name} ({error:.2g})")
            allowed[tol] = str(b.param.dtype).replace("torch.", "")
    if bad:
        raise PreflightError(
            f"the per-sample gradients of {len(bad)} audited parameter(s) disagree with autograd of each sample's "
            f"loss (relative error): {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}, where rounding allows "
            f"{max(allowed):.2g} (precision.py: {_arithmetic(blocks)}). The parameter is used "
            "where the audit can't see it (outside its layer, or the batch does not split into samples). Leave it "
            "out with params=[...] name patterns, or pass a loss_fn whose batch splits into samples")


def _arithmetic(blocks: list[Block]) -> str:
    """The arithmetic the check ran in, for its messages: the parameters' dtype and autocast's."""
    param = blocks[0].param
    found = _autocast_dtype(param.device.type)
    name = str(param.dtype).replace("torch.", "")
    return name + (f" parameters under {str(found).replace('torch.', '')} autocast" if found is not None else "")
