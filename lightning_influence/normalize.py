"""Gradient normalisation of per-query (per-validation) scores.

``normalize="unit"`` scores with unit-norm gradients (the norm of each sample's gradient over
every audited block): ``S_ji = − (g'_j/‖g'_j‖)ᵀ (C + λI)^{-1} (g_i/‖g_i‖)``, as gradient-cosine
attribution (TracIn-CP's normalised variant, RelatIF's spirit) does. A training sample with a
large gradient (a long or badly fit sample) then no longer tops every query's list by its norm
alone. The curvature ``C`` is unchanged (built from the raw gradients). The query side only
rescales a row (its ranking is unchanged) and makes the rows comparable.

``normalize="centered"`` (the attribution default) first centres each query gradient on the mean
training gradient ``ḡ``, then scores with unit norms: ``S_ji = − ĝ'_jᵀ (C + λI)^{-1} ĝ_i`` with
``ĝ'_j = (g'_j − ḡ)/‖g'_j − ḡ‖``. Since ``−ḡᵀ(C + λI)^{-1} g_i`` is training sample ``i``'s influence
on the mean training loss, this scores how much more ``i`` helps query ``j`` than it helps the
training set on average: samples that lower every loss alike (shared tokens, a shared template)
stop crowding every query's list. At a training minimum ``ḡ ≈ 0`` and it changes nothing.

Streaming: :func:`sample_norms` is one read of a store; the training side is a per-column scale
``(n,)`` that any scorer multiplies into its ``(q, n_c)`` chunk (:func:`scale_columns`), the query
side a per-row scale applied to the query gradients before the solve.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .distributed import Collectives
from .store import masked_sums

NORMALIZE = ("none", "unit", "centered")


def check_normalize(value: str) -> str:
    """``value`` if it names a normalisation (:data:`NORMALIZE`), else ``ValueError``."""
    if value not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE} (or 'auto'), got {value!r}")
    return value


def inverse_norms(norms: Tensor) -> Tensor:
    """``1/‖g‖`` per sample ``(n,)``; 0 where the gradient is 0 (its scores stay 0)."""
    return torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))


def sample_norms(store: Any, chunk: int, device: torch.device, compute_dtype: torch.dtype) -> Tensor:
    """``‖g_i‖`` over every block of ``store`` (``(n, r, d)`` per block), ``(n,)`` float64: one
    streamed read of the store, ``chunk`` rows at a time."""
    out = torch.zeros(len(store), dtype=torch.float64)
    for start, groups in store.group_chunks(chunk):
        total = None
        for data in groups.values():  # (B, n_c, r, d): the blocks of one shape
            part = data.to(device, compute_dtype).square().sum(dim=(0, 2, 3))
            total = part if total is None else total + part
        if total is not None:
            out[start:start + total.shape[0]] = total.double().cpu()
    return out.sqrt()


def block_norms(blocks: Mapping[str, Tensor]) -> Tensor:
    """``‖g_j‖`` over every block of in-memory gradients (``(M, r, d)`` per block): ``(M,)`` float64."""
    total = sum(g.double().square().sum(dim=(1, 2)) for g in blocks.values())
    return torch.as_tensor(total, dtype=torch.float64).cpu().sqrt()


def scale_rows(blocks: Mapping[str, Tensor], scale: Tensor) -> dict[str, Tensor]:
    """Each block ``(M, r, d)`` with row ``j`` multiplied by ``scale[j]`` ``(M,)``."""
    return {name: g * scale.to(g.device, g.dtype).view(-1, 1, 1) for name, g in blocks.items()}


def scale_columns(scores: Tensor, scale: Tensor) -> Tensor:
    """``scores`` ``(q, n_c)`` with column ``i`` multiplied by ``scale[i]`` ``(n_c,)``, in place."""
    return scores.mul_(scale.to(scores.device, scores.dtype).view(1, -1))


def normalized(normalize: str, queries: Mapping[str, Tensor], train: Any, train_valid: Tensor | None, chunk: int,
               device: torch.device, compute_dtype: torch.dtype, dist: Any = None) -> tuple[dict[str, Tensor],
                                                                                            Tensor | None]:
    """What a per-query scorer needs under ``normalize``: the query gradients to solve with
    (``(q, r, d)`` per block: centred on the mean valid training gradient for ``"centered"``, then
    unit-norm; unchanged for ``"none"``) and the training side's column scale ``(n_r,)`` (``1/‖g_i‖``
    of this rank's store ``train``; ``None`` for ``"none"``) for ``score_chunks(column_scale=...)``.
    ``train_valid`` ``(n_r,)``: the rows the mean runs over (default: all); ``dist``: collectives
    that sum the mean over ranks (every rank must call this alike)."""
    dist = dist if dist is not None else Collectives()
    if check_normalize(normalize) == "none":
        return dict(queries), None
    queries = {k: v.to(device, compute_dtype) for k, v in queries.items()}
    if normalize == "centered":
        valid = torch.ones(len(train), dtype=torch.bool) if train_valid is None else train_valid
        count = float(dist.all_reduce_sum(valid.sum().reshape(1).to(torch.float64))[0])
        sums = masked_sums(train, valid, chunk, device, compute_dtype)
        queries = {k: v - dist.all_reduce_sum(sums[k]) / max(count, 1.0) for k, v in queries.items()}
    return scale_rows(queries, inverse_norms(block_norms(queries))), inverse_norms(
        sample_norms(train, chunk, device, compute_dtype))
