"""Where per-sample gradients live: one ``(n, r, d)`` tensor per block.

The store is pre-allocated for ``n`` samples. Under ``max_memory`` bytes it lives in RAM;
past it, each block is a memory-mapped file under ``spill_dir`` that the solvers and the
scoring read chunk by chunk, so peak memory stays bounded whatever ``n`` is.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


class GradientStore:
    """Per-sample gradients of ``n`` samples for named blocks of shape ``(r, d)``.

    Args:
        n: number of samples.
        shapes: ``{block name: (r, d)}``.
        dtype: storage dtype (float16/bfloat16 halve the memory; float32 by default).
        max_memory: bytes allowed in RAM; ``None`` = no limit. Past it the store spills to disk.
        spill_dir: directory for the memory-mapped files (a temporary one by default).
        keep_files: keep the spilled files after :meth:`close`.
    """

    def __init__(self, n: int, shapes: Dict[str, Tuple[int, int]], dtype: torch.dtype = torch.float32,
                 max_memory: Optional[int] = None, spill_dir: Optional[str] = None,
                 keep_files: bool = False) -> None:
        self.n, self.shapes, self.dtype = n, dict(shapes), dtype
        self.nbytes = n * sum(r * d for r, d in shapes.values()) * torch.tensor([], dtype=dtype).element_size()
        self.spilled = max_memory is not None and self.nbytes > max_memory
        self.keep_files = keep_files
        self.directory: Optional[str] = None
        self.blocks: Dict[str, Tensor] = {}
        if self.spilled:
            if dtype not in _NUMPY_DTYPES:
                raise ValueError(f"a spilled store needs float16/32/64, got {dtype}")
            if spill_dir is not None:
                os.makedirs(spill_dir, exist_ok=True)
            self.directory = tempfile.mkdtemp(prefix="influence-grads-", dir=spill_dir)
            for i, (name, (r, d)) in enumerate(shapes.items()):
                arr = np.lib.format.open_memmap(os.path.join(self.directory, f"block{i}.npy"), mode="w+",
                                                dtype=_NUMPY_DTYPES[dtype], shape=(n, r, d))
                self.blocks[name] = torch.from_numpy(arr)
        else:
            self.blocks = {name: torch.zeros(n, r, d, dtype=dtype) for name, (r, d) in shapes.items()}

    @property
    def names(self) -> Sequence[str]:
        return list(self.shapes)

    def __len__(self) -> int:
        return self.n

    def write(self, start: int, grads: Dict[str, Tensor]) -> None:
        """Store a batch ``{name: (B, r, d)}`` at rows ``start .. start+B``."""
        for name, g in grads.items():
            self.blocks[name][start:start + g.shape[0]].copy_(g.detach().to("cpu", self.dtype))

    def block(self, name: str, rows: Optional[slice] = None) -> Tensor:
        """The gradients of one block, all rows or ``rows``: ``(n, r, d)``, on the CPU."""
        data = self.blocks[name]
        return data if rows is None else data[rows]

    def chunk_size(self, budget_bytes: int) -> int:
        """Rows per chunk so that one chunk of every block fits in ``budget_bytes``."""
        per_row = max(self.nbytes // max(self.n, 1), 1)
        return max(1, min(self.n, budget_bytes // per_row))

    def chunks(self, size: int) -> Iterator[Tuple[int, Dict[str, Tensor]]]:
        """Yield ``(start, {name: (≤size, r, d)})`` over all rows, in order."""
        for start in range(0, self.n, size):
            yield start, {name: self.blocks[name][start:start + size] for name in self.shapes}

    def close(self) -> None:
        """Release the memory; remove the spilled files unless ``keep_files``."""
        self.blocks = {}
        if self.directory and not self.keep_files:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "GradientStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
