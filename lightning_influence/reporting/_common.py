"""Shared helpers of the reporting adapters: rank-zero checks, warnings, finite scores,
atomic CSV writing."""
from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn
from torch import Tensor

from .._io import atomic_open
from ..metrics import ranking_values

ENV_RANK_KEYS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank() -> int:
    """The process's global rank as Lightning knows it (``rank_zero_only.rank``), else from the
    usual environment variables, else 0."""
    rank = getattr(rank_zero_only, "rank", None)
    if rank is not None:
        return int(rank)
    for key in ENV_RANK_KEYS:
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return 0


def is_rank_zero() -> bool:
    """Whether this process is global rank zero (the only one that writes reports)."""
    return global_rank() == 0


def warn(message: str) -> None:
    """Warn once from rank zero (``rank_zero_warn``), falling back to ``warnings.warn`` when
    Lightning has not set ``rank_zero_only.rank``."""
    if getattr(rank_zero_only, "rank", None) is not None:
        rank_zero_warn(message, stacklevel=3)
    elif is_rank_zero():
        warnings.warn(message, UserWarning, stacklevel=3)


def rank_normalised(scores: Tensor) -> Tensor:
    """Scores mapped into [0, 1] by dense rank: ties kept, order kept, excluded samples at 0."""
    _, inverse = torch.unique(ranking_values(scores), sorted=True, return_inverse=True)
    top = int(inverse.max()) if inverse.numel() else 0
    return inverse.to(torch.float64) / max(top, 1)


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: list[str]) -> str:
    """Write ``rows`` to ``path`` as CSV atomically (see ``lightning_influence._io``). Returns ``path``."""
    with atomic_open(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
