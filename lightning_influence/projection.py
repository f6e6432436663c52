"""Random projection of per-sample gradients for blocks too big to store per sample.

For a Linear layer with input activations ``a`` ``(B, T, d_in)`` and output gradients ``b``
``(B, T, d_out)``, the per-sample weight gradient is ``Σ_t b_tᵀ a_t``. Projecting both factors
first, ``Σ_t (b_t P_out)ᵀ (a_t P_in) = P_outᵀ (Σ_t b_tᵀ a_t) P_in``, gives a ``(k_out, k_in)``
sketch of the gradient without ever forming the ``(d_out, d_in)`` matrix (as LoGra does).
With Gaussian ``P`` of variance ``1/k``, inner products between gradients are preserved in
expectation (Johnson–Lindenstrauss), so influence scores are approximately preserved; see
``benchmarks/projection.py`` for the measured rank correlation.
"""
from __future__ import annotations

import torch

from .params import Block


def project_blocks(blocks: list[Block], dim: int, seed: int = 0) -> list[Block]:
    """Give every Linear block with a side longer than ``dim`` Gaussian projections of each
    side down to ``min(side, dim)`` (in place; the block's stored ``shape`` shrinks accordingly).
    Blocks without the Linear fast path are left unprojected. Returns ``blocks``."""
    if dim < 1:
        raise ValueError(f"projection dim must be >= 1, got {dim}")
    for index, block in enumerate(blocks):
        if block.linear is None or max(block.param.shape) <= dim:
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        d_out = block.param.shape[0]
        k_out = min(d_out, dim)
        p_out = torch.randn(d_out, k_out, generator=generator, dtype=torch.float64) / k_out ** 0.5
        p_in = None
        if block.role == "weight":
            d_in = block.param.shape[1]
            k_in = min(d_in, dim)
            p_in = torch.randn(d_in, k_in, generator=generator, dtype=torch.float64) / k_in ** 0.5
        device, dtype = block.param.device, block.param.dtype
        block.projection = (p_out.to(device, dtype), None if p_in is None else p_in.to(device, dtype))
        shape = block.grad_shape
        rows, cols = (1, shape[0]) if len(shape) == 1 else shape
        block.transpose = len(shape) == 2 and rows > cols
        block.shape = (cols, rows) if block.transpose else (rows, cols)
    return blocks
