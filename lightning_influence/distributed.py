"""The few collectives the audit needs, so the pipeline runs the same on one process or many.

Every rank takes part in every collective, in the same order. A stage's failure on one rank
is agreed on by all ranks at the next checkpoint (:meth:`Collectives.checkpoint`), so that
no rank waits forever in a collective that the failed rank will never enter.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from .exceptions import RemoteStageError

T = TypeVar("T")


class Collectives:
    """Single process: every collective is the identity."""

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` over ranks (same shape on every rank)."""
        return tensor

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        """Concatenation along dim 0 of every rank's ``tensor`` (sizes may differ), in rank order."""
        return tensor

    def broadcast_(self, tensors: list[Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values."""

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return flag

    def checkpoint(self, stage: Callable[[], T]) -> T:
        """Run a local ``stage`` (no collectives inside), then agree across ranks whether any
        rank failed. Re-raises the local error, or :class:`RemoteStageError` on healthy ranks."""
        error: BaseException | None = None
        out: Any = None
        try:
            out = stage()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the ranks agree
            error = err
        if self.any(error is not None):
            if error is not None:
                raise error
            raise RemoteStageError("the audit failed on another rank (see that rank's error)")
        return out


class TorchCollectives(Collectives):
    """``torch.distributed`` collectives (the process group that Lightning's DDP/FSDP set up).

    Tensors travel on ``device`` (the CUDA device under NCCL, the CPU under gloo)."""

    def __init__(self, device: torch.device | None = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = dist.get_backend()
        self.device = device if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu"))

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        out = tensor.to(self.device).clone()
        self.dist.all_reduce(out)
        return out.to(tensor.device)

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        sizes = torch.zeros(self.world_size, dtype=torch.long, device=self.device)
        sizes[self.rank] = tensor.shape[0]
        self.dist.all_reduce(sizes)
        longest = int(sizes.max())
        padded = torch.zeros(longest, *tensor.shape[1:], dtype=tensor.dtype, device=self.device)
        padded[: tensor.shape[0]] = tensor.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self.dist.all_gather(parts, padded)
        return torch.cat([p[: int(k)] for p, k in zip(parts, sizes.tolist())]).to(tensor.device)

    def broadcast_(self, tensors: list[Tensor], src: int = 0) -> None:
        for t in tensors:
            buf = t.detach().to(self.device).clone()
            self.dist.broadcast(buf, src)
            with torch.no_grad():
                t.copy_(buf.to(t.device))

    def any(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.dist.all_reduce(value)
        return bool(value.item() > 0)


def default_collectives(device: torch.device | None = None) -> Collectives:
    """``TorchCollectives`` when a process group is initialised with more than one rank, else
    the single-process no-ops."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollectives(device)
    return Collectives()


def shard_ids(n: int, rank: int, world_size: int) -> Tensor:
    """This rank's sample ids: ``rank, rank + W, ...``; disjoint and covering, no padding."""
    return torch.arange(rank, n, world_size)


def unshard(parts: Tensor, n: int, world_size: int) -> Tensor:
    """Undo :func:`shard_ids` on a rank-ordered concatenation ``(n, ...)``: row ``i`` = sample ``i``."""
    out = torch.empty_like(parts)
    start = 0
    for rank in range(world_size):
        ids = shard_ids(n, rank, world_size)
        out[ids] = parts[start:start + ids.numel()]
        start += ids.numel()
    return out
