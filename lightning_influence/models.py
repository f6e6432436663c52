"""Model helpers every stage shares: the copy the audit works on, and where a model lives."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares (does not copy) an attached Lightning trainer."""
    memo: dict[int, Any] = {}
    for attr in ("_trainer", "_fabric"):
        owner = getattr(model, attr, None)
        if owner is not None:
            memo[id(owner)] = owner
    return copy.deepcopy(model, memo)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")
