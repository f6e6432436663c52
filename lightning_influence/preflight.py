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
   the available RAM and ``max_memory``; past it, an error that names ``max_memory=``,
   ``projection=``, ``params=`` and ``grad_dtype=`` with the figure each would give.

The original model is used in eval mode without gradients on its own ``.grad``; its modes,
flags and weights are restored, as in the audit itself.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .data import dataset_of, selected_ids, sequential_loader, to_device
from .exceptions import PreflightError
from .gradients import gradient_mode, per_sample_gradients
from .models import copy_model
from .modes import preserved
from .precision import _autocast_dtype, compute_tolerance
from .losses import (LossFn, _call_with_mapping, default_loss, float_targets, float_targets_message, hf_model_of,
                     mean_squared_error, reported_loss)
from .params import Block, ParamsSpec, select_blocks
from .solvers.base import SolverSpec

#: a block's gradient below this share of the whole audited gradient's norm is judged against that
#: share (its own norm may be rounding noise around an exact 0, e.g. an attention key's bias)
NEGLIGIBLE = 1e-2
#: share of the available RAM the audit may plan to use
RAM_SHARE = 0.8




@dataclass
class PreflightReport:
    """What the pre-flight check measured.

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
            chunk buffers + solve)``; ``peak_parts`` holds each term in bytes.
        available_bytes: RAM available when the check ran (``None`` if unknown).
        notes: anything the user should know (e.g. a sampler that selects a subset).
        loss_fn: the per-sample loss the check confirmed for a batch the default loss does not
            take on its own (float targets: :func:`~lightning_influence.losses.mean_squared_error`),
            which the audit then uses; ``None`` otherwise.
    """

    seconds: float = 0.0
    samples: int = 0
    loss_reference: Optional[str] = None
    loss_error: float = 0.0
    gradient_error: Dict[str, float] = field(default_factory=dict)
    numbers_per_sample: int = 0
    train_samples: int = 0
    val_samples: int = 0
    store_bytes: int = 0
    val_bytes: int = 0
    solve_bytes: int = 0
    peak_bytes: int = 0
    peak_parts: Dict[str, int] = field(default_factory=dict)
    available_bytes: Optional[int] = None
    notes: List[str] = field(default_factory=list)
    loss_fn: Optional[LossFn] = None

    def summary(self) -> str:
        """One line for the log."""
        worst = max(self.gradient_error.values(), default=0.0)
        ref = f"loss = {self.loss_reference} (rel. err {self.loss_error:.1e})" if self.loss_reference else \
            "no reference loss to compare"
        return (f"pre-flight check passed in {self.seconds:.2f} s on {self.samples} samples: {ref}; gradients of "
                f"{len(self.gradient_error)} blocks = autograd (max rel. err {worst:.1e}); gradient store "
                f"{_size(self.store_bytes)} for {self.train_samples} samples × {self.numbers_per_sample:,} numbers"
                + "".join(f"; {note}" for note in self.notes))


def check(model: nn.Module, train_data: Any, val_data: Any, *, loss_fn: Optional[LossFn] = None,
          params: ParamsSpec = "auto", method: str = "fvm", solver: SolverSpec = "hyperinf", fisher: str = "empirical",
          grad_dtype: Optional[torch.dtype] = None, device: Union[None, str, torch.device] = None,
          max_memory: Optional[int] = None, spill_dir: Optional[str] = None, projection: Optional[int] = None,
          reference_loss: Optional[Callable[[Any], Optional[Tensor]]] = None, samples: int = 3,
          convert: Optional[Callable[[Any], Any]] = None, batch_size: int = 32) -> PreflightReport:
    """Run the pre-flight check (see the module docstring); raise on the first problem.

    Args:
        model, train_data, val_data, loss_fn, params, method, solver, fisher, max_memory,
            spill_dir, projection: as for :func:`~lightning_influence.audit`.
        grad_dtype: the store's dtype (default: float32, float64 for a float64 model).
        device: where the check computes (default: the model's device).
        reference_loss: ``batch -> scalar loss`` that the module itself computes (the
            callback passes the LightningModule's ``training_step``); compared sample by sample.
        samples: how many training samples to check (2-3 keep it cheap).
        convert: applied to each batch after collation (the precision plugin's input conversion).
        batch_size: the audit's gradient batch size (its per-batch gradients count in the peak).
    Returns:
        A :class:`PreflightReport`.
    """
    start = time.perf_counter()
    report = PreflightReport()
    n_all = len(dataset_of(train_data, "train_data"))
    if n_all == 0:
        raise ValueError("train_data is empty: there is nothing to audit")
    if len(dataset_of(val_data, "val_data")) == 0:
        raise ValueError("val_data is empty: influence is measured on validation samples")
    train_ids, val_ids = selected_ids(train_data, "train_data"), selected_ids(val_data, "val_data")
    report.train_samples = n_all if train_ids is None else int(train_ids.numel())
    report.val_samples = len(dataset_of(val_data, "val_data")) if val_ids is None else int(val_ids.numel())
    if train_ids is not None:
        report.notes.append(f"the training loader's sampler selects {report.train_samples} of {n_all} samples: "
                            "only those are scored (ids stay dataset positions)")
    first = next((p for p in model.parameters()), None)
    device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    store_dtype = grad_dtype or (torch.float64 if first is not None and first.dtype == torch.float64 else torch.float32)
    if any(p.is_inference() for p in model.parameters()):  # made under inference_mode: no autograd on them

        model = copy_model(model)
    blocks = select_blocks(model, params)
    _check_memory(report, blocks, store_dtype, method, solver, fisher, max_memory, spill_dir, projection,
                  model=model, batch_size=batch_size)

    ids = (torch.arange(n_all) if train_ids is None else train_ids)[:max(1, samples)]
    to_device = _to_device(device, convert)
    batch = to_device(next(iter(sequential_loader(train_data, len(ids), ids.tolist(), name="train_data"))))
    singles = [to_device(b) for b in sequential_loader(train_data, 1, ids.tolist(), name="train_data")]
    report.samples = len(ids)
    targets: Optional[Tensor] = None
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


def _to_device(device: torch.device, convert: Optional[Callable[[Any], Any]]) -> Callable[[Any], Any]:
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


def _check_loss(report: PreflightReport, model: nn.Module, batch: Any, singles: List[Any], losses: Tensor,
                loss_fn: Optional[LossFn], reference_loss: Optional[Callable[[Any], Optional[Tensor]]],
                finite: Tensor, targets: Optional[Tensor] = None) -> None:
    """Each sample's loss in the batch = the model's own loss for it alone (finite ones only).
    ``targets``: the float targets whose mean squared error is on trial (:func:`_float_targets_loss`)."""
    reference: Optional[List[float]] = None
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
                        reference_loss: Optional[Callable[[Any], Optional[Tensor]]]
                        ) -> Tuple[LossFn, Tensor, Callable[[Any], Optional[Tensor]]]:
    """``(loss_fn, targets, reference_loss)`` for an ``(inputs, targets)`` batch with float
    targets: :func:`~lightning_influence.losses.mean_squared_error`, to be confirmed sample by
    sample against ``reference_loss`` (else the module's own ``training_step``); with neither, a
    :class:`PreflightError` that says the targets are floats and names ``loss_fn``. Once the loss
    check confirms it, ``report.loss_fn`` holds it for the audit."""
    if reference_loss is None:
        from .trainer_data import training_step_loss  # audit() of a LightningModule, outside a fit

        reference_loss = training_step_loss(model) if callable(getattr(model, "training_step", None)) else None
    if reference_loss is None:
        raise PreflightError(float_targets_message(batch[1], ", and the model has no training_step to confirm a "
                                                             "mean squared error against"))
    report.loss_fn = mean_squared_error
    report.notes.append("float targets: the per-sample mean squared error (mean over outputs), confirmed against "
                        "training_step")
    return mean_squared_error, batch[1], reference_loss


def _own_losses(model: nn.Module, singles: List[Any]) -> Optional[List[float]]:
    """The loss the model (or the Hugging Face model inside it) reports for each sample alone."""
    inner = hf_model_of(model)
    for owner in [model] + ([inner] if inner is not None and inner is not model else []):
        values: List[float] = []
        try:
            with torch.no_grad():
                for one in singles:
                    loss = reported_loss(_call_with_mapping(owner, dict(one)))
                    if loss is None:
                        break
                    values.append(float(loss.double()))
        except Exception:  # noqa: BLE001 - this owner can't be asked: try the next one
            continue
        if len(values) == len(singles):
            return values
    return None


def _reference_losses(reference_loss: Callable[[Any], Optional[Tensor]], singles: List[Any]) -> Optional[List[float]]:
    values = []
    with torch.no_grad():
        for one in singles:
            loss = reference_loss(one)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                return None
            values.append(float(loss.double()))
    return values


def _check_gradients(report: PreflightReport, model: nn.Module, blocks: List[Block], batch: Any,
                     loss_fn: Optional[LossFn], finite: Tensor) -> None:
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


def _arithmetic(blocks: List[Block]) -> str:
    """The arithmetic the check ran in, for its messages: the parameters' dtype and autocast's."""
    param = blocks[0].param
    found = _autocast_dtype(param.device.type)
    name = str(param.dtype).replace("torch.", "")
    return name + (f" parameters under {str(found).replace('torch.', '')} autocast" if found is not None else "")


# ---------------------------------------------------------------------- memory


def available_ram() -> Optional[int]:
    """Bytes of RAM available to a new allocation (Linux ``MemAvailable``), else ``None``."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _shape(block: Block, projection: Optional[int]) -> Tuple[int, int]:
    """The stored ``(r, d)`` of a block's per-sample gradient, after ``projection`` (see projection.py)."""
    if projection is None or block.linear is None or max(block.param.shape) <= projection:
        return block.shape
    sides = [min(s, projection) for s in block.param.shape]
    return (1, sides[0]) if len(sides) == 1 else (min(sides), max(sides))


def _numbers(blocks: List[Block], projection: Optional[int]) -> int:
    return sum(r * d for r, d in (_shape(b, projection) for b in blocks))


def _solve_bytes(blocks: List[Block], solver: SolverSpec, n_curvature: int, projection: Optional[int],
                 compute_bytes: int, options: Optional[Dict[str, Any]] = None, gathered: bool = True) -> int:
    """The solve stage's peak memory as the solver estimates it (:meth:`InverseSolver.estimate_bytes`,
    built with the curvature config's ``options``); a duck-typed solver without the method is
    fitted on a copy of every block's curvature gradients: that many bytes. ``gathered``: whether
    the solvers' gathered ``"cat"`` statistics are a copy (a spilled or converted store, several
    ranks) rather than views of a store in RAM of the compute dtype."""
    from .solvers.base import make_solver

    sizes = [_shape(b, projection) for b in blocks]
    instance = make_solver(solver, **(options or {})) if isinstance(solver, (str, type)) else solver
    estimate = getattr(instance, "estimate_bytes", None)
    if estimate is None:
        return n_curvature * sum(r * d for r, d in sizes) * compute_bytes
    import inspect

    takes_gathered = "gathered" in inspect.signature(estimate).parameters  # a user's may not
    return int(estimate(sizes, n_curvature, compute_bytes, **({"gathered": gathered} if takes_gathered else {})))


def _peak_parts(report: PreflightReport, blocks: List[Block], dtype: torch.dtype, method: str, fisher: str,
                max_memory: Optional[int], projection: Optional[int], model: Optional[nn.Module],
                batch_size: int) -> Dict[str, int]:
    """The terms of the audit's peak memory growth, in bytes (see :attr:`PreflightReport.peak_bytes`):

    - ``val``: the validation store (always in RAM), ``store``: the training store(s) in RAM (0
      when spilled past ``max_memory``);
    - ``model``: the audit's copy of the model (parameters and buffers); ``tuning``: vm/fvm's
      state of the tuned (audited) parameters: gradient, momentum or SAM's, θ* kept for a retry;
    - ``batch``: one batch's per-sample gradients ``batch × numbers`` in the compute dtype, with
      the transposed copy and finiteness mask of the largest block;
    - ``chunks``: the rows read at once (:func:`store.chunk_bytes`): a spilled store's read
      buffer, a float32 copy of float16 rows, and the solver's per-chunk temporaries of one block;
    - ``solve``: the solver's own peak (:func:`_solve_bytes`).
    """
    from .store import chunk_bytes

    itemsize = torch.empty((), dtype=dtype).element_size()
    compute_bytes = 8 if dtype == torch.float64 else 4
    sizes = [r * d for r, d in (_shape(b, projection) for b in blocks)]
    numbers, largest = sum(sizes), max(sizes, default=0)
    tuned = method in ("vm", "fvm")
    one_store = report.train_samples * numbers * itemsize
    spilled = max_memory is not None and one_store > max_memory
    row = max(numbers * itemsize, 1)
    rows = max(1, min(max(report.train_samples, report.val_samples), chunk_bytes(max_memory) // row))
    chunk = rows * row
    convert = rows * numbers * compute_bytes if itemsize != compute_bytes else 0
    model_bytes = 0
    if model is not None:
        model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    audited = sum(b.param.numel() * b.param.element_size() for b in blocks)
    return {"val": report.val_bytes, "store": 0 if spilled else report.store_bytes, "model": model_bytes,
            "tuning": (4 if method == "fvm" else 3) * audited if tuned else 0,
            "batch": batch_size * (numbers + 2 * largest) * compute_bytes,
            "chunks": (chunk if spilled else 0) + convert + rows * largest * compute_bytes,
            "solve": report.solve_bytes}


def _check_memory(report: PreflightReport, blocks: List[Block], dtype: torch.dtype, method: str, solver: SolverSpec,
                  fisher: str, max_memory: Optional[int], spill_dir: Optional[str], projection: Optional[int],
                  model: Optional[nn.Module] = None, batch_size: int = 32) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    compute_bytes = 8 if dtype == torch.float64 else 4
    numbers = _numbers(blocks, projection)
    n, m = report.train_samples, report.val_samples
    report.numbers_per_sample = numbers
    report.store_bytes = n * numbers * itemsize
    tuned = method in ("vm", "fvm")
    curvature_rows = m if tuned else n
    report.val_bytes = m * numbers * itemsize * (2 if fisher == "true" and tuned else 1)
    if fisher == "true" and not tuned:
        report.store_bytes *= 2
    report.solve_bytes = _solve_bytes(blocks, solver, curvature_rows, projection, compute_bytes)
    parts = report.peak_parts = _peak_parts(report, blocks, dtype, method, fisher, max_memory, projection, model,
                                            batch_size)
    report.peak_bytes = need = parts["val"] + parts["store"] + max(parts["model"] + parts["tuning"] + parts["batch"],
                                                                   parts["chunks"] + parts["solve"])
    report.available_bytes = available = available_ram()
    if available is None:
        return
    budget = int(available * RAM_SHARE)
    spilled = max_memory is not None and report.store_bytes > max_memory
    folder = spill_dir or tempfile.gettempdir()
    disk = _free_disk(folder)
    if need <= budget and not (spilled and disk is not None and report.store_bytes > disk):
        return
    per_number = n * itemsize
    options = []
    if not spilled:
        options.append(f"max_memory={budget // 2:_} (bytes): keeps {_size(budget // 2)} in RAM and spills "
                       f"{_size(report.store_bytes)} to {folder} ({_size(disk) if disk is not None else '?'} free)")
    for k in (64, 16):
        projected = _numbers(blocks, k)
        if projected < numbers:
            options.append(f"projection={k}: {_size(projected * per_number)} ({projected:,} numbers per sample)")
            break
    largest = sorted(blocks, key=lambda b: -b.shape[0] * b.shape[1])[:3]
    options.append(f"params=[...] name patterns for fewer parameters (now {len(blocks)} blocks, {numbers:,} numbers per "
                   f"sample; the largest: {', '.join(b.name for b in largest)}), or LoRA adapters with params='lora'")
    if itemsize > 2:
        options.append(f"grad_dtype='float16': {_size(report.store_bytes * 2 // itemsize)}")
    where = ("the disk" if need <= budget else "RAM")
    raise PreflightError(
        f"the audit would not fit in {where}: the training-gradient store needs {_size(report.store_bytes)} ({n:,} samples "
        f"× {numbers:,} numbers × {itemsize} bytes), the validation store {_size(report.val_bytes)} and the solve about "
        f"{_size(report.solve_bytes)}, a peak of about {_size(need)} in all, against {_size(available)} of available RAM"
        + (f" and {_size(disk)} free under {folder}" if spilled and disk is not None else "")
        + ". Options: " + "; ".join(options))


def _free_disk(folder: str) -> Optional[int]:
    probe = folder
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or ".").free
    except OSError:
        return None


def _size(nbytes: Optional[int]) -> str:
    if nbytes is None:
        return "?"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover
