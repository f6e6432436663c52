"""Measurements of the validation loss and its gradient, over the samples with a finite loss.

:func:`evaluate` (full-set loss, accuracy and gradient norm), :func:`mean_gradient` (the mean
gradient over a few batches, with an unbiased estimate of its squared norm), and the helpers
that drop samples with a non-finite loss from a batch (:func:`finite_losses`, :func:`finite_mean_loss`,
:func:`select_rows`) or tell a non-finite gradient (:func:`grads_finite`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..losses import LossFn, LossOutput, default_loss
from ..modes import preserved


def select_rows(batch: Any, keep: torch.Tensor, size: int) -> Any:
    """The batch restricted to the samples where ``keep`` ``(size,)`` (bool): every tensor with
    leading dimension ``size`` is indexed (a batch of another structure is returned unchanged)."""
    return tree_map(lambda t: t[keep.to(t.device)] if isinstance(t, torch.Tensor) and t.dim() > 0
                    and t.shape[0] == size else t, batch)


def finite_losses(model: nn.Module, batch: Any, loss_fn: LossFn | None,
                  grad: bool) -> tuple[torch.Tensor | None, LossOutput]:
    """The per-sample losses ``(B_finite,)`` of ``batch``'s samples with a finite loss (recomputed
    without the others, whose NaN/inf activations would reach the weight gradients as 0 * NaN),
    and the output of the loss; ``None`` when none is finite. ``grad``: with autograd on."""
    with torch.set_grad_enabled(grad):
        out = default_loss(model, batch, loss_fn)
        ok = torch.isfinite(out.losses.detach())
        if bool(ok.all()):
            return out.losses, out
        if not bool(ok.any()):
            return None, out
        out = default_loss(model, select_rows(batch, ok, out.losses.shape[0]), loss_fn)
        return (out.losses if bool(torch.isfinite(out.losses.detach()).all()) else None), out


def evaluate(model: nn.Module, loader: Any, loss_fn: LossFn | None = None,
             to_device: Callable[[Any], Any] = lambda b: b,
             grad_of: list[nn.Parameter] | None = None) -> tuple[float, float, int, float]:
    """Mean loss and accuracy (NaN without class labels) over every sample of ``loader`` with a
    finite loss, in eval mode, and the norm of the mean loss's gradient with respect to
    ``grad_of`` (NaN without): ``(loss, accuracy, samples, gradient norm)``. The parameters'
    ``.grad`` are left as they were."""
    total, correct, count, labelled = 0.0, 0.0, 0, 0
    params = list(grad_of or [])
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    with preserved(model, params, training=False, requires_grad=True, clear_grads=True):
        for batch in loader:
            finite, out = finite_losses(model, to_device(batch), loss_fn, grad=bool(params))
            if finite is None:
                continue
            if params:
                grads = torch.autograd.grad(finite.sum(), params, allow_unused=True)
                for acc, g in zip(sums, grads):
                    if g is not None:
                        acc.add_(g.double())
            total += float(finite.detach().double().sum())
            count += int(finite.shape[0])
            if out.logits is not None and out.labels is not None:
                correct += float((out.logits.detach().argmax(-1) == out.labels).double().sum())
                labelled += int(finite.shape[0])
    nan = float("nan")
    norm = math.sqrt(sum(float(a.pow(2).sum()) for a in sums)) / count if params and count else nan
    return (total / count if count else nan), (correct / labelled if labelled else nan), count, norm


def mean_gradient(model: nn.Module, params: list[nn.Parameter], batches: list[Any],
                  loss_fn: LossFn | None, reference: list[nn.Parameter] | None = None,
                  population: int | None = None, others: int | None = None,
                  tally: dict[str, float] | None = None) -> tuple[list[torch.Tensor], float, int, float]:
    """The mean loss's gradient over ``batches`` (samples with a finite loss) with respect to
    ``params`` (one tensor per parameter, of its shape), in the model's current mode, the mean
    loss, the sample count, and an unbiased
    estimate of ``‖E g‖²`` over ``reference`` (a subset of ``params``; NaN without, or with
    fewer than two batches): the mean inner product of gradients of samples in *different*
    batches (``(‖Σ s_b‖² - Σ ‖s_b‖²) / (c² - Σ c_b²)`` from the batch sums ``s_b``), free of the
    sampling noise that inflates the norm of a small subset's mean gradient.

    With ``population`` (the size ``M`` of the set ``batches`` were drawn from without
    replacement), the last value is instead an unbiased estimate of the squared norm of the mean
    gradient over *that whole set*, the figure an exact full-set pass measures:
    ``‖ḡ_M‖² = D/M + (1 - 1/M)·P``, where ``P`` is the pair estimate above and ``D`` the mean
    per-sample squared norm, estimated from the batch sums as ``(Σ‖s_b‖² - (Σc_b² - c)·P) / c``.
    It keeps the set's own sampling term ``D/M``, so it is positive where ``P`` alone is mostly
    noise, and exact when the batches cover the set (``c = M``). ``others`` instead of
    ``population``: the set's samples outside ``batches`` (``M = c + others``). ``tally``: gets
    the batches' ``"correct"`` and ``"labelled"`` counts added (classification losses). The
    parameters' ``.grad`` and ``requires_grad`` are left as they were."""
    sums = [torch.zeros_like(p) for p in params]
    ref_ids = {id(p) for p in (reference or [])}
    within, sizes_sq = 0.0, 0
    total, count = 0.0, 0
    with preserved(params=params, requires_grad=True), torch.enable_grad():
        for batch in batches:
            losses, out = finite_losses(model, batch, loss_fn, grad=True)
            if losses is None:
                continue
            if tally is not None and out.logits is not None and out.labels is not None:
                tally["correct"] = tally.get("correct", 0.0) + float((out.logits.detach().argmax(-1) == out.labels)
                                                                     .double().sum())
                tally["labelled"] = tally.get("labelled", 0.0) + int(losses.shape[0])
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            for p, acc, g in zip(params, sums, grads):
                if g is not None:
                    acc.add_(g.detach())
                    if id(p) in ref_ids:
                        within += float(g.detach().double().pow(2).sum())
            total += float(losses.detach().double().sum())
            count += int(losses.shape[0])
            sizes_sq += int(losses.shape[0]) ** 2
    if others is not None:
        population = count + others
    pairs = count ** 2 - sizes_sq
    full = sum(float(a.double().pow(2).sum()) for p, a in zip(params, sums) if id(p) in ref_ids)
    if not ref_ids:
        sq = float("nan")
    elif population is not None and population <= count:  # the batches are the whole set: exact
        sq = full / count ** 2 if count else float("nan")
    elif pairs <= 0:  # one batch: no pair of samples in different batches
        sq = float("nan")
    else:
        sq = (full - within) / pairs
        if population is not None:
            diag = (within - (sizes_sq - count) * sq) / count  # mean per-sample ‖g_i‖²
            sq = diag / population + (1 - 1 / population) * sq
    return [a / max(count, 1) for a in sums], (total / count if count else float("inf")), count, sq


def finite_mean_loss(model: nn.Module, batch: Any,
                     loss_fn: LossFn | None) -> tuple[torch.Tensor | None, Any, int]:
    """The batch's mean loss (a scalar) over its samples with a finite loss, the batch those
    samples form, and their number. A non-finite sample is dropped from the batch (masking its
    loss is not enough: its NaN/inf activations would still reach the weight gradients as
    0 * NaN). ``None`` if no finite loss is left."""
    losses = default_loss(model, batch, loss_fn).losses
    finite = torch.isfinite(losses.detach())
    if bool(finite.all()):
        return losses.mean(), batch, int(losses.shape[0])
    if not bool(finite.any()):
        return None, batch, 0
    batch = select_rows(batch, finite, losses.shape[0])
    losses = default_loss(model, batch, loss_fn).losses
    ok = bool(torch.isfinite(losses.detach()).all())
    return (losses.mean() if ok else None), batch, int(losses.shape[0])


def grads_finite(params: list[nn.Parameter]) -> bool:
    """Whether every ``.grad`` of ``params`` is finite (``True`` without any)."""
    flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return not flags or bool(torch.stack(flags).all())  # one device sync, not one per parameter
