"""The ``ddp_spawn`` hand-off: the callback's hooks run in worker processes; rank zero leaves
the result in a file that the launching process reads back (``cb.result`` there)."""
from __future__ import annotations

import os
import tempfile
import uuid
import warnings
import weakref
from typing import Any

import torch

from ._io import atomic_open
from .result import AuditResult


class Handoff:
    """A hand-off file owned by the process that created it (the launching process).

    Pickled with the callback into the workers (without the finaliser, which stays with the
    owner's copy): there :meth:`is_worker` is true and rank zero :meth:`leave` s the result;
    back in the owner :meth:`collect` reads it once and removes it."""

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        self.path = os.path.join(tempfile.gettempdir(), f"lightning_influence-{uuid.uuid4().hex}.pt")
        weakref.finalize(self, remove_quietly, self.path)

    def is_worker(self) -> bool:
        return os.getpid() != self.owner_pid

    def leave(self, result: AuditResult, state: dict[str, Any]) -> None:
        """In a worker (rank zero): write the result and the callback's state, atomically."""
        atomic_torch_save({"result": result.to_dict(), "state": dict(state)}, self.path)

    def collect(self) -> tuple[AuditResult, dict[str, Any]] | None:
        """In the owner: ``(result, state)`` a worker left, once; else ``None``."""
        if self.is_worker() or not os.path.exists(self.path):
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"InfluenceCallback: could not read the result a worker left in {self.path}: {err}",
                          RuntimeWarning, stacklevel=4)
            return None
        remove_quietly(self.path)
        return AuditResult.from_dict(payload["result"]), payload.get("state", {})


def atomic_torch_save(obj: Any, path: str) -> None:
    with atomic_open(path, binary=True) as handle:
        torch.save(obj, handle)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
