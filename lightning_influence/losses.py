"""Per-sample losses for the common batch formats, and the ``loss_fn`` protocol.

A ``loss_fn`` is any callable ``(model, batch) -> Tensor`` of shape ``(B,)``: one loss per
sample, no reduction. Without one, :func:`default_loss` picks by the batch's format:

- the model defines ``per_sample_loss(batch)``: it is used;
- ``(inputs, targets)``: ``cross_entropy(model(inputs), targets, reduction="none")``;
- a mapping with ``labels`` (Hugging Face style): per-sample cross entropy of the model's
  logits; sequence outputs are token-averaged, ignoring label ``-100`` (causal LMs shift).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """What one forward pass yields.

    Attributes:
        losses: ``(B,)`` per-sample losses.
        logits: ``(B, C)`` class logits for classification, else ``None``.
        labels: ``(B,)`` the batch's class labels for classification, else ``None``.
    """

    losses: Tensor
    logits: Optional[Tensor] = None
    labels: Optional[Tensor] = None


class BatchFormatError(TypeError):
    """The default loss does not understand this batch; pass ``loss_fn``."""


def _logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise BatchFormatError(f"the model returned {type(output).__name__}; expected a logits tensor "
                           "or an object with .logits. Pass loss_fn=(model, batch) -> per-sample losses")


def _is_causal_lm(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return type(base).__name__.endswith("ForCausalLM") or bool(getattr(config, "is_decoder", False))


def _call_with_mapping(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    try:
        sig = inspect.signature(model.forward)
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()) or all(
            k in sig.parameters for k in inputs)
    except (TypeError, ValueError):
        takes_kwargs = True
    return model(**inputs) if takes_kwargs else model(dict(inputs))


def _under_vmap(t: Tensor) -> bool:
    # inside torch.func.vmap a value check (.item()) is impossible; the caller checked the batch
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def cross_entropy_per_sample(logits: Tensor, labels: Tensor, shift: bool = False) -> Tensor:
    """Per-sample cross entropy. ``logits`` ``(B, C)`` with ``labels`` ``(B,)``, or sequence
    logits ``(B, T, C)`` with ``labels`` ``(B, T)`` averaged over tokens whose label is not
    -100 (``shift`` aligns token ``t``'s logits with label ``t+1``, as causal LMs do). -> ``(B,)``."""
    if logits.dim() == 2:
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} don't match logits {tuple(logits.shape)}")
        if labels.dtype.is_floating_point:
            raise ValueError(f"class labels must be integers, got {labels.dtype}; for another loss (e.g. "
                             "regression) pass loss_fn=(model, batch) -> per-sample losses (B,)")
        n_cls = logits.shape[1]
        if n_cls < 2:
            raise ValueError(f"the model gives {n_cls} class logit(s): cross entropy over one class is identically 0. "
                             "For one binary logit pass loss_fn=(model, batch) -> per-sample losses (B,), e.g. "
                             "binary_cross_entropy_with_logits(..., reduction='none')")
        if labels.numel() and not _under_vmap(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
            bad = labels[(labels < 0) | (labels >= n_cls)][:5].tolist()
            raise ValueError(f"labels out of range [0, {n_cls}): e.g. {bad}")
        return F.cross_entropy(logits, labels, reduction="none")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    n_cls = logits.shape[-1]
    if labels.numel() and not _under_vmap(labels):  # on CUDA an out-of-range target is a device assert
        bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= n_cls))]
        if bad.numel():
            raise ValueError(f"token labels out of range [0, {n_cls}) (or {IGNORE_INDEX} to ignore): "
                             f"e.g. {bad[:5].tolist()}")
    token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    mask = (labels != IGNORE_INDEX).to(token.dtype)
    return (token * mask).sum(1) / mask.sum(1).clamp_min(1)


def default_loss(model: nn.Module, batch: Any, loss_fn: Optional[LossFn] = None) -> LossOutput:
    """One forward pass: per-sample losses ``(B,)``, plus logits ``(B, C)`` and labels ``(B,)``
    for classification. With ``loss_fn`` it is simply called."""
    if loss_fn is not None:
        return LossOutput(_check_losses(loss_fn(model, batch), batch))
    if hasattr(model, "per_sample_loss") and callable(model.per_sample_loss):
        return LossOutput(_check_losses(model.per_sample_loss(batch), batch))
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
        inputs, labels = batch
        logits = _logits_of(model(inputs))
        shift = False
    elif isinstance(batch, Mapping) and "labels" in batch:
        labels = batch["labels"]
        logits = _logits_of(_call_with_mapping(model, {k: v for k, v in batch.items() if k != "labels"}))
        shift = logits.dim() == 3 and _is_causal_lm(model)
    else:
        raise BatchFormatError(
            f"the default loss can't handle a batch of type {_describe(batch)}; it understands "
            "(inputs, targets) tuples, mappings with 'labels', or a module with per_sample_loss(batch). "
            "Pass loss_fn=lambda model, batch: <per-sample losses, shape (B,)>")
    losses = cross_entropy_per_sample(logits, labels, shift=shift)
    classification = logits.dim() == 2
    return LossOutput(losses, logits if classification else None, labels if classification else None)


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"mapping with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of {len(batch)} ({', '.join(type(b).__name__ for b in batch)})"
    return type(batch).__name__


def _check_losses(losses: Any, batch: Any) -> Tensor:
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn must return per-sample losses of shape (B,), got {shape}; "
                         "use reduction='none'")
    from torch.utils._pytree import tree_leaves

    sizes = {t.shape[0] for t in tree_leaves(batch) if isinstance(t, Tensor) and t.dim() > 0}
    if sizes and losses.shape[0] not in sizes:  # e.g. a mean loss reshaped to (1,): rows would misalign
        raise ValueError(f"loss_fn returned {losses.shape[0]} losses for a batch of {sorted(sizes)[-1]} samples; "
                         "it must return one loss per sample, shape (B,) (use reduction='none')")
    return losses


def with_sampled_labels(model: nn.Module, batch: Any, generator: torch.Generator,
                        loss_fn: Optional[LossFn] = None) -> Any:
    """The batch with its labels replaced by draws from the model's own predictive
    distribution (for the *true* Fisher). Classification batches with the default loss only."""
    if loss_fn is not None or hasattr(model, "per_sample_loss"):
        raise ValueError("fisher='true' needs the default loss (it samples labels from the model's "
                         "logits); it can't be used with loss_fn or per_sample_loss()")
    with torch.no_grad():
        out = default_loss(model, batch)
    if out.logits is None:
        raise ValueError("fisher='true' is implemented for classification logits (B, C) only")
    probs = torch.softmax(out.logits.double(), dim=-1).cpu()
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(out.labels)
    if isinstance(batch, Mapping):
        return {**batch, "labels": sampled}
    return type(batch)((batch[0], sampled)) if isinstance(batch, tuple) else [batch[0], sampled]
