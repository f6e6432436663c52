"""Batched per-sample gradients of the audited blocks.

Fast path, for ``nn.Linear`` weights and biases (PEFT's ``lora_A``/``lora_B`` are
``nn.Linear``): one forward and one backward pass over the whole batch. Forward hooks keep
each layer's input activations ``a`` ``(B, T, d_in)``; tensor hooks on its output keep the
output gradients ``b`` ``(B, T, d_out)``; the per-sample weight gradient is
``Σ_t b_tᵀ a_t`` ``(B, d_out, d_in)``. Padded positions have zero output gradient (they don't
reach the loss), so padded batches give the same gradients as each sample alone.

Fallback, for any other parameter: ``torch.func.vmap`` over ``grad`` of the single-sample loss
(Hugging Face models under eager attention when their sdpa mask code can't be vmapped).
"""
from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad as grad_of
from torch.func import vmap
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call uses
from torch.utils._pytree import tree_map

from .losses import DEFAULT_LOSS, BatchFormatError, LossFn, LossOutput, default_loss
from .modes import preserved
from .params import Block
from .precision import full_precision


@contextmanager
def gradient_mode(model: nn.Module, blocks: list[Block]) -> Iterator[None]:
    """Eval mode (dropout off) and ``requires_grad`` on the audited blocks only; the model's
    modes, flags and grad state are restored on exit, also after an exception."""
    with preserved(model, training=False, requires_grad=[b.param for b in blocks]), torch.enable_grad():
        yield


class _LinearCapture:
    """Records ``(input activation, output gradient)`` pairs of selected Linear layers."""

    def __init__(self, modules: list[nn.Linear]) -> None:
        self.modules = modules
        self.records: dict[int, list[list[Tensor | None]]] = {}
        self.handles: list = []

    def __enter__(self) -> "_LinearCapture":
        for module in self.modules:
            self.handles.append(module.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.records.clear()

    def _forward_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not output.requires_grad:
            return
        record: list[Tensor | None] = [inputs[0].detach(), None]
        self.records.setdefault(id(module), []).append(record)

        def keep_grad(grad: Tensor) -> None:
            record[1] = grad.detach()

        output.register_hook(keep_grad)


def _linear_grad(block: Block, records: list[list[Tensor | None]], batch_size: int) -> Tensor:
    """Per-sample gradient of a Linear's weight ``(B, out, in)`` or bias ``(B, out)``, summed
    over every call of the layer in the forward pass. The products run without autocast: in
    the captured factors' dtype (float32 for half-precision ones), not rounded to bfloat16."""
    with full_precision():
        return _linear_grad_sum(block, records, batch_size)


def _linear_grad_sum(block: Block, records: list[list[Tensor | None]], batch_size: int) -> Tensor:
    total: Tensor | None = None
    for act, grad in records:
        if grad is None:
            continue
        if act.shape[0] != batch_size:
            raise RuntimeError(f"{block.name}: the layer's input has leading dim {act.shape[0]}, not the "
                               f"batch size {batch_size}; batch-first layouts are required")
        g = grad.reshape(batch_size, -1, grad.shape[-1])
        if g.dtype in (torch.float16, torch.bfloat16):  # a half-precision sum over tokens overflows
            g = g.float()
        if block.projection is not None:  # project both factors: the full gradient is never formed
            g = g @ block.projection[0].to(g.dtype)
        if block.role == "weight":
            a = act.reshape(batch_size, -1, act.shape[-1]).to(g.dtype)
            if block.projection is not None:
                a = a @ block.projection[1].to(g.dtype)
            part = torch.einsum("bto,bti->boi", g, a)
        else:
            part = g.sum(1)
        total = part if total is None else total + part
    if total is None:  # the layer did not take part in this loss
        total = torch.zeros(batch_size, *block.grad_shape, dtype=block.param.dtype, device=block.param.device)
    return total


def _generic_grads(model: nn.Module, blocks: list[Block], batch: Any, loss_fn: LossFn | None,
                   batch_size: int) -> dict[str, Tensor]:
    """Per-sample gradients of arbitrary parameters with ``torch.func`` (vmap over grad).
    Falls back to one backward per sample, with a warning, if the model can't be vmapped.

    The batch is split into samples through its structure (tuples, lists, mappings, named
    tuples and dataclasses of tensors); a batch that can't be split is a clear
    :class:`BatchFormatError`, never the whole batch's gradient for every sample."""
    names = [b.name for b in blocks]
    params = {b.name: b.param.detach() for b in blocks}
    tree, rebuild = _splittable(batch)
    _prime_loss(model, batch, loss_fn)

    def single_loss(p: dict[str, Tensor], sample: Any) -> Tensor:
        one = rebuild(tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, sample))
        with _swapped(model, p):
            return _one_sample_loss(model, one, loss_fn, batch)

    in_dims = (None, tree_map(lambda t: 0 if isinstance(t, Tensor) else None, tree))

    def vmapped() -> dict[str, Tensor]:
        # no_grad outside the transform: grad still differentiates single_loss, but the result is
        # not itself recorded as a function of the other parameters that require grad (the fast
        # path's Linear weights), which kept a graph of the whole vmapped backward alive
        with torch.no_grad():
            return vmap(grad_of(single_loss), in_dims=in_dims, randomness="same")(params, tree)

    try:
        grads = _vmap_attention_aware(model, vmapped)
    except BatchFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - any vmap limitation: fall back, correctness first
        warnings.warn(f"per-sample gradients of {len(names)} non-Linear parameter(s) can't be vmapped "
                      f"({type(err).__name__}: {err}); falling back to one backward per sample (slow)")
        rows = []
        for i in range(batch_size):  # slow path, only when vmap is impossible: plain autograd, so
            # that what broke vmap (e.g. a full backward hook's autograd.Function) can't break it
            one = rebuild(tree_map(lambda t: t[i:i + 1] if isinstance(t, Tensor) else t, tree))
            loss = _one_sample_loss(model, one, loss_fn, batch)
            found = torch.autograd.grad(loss, [b.param for b in blocks], allow_unused=True)
            rows.append({b.name: torch.zeros_like(b.param) if g is None else g.detach() for b, g in zip(blocks, found)})
        grads = {n: torch.stack([r[n] for r in rows]) for n in names}
    return {b.name: b.to_matrix(grads[b.name]) for b in blocks}


#: models whose non-Linear per-sample gradients vmap only under eager attention (see below)
_NEEDS_EAGER: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _vmap_attention_aware(model: nn.Module, vmapped: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """``vmapped()``; if it fails on a model with Hugging Face sdpa attention, again under eager
    attention (:func:`_eager_attention`), which is then used for that model from the start."""
    if _NEEDS_EAGER.get(model, False):
        with _eager_attention(model):
            return vmapped()
    try:
        return vmapped()
    except BatchFormatError:
        raise
    except Exception:  # noqa: BLE001 - Hugging Face's sdpa mask code branches on the mask's values
        with _eager_attention(model) as switched:
            if not switched:
                raise
            grads = vmapped()
        _NEEDS_EAGER[model] = True
        return grads


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[bool]:
    """Hugging Face models inside ``model`` that attend with ``"sdpa"`` run ``"eager"``
    attention until exit (yields whether any was switched). Their sdpa mask code checks the
    attention mask's values to skip it (``masking_utils._ignore_causal_mask_sdpa``), a
    data-dependent branch ``vmap`` can't trace; eager attention builds the same mask without
    it and computes the same function. Restored on exit, also after an exception.

    Encoder (bidirectional) masks take one more value check on the way
    (``masking_utils._ignore_bidirectional_mask_sdpa``: is any token padded?), eager attention
    included; inside ``vmap`` it answers "don't skip" (:func:`_vmappable_bidirectional_masks`),
    which builds the same all-visible mask that skipping it stands for (T5, BART's encoders)."""
    switched = []
    try:
        for module in model.modules():
            config = getattr(module, "config", None)
            if callable(getattr(module, "set_attn_implementation", None)) and \
                    getattr(config, "_attn_implementation", None) == "sdpa":
                try:
                    module.set_attn_implementation("eager")
                except Exception:  # noqa: BLE001 - a model without eager attention: leave it
                    continue
                switched.append(module)
        with _vmappable_bidirectional_masks():
            yield bool(switched)
    finally:
        for module in reversed(switched):
            module.set_attn_implementation("sdpa")


@contextmanager
def _vmappable_bidirectional_masks() -> Iterator[None]:
    """Until exit, Hugging Face's check whether a bidirectional mask can be skipped (a value
    check: ``padding_mask.all()``) answers ``False`` for a mask inside ``vmap`` instead of
    failing there; elsewhere it is unchanged. A no-op where transformers has no such check."""
    try:
        from transformers import masking_utils
    except ImportError:  # transformers is optional
        yield
        return
    original = getattr(masking_utils, "_ignore_bidirectional_mask_sdpa", None)
    if original is None:
        yield
        return

    def check(padding_mask: Tensor | None, *args: Any, **kwargs: Any) -> bool:
        if padding_mask is not None and torch._C._functorch.is_functorch_wrapped_tensor(padding_mask):
            return False
        return original(padding_mask, *args, **kwargs)

    masking_utils._ignore_bidirectional_mask_sdpa = check
    try:
        yield
    finally:
        masking_utils._ignore_bidirectional_mask_sdpa = original


def _splittable(batch: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(tree, rebuild)``: the batch as a structure ``torch.utils._pytree`` can split along
    dimension 0, and the function that turns a (per-sample) tree back into the user's type.
    Dataclass batches are taken apart field by field; other structures pass through as they are."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if f.init}
        return fields, lambda tree: dataclasses.replace(batch, **tree)
    return batch, lambda tree: tree


def _one_sample_loss(model: nn.Module, one: Any, loss_fn: LossFn | None, batch: Any) -> Tensor:
    """The loss of one sample (a batch of one); an unsplit batch is refused."""
    losses = default_loss(model, one, loss_fn).losses
    if losses.shape[0] != 1:
        raise BatchFormatError(
            f"per-sample gradients of non-Linear parameters need a batch that splits into samples, but a "
            f"{type(batch).__name__} batch gave {losses.shape[0]} losses for one sample: its tensors are hidden "
            "from torch's pytree (a custom class). Make the batch a dict, tuple, named tuple or dataclass of "
            "tensors, register it with torch.utils._pytree, or audit only Linear layers (params=...)")
    return losses.sum()


def _prime_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> None:
    """Let the default loss ask the model about its labels' shift outside vmap (once per model:
    :meth:`~lightning_influence.losses.DefaultLoss.prime`)."""
    if loss_fn is None:
        DEFAULT_LOSS.prime(model, batch)


@contextmanager
def _swapped(model: nn.Module, values: dict[str, Tensor]) -> Iterator[None]:
    """Until exit, ``model``'s parameters named in ``values`` are those tensors."""
    # tie_weights: a parameter shared by several modules (GPT-2's lm_head and wte) is swapped
    # in every place it is used, so the gradient covers all of its uses
    with _reparametrize_module(model, values, tie_weights=True):
        yield


def per_sample_gradients(model: nn.Module, blocks: list[Block], batch: Any,
                         loss_fn: LossFn | None = None) -> tuple[dict[str, Tensor], LossOutput]:
    """Per-sample gradients of every block for one batch, and the forward pass's outputs.

    Must run inside :func:`gradient_mode`. Returns ``{block name: (B, r, d)}`` and the
    :class:`LossOutput` (losses ``(B,)``, detached).
    """
    fast = [b for b in blocks if b.linear is not None]
    slow = [b for b in blocks if b.linear is None]
    modules = list({id(b.linear): b.linear for b in fast}.values())
    result: dict[str, Tensor] = {}
    with _LinearCapture(modules) as capture:
        out = default_loss(model, batch, loss_fn)
        batch_size = out.losses.shape[0]
        if fast:
            torch.autograd.grad(out.losses.sum(), [b.param for b in fast], allow_unused=True)
            for b in fast:
                result[b.name] = b.to_matrix(_linear_grad(b, capture.records.get(id(b.linear), []), batch_size))
    if slow:
        result.update(_generic_grads(model, slow, batch, loss_fn, batch_size))
    detached = LossOutput(out.losses.detach(),
                          None if out.logits is None else out.logits.detach(),
                          None if out.labels is None else out.labels.detach())
    return {b.name: result[b.name] for b in blocks}, detached
