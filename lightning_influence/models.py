"""Model helpers every stage shares: the copy the audit works on, and where a model lives."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

#: the methods Lightning's ``from_compiled`` replaces by compiled wrappers on the module itself
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares (does not copy) an attached Lightning trainer and
    computes with its own parameters (:func:`_own_methods`)."""
    memo: dict[int, Any] = {}
    for attr in ("_trainer", "_fabric"):
        owner = getattr(model, attr, None)
        if owner is not None:
            memo[id(owner)] = owner
    return _own_methods(copy.deepcopy(model, memo))


def _own_methods(copied: nn.Module) -> nn.Module:
    """``copied`` with its own, uncompiled methods where Lightning compiled them.

    ``trainer.fit(torch.compile(module))`` leaves ``module.forward`` and its step methods as
    instance attributes that wrap the *original* module's bound methods
    (``lightning.pytorch.utilities.compile.from_compiled``, recorded in ``_compiler_ctx``). A
    deep copy keeps those wrappers, so it would compute with the original's parameters: no
    per-sample gradients of its own, tuning that moves nothing, gradients left on the user's
    weights. The copy drops them (its class's methods, bound to itself, apply again) and runs
    uncompiled: the same function, only slower."""
    for module in copied.modules():
        if isinstance(getattr(module, "_compiler_ctx", None), dict):
            for name in _COMPILED_METHODS:
                module.__dict__.pop(name, None)
            module._compiler_ctx = None
    return copied


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")
