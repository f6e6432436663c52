"""Per-stage progress reporting. ``audit()`` takes any :class:`Progress`; the callback passes
one styled like the trainer's progress bar (:func:`trainer_progress`)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover - a hint only: the pytorch_lightning namespace's Trainer works the same
    import lightning.pytorch as pl


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


class RichProgress(Progress):
    """One ``rich`` bar per stage for trainers with a ``RichProgressBar``: a task in the
    trainer's own live display while it runs, else a transient display of its own."""

    def __init__(self, bar: Any = None) -> None:
        self.bar = bar

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        shared = getattr(self.bar, "progress", None)
        if shared is not None and not getattr(self.bar, "_progress_stopped", True):
            task = shared.add_task(f"influence: {name}", total=max(total, 1))
            try:
                yield lambda k: shared.update(task, advance=k)
            finally:
                shared.remove_task(task)
            return
        from rich.progress import Progress as RichBars

        with RichBars(transient=True) as bars:
            task = bars.add_task(f"influence: {name}", total=max(total, 1))
            yield lambda k: bars.advance(task, k)


def trainer_progress(trainer: "pl.Trainer") -> Progress:
    """A :class:`Progress` styled like the trainer's progress bar: none without one (or a
    disabled one), rich bars under a ``RichProgressBar`` (of either Lightning namespace,
    matched by class name), tqdm bars otherwise."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or getattr(bar, "is_disabled", False):
        return NullProgress()
    if "RichProgressBar" in {c.__name__ for c in type(bar).__mro__}:
        return RichProgress(bar)
    return TqdmProgress(leave=False)


class StageTimes:
    """Times the pipeline's stages (synchronising CUDA so the figures are honest):
    ``with times("name"): ...`` adds to ``times.seconds["name"]``."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        self.device = device

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class EpochTimer:
    """Seconds spent inside the training batches of an epoch (``batch_start``/``batch_end``
    around each), kept from the last complete epoch: the callback states the tuning's cost
    in training epochs with it."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._current = 0.0
        self._last: float | None = None

    def epoch_start(self) -> None:
        if self._current:
            self._last = self._current
        self._current = 0.0

    def batch_start(self) -> None:
        self._start = time.perf_counter()

    def batch_end(self) -> None:
        if self._start is not None:
            self._current += time.perf_counter() - self._start
            self._start = None

    def epoch_end(self) -> None:
        if self._current:
            self._last = self._current

    @property
    def epoch_seconds(self) -> float | None:
        """The last complete epoch's compute, else the current one's so far (``None``: none)."""
        return self._last or (self._current or None)

    def note_tuning_cost(self, result: Any) -> None:
        """Add the validation tuning's cost in training epochs to ``result.tuning``
        (``train_epoch_seconds``, ``epochs_of_training``) when an epoch was timed."""
        seconds = self.epoch_seconds
        if seconds and result.tuning:
            result.tuning["train_epoch_seconds"] = seconds
            result.tuning["epochs_of_training"] = result.stage_seconds.get("tuning", 0.0) / seconds
