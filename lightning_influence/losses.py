"""Per-sample losses: the ``loss_fn`` protocol, and the default loss for the common batch formats.

The ``loss_fn`` protocol: any callable ``(model, batch) -> Tensor`` of shape ``(B,)``, one loss per
sample of the batch as the ``DataLoader`` yields it (after the ``collate_fn``, moved to the device),
no reduction (``reduction="none"``), differentiable in the audited parameters. The audit calls it
on whole batches (the batched per-sample gradients), and on single samples (batches of one) for
parameters outside ``nn.Linear`` layers, so it must not mix samples (no batch statistics).
:func:`default_loss` checks its shape: a 1-D tensor with as many rows as the batch's tensors.

Without a ``loss_fn``, :class:`DefaultLoss` (its shared instance :data:`DEFAULT_LOSS`, through
:func:`default_loss`) picks by the batch's format:

- the model defines ``per_sample_loss(batch)``: it is used;
- ``(inputs, targets)``: ``cross_entropy(model(inputs), targets, reduction="none")``;
- a mapping with ``labels`` (Hugging Face style): per-sample cross entropy of the model's
  logits; sequence outputs are token-averaged, ignoring label ``-100`` (causal LMs shift; an
  encoder-decoder's decoder reads the labels shifted right, built by the model's own method).

``(inputs, targets)`` with floating-point targets is refused (:func:`float_targets_message`):
the pre-flight check confirms :func:`mean_squared_error` against ``training_step`` instead.
"""
from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .exceptions import BatchFormatError, LossMismatchError

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
    logits: Tensor | None = None
    labels: Tensor | None = None


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


def hf_model_of(model: nn.Module) -> nn.Module | None:
    """The outermost Hugging Face ``PreTrainedModel`` inside ``model`` (the model itself, a
    PEFT model's base model, a LightningModule's attribute, a compiled module's original), or
    ``None``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional
        return None
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def _structural_shift_guess(model: nn.Module) -> bool:
    """Only for models that report no loss of their own: a decoder-only HF model shifts."""
    hf = hf_model_of(model)
    if hf is None:
        return False
    name = type(hf).__name__
    return bool(getattr(getattr(hf, "config", None), "is_decoder", False)) or "CausalLM" in name or "LMHead" in name


def reported_loss(output: Any) -> Tensor | None:
    """The scalar loss a model's output carries (``output.loss`` or ``output["loss"]``), or ``None``."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None


def _batch_token_mean(logits: Tensor, labels: Tensor, shift: bool) -> float:
    """The token-mean cross entropy over the whole batch, as HF's loss functions reduce it."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total) / max(int((labels != IGNORE_INDEX).sum()), 1)


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def problem_type(model: nn.Module, labels: Tensor, n_outputs: int) -> str:
    """Hugging Face's rule for class-logit heads (``ForSequenceClassificationLoss``): the
    config's ``problem_type`` if set; else regression for one output, single-label
    classification for integer labels, multi-label otherwise. Without an HF config:
    single-label classification."""
    hf = hf_model_of(model)
    config = getattr(hf, "config", None) if hf is not None else None
    if config is None:
        return "single_label_classification"
    if getattr(config, "problem_type", None) in PROBLEM_TYPES:
        return config.problem_type
    if n_outputs == 1:
        return "regression"
    return "single_label_classification" if not labels.dtype.is_floating_point else "multi_label_classification"


def _forward_parameters(model: nn.Module) -> tuple[set, bool, int] | None:
    """``(named parameters, takes **kwargs, required positional count)`` of ``model.forward``."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    params = sig.parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                   and p.default is p.empty)
    return names, any(p.kind == p.VAR_KEYWORD for p in params), required


def _defines_forward(model: nn.Module) -> bool:
    """Whether ``model``'s class (not ``nn.Module`` or ``LightningModule`` itself) defines forward."""
    owner = next((cls for cls in type(model).__mro__ if "forward" in cls.__dict__), nn.Module)
    return not owner.__module__.startswith(("torch.nn.", "lightning.pytorch.core", "pytorch_lightning.core"))


def call_with_mapping(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    """``model(**inputs)`` when its forward names the keys (or takes ``**kwargs``), else
    ``model(inputs)`` for a forward that takes the batch as one argument. Keys that the forward
    can't take are a :class:`BatchFormatError` naming them."""
    if not _defines_forward(model):  # e.g. a LightningModule whose training_step calls self.model
        inner = hf_model_of(model)    # directly: the Hugging Face model inside is called instead
        if inner is not None:
            return call_with_mapping(inner, inputs)
    found = _forward_parameters(model)
    if found is None:
        return model(**inputs)
    names, var_kw, required = found
    unknown = sorted(str(k) for k in inputs if k not in names)
    if not unknown or var_kw:
        return model(**inputs)
    if required == 1 and len(names) >= 1 and not any(k in names for k in inputs):
        return model(dict(inputs))  # forward(self, batch): the mapping is one argument
    raise BatchFormatError(
        f"the batch has key(s) {unknown} that {type(model).__name__}.forward does not take (it takes "
        f"{sorted(names)}); the default loss passes every key but 'labels' to the model. Drop them in the "
        "collate_fn, or pass loss_fn=(model, batch) -> per-sample losses of shape (B,)")


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
    flat = logits.reshape(-1, logits.shape[-1])
    token = F.cross_entropy(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat, labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    mask = (labels != IGNORE_INDEX).to(token.dtype)
    return (token * mask).sum(1) / mask.sum(1).clamp_min(1)


def _decoder_inputs(model: nn.Module, inputs: Mapping[str, Any], labels: Tensor) -> Tensor | None:
    """For a Hugging Face encoder-decoder (T5, BART, ...) whose batch has no decoder inputs: the
    decoder input ids ``(B, T)`` that the model itself builds from ``labels`` ``(B, T)`` when it is
    given them (its ``prepare_decoder_input_ids_from_labels``: the labels shifted right behind the
    decoder start token, -100 replaced by the pad id). ``None`` for any other model or batch."""
    if any(key in inputs for key in ("decoder_input_ids", "decoder_inputs_embeds")) or labels.dim() != 2:
        return None
    hf = hf_model_of(model)
    prepare = getattr(hf, "prepare_decoder_input_ids_from_labels", None)
    if hf is None or not getattr(getattr(hf, "config", None), "is_encoder_decoder", False) or prepare is None:
        return None
    return prepare(labels=labels)


def float_targets(model: nn.Module, batch: Any) -> bool:
    """Whether ``batch`` is an ``(inputs, targets)`` pair with floating-point targets that the
    default loss would have to read (no ``per_sample_loss`` on the model): regression, or soft
    or multi-output targets."""
    return (not callable(getattr(model, "per_sample_loss", None)) and isinstance(batch, (tuple, list))
            and len(batch) == 2 and isinstance(batch[1], Tensor) and batch[1].is_floating_point())


def float_targets_message(targets: Tensor, found: str = "") -> str:
    """What to do about floating-point targets ``targets`` ``(B,)`` or ``(B, k)``."""
    return (f"the batch's targets are floats ({str(targets.dtype).replace('torch.', '')}, shape "
            f"{tuple(targets.shape)}: regression or soft targets), not class labels{found}. The default loss takes "
            "the per-sample mean squared error only where the LightningModule's training_step confirms it (the "
            "callback's pre-flight check). Pass loss_fn=(model, batch) -> per-sample losses of shape (B,): for the "
            "mean squared error loss_fn=lightning_influence.losses.mean_squared_error, which is "
            "lambda model, batch: (model(batch[0]).reshape(len(batch[1]), -1) - batch[1].reshape(len(batch[1]), "
            "-1)).pow(2).mean(1)")


def mean_squared_error(model: nn.Module, batch: Any) -> Tensor:
    """The per-sample mean squared error ``(B,)`` of an ``(inputs, targets)`` batch with float
    targets ``(B,)`` or ``(B, k)``: each sample's squared errors averaged over its outputs (so
    that the batch mean is ``F.mse_loss(outputs, targets)``). The model's outputs must hold as
    many numbers per sample as the targets."""
    inputs, targets = batch
    outputs = _logits_of(model(inputs))
    size = targets.shape[0]
    if outputs.shape[0] != size or outputs.numel() != targets.numel():
        raise BatchFormatError(f"the model's outputs {tuple(outputs.shape)} don't match the float targets "
                               f"{tuple(targets.shape)} one for one; pass loss_fn=(model, batch) -> per-sample "
                               "losses (B,)")
    dtype = torch.promote_types(torch.promote_types(outputs.dtype, targets.dtype), torch.float32)  # as autocast does
    return (outputs.reshape(size, -1).to(dtype) - targets.reshape(size, -1).to(dtype)).pow(2).mean(1)


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
    sizes = {t.shape[0] for t in tree_leaves(batch) if isinstance(t, Tensor) and t.dim() > 0}
    if sizes and losses.shape[0] not in sizes:  # e.g. a mean loss reshaped to (1,): rows would misalign
        raise ValueError(f"loss_fn returned {losses.shape[0]} losses for a batch of {sorted(sizes)[-1]} samples; "
                         "it must return one loss per sample, shape (B,) (use reduction='none')")
    return losses


class DefaultLoss:
    """The per-sample loss the audit uses when no ``loss_fn`` is given, as a task object.

    Called as a ``loss_fn`` (``loss(model, batch)`` → per-sample losses ``(B,)``), or through
    :meth:`output` for the logits and labels too. The batch formats it understands, in this order:

    - any batch, for a model that defines ``per_sample_loss(batch)``: its ``(B,)`` losses;
    - ``(inputs, targets)`` with integer class targets ``(B,)``:
      ``cross_entropy(model(inputs), targets, reduction="none")`` (float targets are refused:
      :func:`float_targets_message`);
    - a mapping with ``labels`` (Hugging Face style): every other key is passed to the model
      (:func:`call_with_mapping`) and each sample's share of the loss the model computes is taken
      from its logits: class logits ``(B, C)`` by the config's problem type (single-label cross
      entropy, regression's squared error, multi-label binary cross entropy); token logits
      ``(B, T, V)`` averaged over each sample's tokens not labelled ``-100``, shifted by one where
      the model's own loss shifts (causal LMs: :meth:`label_shift`), the decoder inputs built by
      the model itself for an encoder-decoder.

    State: :attr:`shift_decisions`, per model object (weakly held), whether its token loss shifts
    the labels, decided once by asking the model (:meth:`label_shift`).
    """

    def __init__(self) -> None:
        #: model -> whether its token loss shifts the labels (asked of each model object once)
        self.shift_decisions: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-sample losses ``(B,)`` of ``batch``: the ``loss_fn`` protocol."""
        return self.output(model, batch).losses

    def output(self, model: nn.Module, batch: Any) -> LossOutput:
        """One forward pass of ``model`` on ``batch`` (a format of the class docstring): per-sample
        losses ``(B,)``, plus logits ``(B, C)`` and labels ``(B,)`` for classification."""
        if hasattr(model, "per_sample_loss") and callable(model.per_sample_loss):
            return LossOutput(_check_losses(model.per_sample_loss(batch), batch))
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
            inputs, labels = batch
            if labels.is_floating_point():  # regression: which loss is the user's to say (or to confirm)
                raise BatchFormatError(float_targets_message(labels))
            logits = _logits_of(model(inputs))
            shift = False
        elif isinstance(batch, Mapping) and "labels" in batch:
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            decoder_inputs = _decoder_inputs(model, inputs, labels)
            if decoder_inputs is not None:  # an encoder-decoder: its decoder reads the labels shifted right
                inputs = {**inputs, "decoder_input_ids": decoder_inputs}
            try:
                logits = _logits_of(call_with_mapping(model, inputs))
            except TypeError as err:
                if isinstance(err, BatchFormatError):
                    raise
                raise BatchFormatError(
                    f"calling {type(model).__name__} with the batch's keys {sorted(map(str, inputs))} failed "
                    f"({err}); the default loss passes every key but 'labels' to the model. Drop keys the model "
                    "doesn't take in the collate_fn, or pass loss_fn=(model, batch) -> per-sample losses (B,)") from err
            if logits.dim() == 2 and labels.dim() >= 1:
                kind = problem_type(model, labels, logits.shape[-1])
                if kind == "regression":
                    target = labels.to(logits.dtype).reshape(logits.shape[0], -1)
                    return LossOutput(_check_losses((logits - target).pow(2).mean(1), batch))
                if kind == "multi_label_classification":
                    losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
                    return LossOutput(_check_losses(losses.mean(1), batch))
            # an encoder-decoder's logits are already aligned with its labels (the decoder shifted them)
            shift = logits.dim() == 3 and decoder_inputs is None and self.label_shift(model, inputs, labels)
        else:
            raise BatchFormatError(
                f"the default loss can't handle a batch of type {_describe(batch)}; it understands "
                "(inputs, targets) tuples, mappings with 'labels', or a module with per_sample_loss(batch). "
                "Pass loss_fn=lambda model, batch: <per-sample losses, shape (B,)>")
        losses = cross_entropy_per_sample(logits, labels, shift=shift)
        classification = logits.dim() == 2
        return LossOutput(losses, logits if classification else None, labels if classification else None)

    def label_shift(self, model: nn.Module, inputs: Mapping[str, Any], labels: Tensor) -> bool:
        """Whether ``model``'s own token loss aligns the logits at ``t`` with the label at ``t + 1``
        (causal LMs), for token logits ``(B, T, V)`` and labels ``(B, T)``.

        Asked of the model itself, once per model object: it is called (without gradients) on
        ``inputs`` plus ``labels``, and the loss it reports is compared with the batch's token-mean
        cross entropy with and without the shift (the inner Hugging Face model is asked when the
        wrapper's forward takes no labels). Raises :class:`LossMismatchError` when it is neither
        (label smoothing, class weights, ...). A model that reports no loss falls back to a
        structural guess, which the pre-flight check verifies against ``training_step``."""
        if model in self.shift_decisions:
            return self.shift_decisions[model]
        if _under_vmap(labels):  # no probe inside vmap; gradients.py primes the decision outside
            return _structural_shift_guess(model)
        decision: bool | None = None
        inner = hf_model_of(model)
        for owner in [model] + ([inner] if inner is not None and inner is not model else []):
            try:
                with torch.no_grad():
                    output = call_with_mapping(owner, {**inputs, "labels": labels})
                reported = reported_loss(output)
                logits = _logits_of(output).detach() if reported is not None else None
            except Exception:  # noqa: BLE001 - this owner takes no labels: ask the next one
                continue
            if reported is None or logits is None or logits.dim() != 3:
                continue
            value = float(reported.detach().float())
            candidates = {shift: _batch_token_mean(logits, labels, shift) for shift in (False, True)}
            matches = [s for s, c in candidates.items() if abs(c - value) <= 1e-3 * abs(value) + 1e-5]
            if not matches:
                raise LossMismatchError(
                    f"{type(owner).__name__} reports a loss of {value:.6g} on this batch, but the token-averaged cross "
                    f"entropy of its logits is {candidates[False]:.6g} (labels as given) or {candidates[True]:.6g} "
                    "(shifted by one, as causal LMs do): the model computes another loss (label smoothing? class "
                    "weights? an auxiliary term?). Pass loss_fn=(model, batch) -> per-sample losses of shape (B,)")
            decision = matches[0] if len(matches) == 1 else None  # both: a degenerate batch, ask again later
            if decision is None:
                return _structural_shift_guess(model)
            break
        if decision is None:
            decision = _structural_shift_guess(model)
        self.shift_decisions[model] = decision
        return decision

    def prime(self, model: nn.Module, batch: Any) -> None:
        """Decide :meth:`label_shift` for ``model`` now, outside ``torch.func.vmap`` (where the
        model can't be asked), by one forward pass without gradients on ``batch``: for a mapping
        batch with ``labels`` whose model is not decided yet; else nothing."""
        if isinstance(batch, Mapping) and "labels" in batch and model not in self.shift_decisions:
            with torch.no_grad():
                self.output(model, batch)

    def model_loss(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor | None:
        """The scalar loss ``model`` itself reports for the mapping ``batch`` (labels included),
        called as :meth:`output` calls it (:func:`call_with_mapping`), or ``None`` if it reports none."""
        return reported_loss(call_with_mapping(model, dict(batch)))


#: the shared default loss: :func:`default_loss`, :func:`token_label_shift` and the gradient pass use it
DEFAULT_LOSS = DefaultLoss()


def default_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> LossOutput:
    """One forward pass: per-sample losses ``(B,)``, plus logits ``(B, C)`` and labels ``(B,)``
    for classification (:meth:`DefaultLoss.output` of :data:`DEFAULT_LOSS`). With ``loss_fn`` it
    is simply called, its losses checked to be ``(B,)``."""
    if loss_fn is not None:
        return LossOutput(_check_losses(loss_fn(model, batch), batch))
    return DEFAULT_LOSS.output(model, batch)


def token_label_shift(model: nn.Module, inputs: Mapping[str, Any], labels: Tensor) -> bool:
    """:meth:`DefaultLoss.label_shift` of :data:`DEFAULT_LOSS`."""
    return DEFAULT_LOSS.label_shift(model, inputs, labels)


def with_sampled_labels(model: nn.Module, batch: Any, generator: torch.Generator,
                        loss_fn: LossFn | None = None) -> Any:
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
