"""The one save-and-restore of what the audit's passes change on a model.

The gradient passes, the tuning's checks and steps and the pre-flight check switch train/eval
mode, turn ``requires_grad`` on or off and clear ``.grad``; :func:`preserved` does the
switching and puts everything back on exit, also after an exception.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def preserved(model: nn.Module | None = None, params: Iterable[nn.Parameter] | None = None, *,
              training: bool | None = None, requires_grad: None | bool | Iterable[nn.Parameter] = None,
              clear_grads: bool = False) -> Iterator[None]:
    """Save, set, and on exit restore:

    - the ``training`` flag of every module of ``model`` (each module's own: a submodule kept in
      eval mode stays so); with ``training``, ``model.train(training)`` inside;
    - the ``requires_grad`` flag of ``params`` (default: every parameter of ``model``; ``()``:
      none). ``requires_grad`` sets them inside: a bool for all of them, or the parameters to
      turn on (the others of ``params`` off);
    - with ``clear_grads``, their ``.grad``, set to ``None`` inside.
    """
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    if params is None:
        params = model.parameters() if model is not None else ()
    params = list(params)
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params] if clear_grads else []
    try:
        if training is not None and model is not None:
            model.train(training)
        if requires_grad is not None:
            on = None if isinstance(requires_grad, bool) else {id(p) for p in requires_grad}
            for p in params:
                p.requires_grad_(bool(requires_grad) if on is None else id(p) in on)
        if clear_grads:
            for p in params:
                p.grad = None
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for p, grad in zip(params, grads):
            p.grad = grad


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and initialised CUDA) global RNG states on
    exit, so an audit in the middle of training changes no later shuffle or dropout mask."""
    python_state = random.getstate()
    torch_state = torch.get_rng_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    try:
        import numpy

        numpy_state = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        numpy = None  # type: ignore[assignment]
        numpy_state = None
    try:
        yield
    finally:
        random.setstate(python_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


def autograd_allowed(fn: Callable) -> Callable:
    """Run ``fn`` with inference mode off: the audit needs autograd even when it is called
    inside ``torch.inference_mode()`` (as Lightning runs its validation and test hooks). The
    global RNGs (Python's, NumPy's, torch's CPU and initialised CUDA ones: :func:`isolated_rng`,
    the callback's rule too) are restored afterwards, so an audit in the middle of training never
    changes what the training draws next."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), isolated_rng():
            return fn(*args, **kwargs)

    return wrapper
