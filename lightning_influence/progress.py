"""Per-stage progress reporting. ``audit()`` takes any :class:`Progress`; the callback passes
one styled like the trainer's progress bar."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


class Progress:
    """Reports a stage's progress: ``with progress.stage(name, total) as update: update(k)``."""

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda k: None


class NullProgress(Progress):
    """Reports nothing."""


class TqdmProgress(Progress):
    """One tqdm bar per stage (the bar Lightning's default ``TQDMProgressBar`` uses)."""

    def __init__(self, leave: bool = False) -> None:
        self.leave = leave

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"influence: {name}", leave=self.leave, dynamic_ncols=True)
        try:
            yield bar.update
        finally:
            bar.close()
