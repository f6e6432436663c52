"""The gradient stage: one pass over a dataset, each sample's loss and per-sample gradients of
the audited blocks into a :class:`~lightning_influence.store.GradientStore`.

Kept apart from :mod:`gradients` (how one batch's per-sample gradients are computed) because
this is the loop around it: batching, the store and its float16 overflow, validity flags."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .data import dataset_of, sequential_loader, to_device
from .exceptions import NonFiniteGradientError
from .gradients import gradient_mode, per_sample_gradients
from .losses import LossFn, default_loss, with_sampled_labels
from .modes import preserved
from .params import Block
from .store import GradientStore


def training_losses(model: nn.Module, data: Any, batch_size: int, device: torch.device,
                    loss_fn: Optional[LossFn], indices: Optional[Tensor] = None) -> Tensor:
    """Each sample's loss ``(n,)`` (or of the ``indices`` subset) under ``model`` in eval mode."""
    out: List[Tensor] = []
    with preserved(model, params=(), training=False), torch.no_grad():
        for batch in sequential_loader(data, batch_size, ids_list(indices), name="train_data"):
            out.append(default_loss(model, to_device(batch, device), loss_fn).losses.detach().double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class Gathered:
    """What one gradient pass over (this rank's shard of) a dataset produced, per sample: the
    gradients ``store``, the ``losses``, a ``valid`` flag (finite loss and gradient), and the
    ``labels`` and ``predicted`` labels (-1 where the loss has no class labels)."""

    store: GradientStore
    losses: Tensor
    valid: Tensor
    labels: Tensor
    predicted: Tensor


def gather_gradients(model: nn.Module, blocks: List[Block], data: Any, *, batch_size: int,
                     device: torch.device, dtype: torch.dtype, loss_fn: Optional[LossFn],
                     sample_labels: Optional[torch.Generator] = None, max_memory: Optional[int] = None,
                     spill_dir: Optional[str] = None, progress: Optional[Callable[[int], None]] = None,
                     name: str = "data", indices: Optional[Tensor] = None) -> Gathered:
    """Per-sample gradients of ``blocks`` for every sample of ``data``, in order, into a store
    (``(n, r, d)`` per block), with each sample's loss, a validity flag (finite loss and
    gradient), and the labels and predicted labels for classification.

    With ``sample_labels`` the labels are drawn from the model's predictions (true Fisher)."""
    n = len(dataset_of(data, name)) if indices is None else int(indices.numel())
    store = GradientStore(n, {b.name: b.shape for b in blocks}, dtype, max_memory, spill_dir)
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
                    raise ValueError(f"{name}: the loss gave {size} value(s) for a batch of {min(batch_size, n - start)} "
                                     "samples; loss_fn must return one loss per sample, shape (B,), unreduced")
                ok = torch.isfinite(out.losses)
                for g in grads.values():
                    ok &= torch.isfinite(g).flatten(1).all(1)
                for g in grads.values():
                    g.masked_fill_(~ok.view(-1, 1, 1), 0.0)  # excluded samples never reach the solvers
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
        store.close()
        raise
    return Gathered(store, losses, valid, labels, predicted)


def _fit_storage(store: GradientStore, grads: Dict[str, Tensor], rows: int, name: str,
                 max_memory: Optional[int], spill_dir: Optional[str]) -> GradientStore:
    """``store``, or a float32 copy of its first ``rows`` rows (with a warning) when ``grads``
    would overflow its dtype: a float16 store can't hold values above 65504 (they would
    silently become inf). The gradients themselves are computed in at least float32."""
    limit = torch.finfo(store.dtype).max
    for block, g in grads.items():
        if not g.numel() or limit >= torch.finfo(g.dtype).max:
            continue
        peak = float(g.detach().abs().amax())
        if peak > limit:
            warnings.warn(f"{name}: per-sample gradients of {block} reach {peak:.3g}, beyond the range of "
                          f"grad_dtype={store.dtype} (max {limit:.3g}); storing them in float32 instead",
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


def ids_list(indices: Optional[Tensor]) -> Optional[List[int]]:
    return None if indices is None else indices.tolist()


def handle_nonfinite(valid: Tensor, policy: str, what: str) -> List[int]:
    """Warn about (or raise for) the ids flagged invalid ``(n,)``; returns them."""
    bad = (~valid).nonzero().squeeze(1).tolist()
    if bad:
        message = (f"{len(bad)} {what} sample(s) have a non-finite loss or gradient (ids {bad[:20]}"
                   f"{' ...' if len(bad) > 20 else ''})")
        if policy == "raise":
            raise NonFiniteGradientError(message)
        warnings.warn(message + "; they are excluded from the curvature and score NaN", RuntimeWarning)
    return bad
