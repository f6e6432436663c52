"""What ``InfluenceCallback`` does with a result on rank zero: every logger the trainer has, the
scores file, and the one-screen summary. Rank-independent parts (the scores folder, which may be
a collective under DDP) are called on every rank."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..data import collate_of, dataset_of
from ..distributed import RemoteStageError
from ..result import AuditResult
from . import report
from .gallery import dataset_renderer, find_tokenizer, text_describer
from .summary import summary_text, write_scores_file

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

Hooks = tuple[Callable[[int], str] | None, Any]


def sample_hooks(trainer: "pl.Trainer", module: Any, data: Any, hooks: Hooks) -> Hooks:
    """``(describe, render)`` for the reports: the user's ``hooks``, else built from ``data``
    (decoded text through a tokenizer, pictures of image batches), else ``None``."""
    describe, render = hooks
    if data is not None and (describe is None or render is None):
        try:
            dataset, collate = dataset_of(data, "train_data"), collate_of(data)
            if render is None:
                render = dataset_renderer(dataset, collate)
            if describe is None:
                tokenizer = find_tokenizer(module, getattr(trainer, "datamodule", None), collate)
                describe = text_describer(dataset, collate, tokenizer)
        except Exception as err:  # noqa: BLE001 - the tables go out without them
            warnings.warn(f"InfluenceCallback: could not read the training samples for the report "
                          f"({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
    return describe, (render if callable(render) else None)


def scores_folder(trainer: "pl.Trainer", dirpath: str | None, filename: str | None) -> str | None:
    """``dirpath``, else ``trainer.log_dir`` (call on every rank: it is a collective under DDP)."""
    if dirpath is not None or not filename:
        return dirpath
    try:
        folder = trainer.log_dir
    except Exception:  # noqa: BLE001 - e.g. a trainer that was never fit
        folder = None
    return folder or getattr(trainer, "default_root_dir", None) or os.getcwd()


def scores_file(trainer: "pl.Trainer", result: AuditResult, folder: str | None, filename: str | None,
                epoch_tag: bool) -> str | None:
    """Write the full per-sample scores file (atomically) into ``folder``; an audit at an epoch
    end adds ``-epoch{E}`` before the suffix. Returns its path (``None`` without a file name)."""
    if not filename:
        return None
    if epoch_tag:
        stem, suffix = os.path.splitext(filename)
        filename = f"{stem}-epoch{trainer.current_epoch}{suffix}"
    return write_scores_file(result, folder, filename)


def report_to_trainer(trainer: "pl.Trainer", result: AuditResult, *, module: Any, data: tuple[Any, Any],
                      hooks: tuple[Hooks, Hooks], step: int | None, top_k: int, folder: str | None,
                      filename: str | None, epoch_tag: bool, verbose: bool | None,
                      log: Callable[[str], None]) -> str | None:
    """Log ``result`` to every logger of ``trainer``, write the scores file (:func:`scores_file`)
    and print the one-screen summary through ``log`` (``verbose``; ``None``: when the trainer
    shows a progress bar). ``data``: the training data and the attribution's query data;
    ``hooks``: the user's ``(describe, render)`` for each (:func:`sample_hooks` fills the gaps).
    Returns the scores file's path."""
    describe, render = sample_hooks(trainer, module, data[0], hooks[0])
    describe_query, render_query = (sample_hooks(trainer, module, data[1], hooks[1]) if result.attribution is not None
                                    else (None, None))
    report(result, list(getattr(trainer, "loggers", [])), top_k=top_k, describe=describe, step=step,
           render=render, describe_query=describe_query, render_query=render_query)
    path = scores_file(trainer, result, folder, filename, epoch_tag)
    if verbose if verbose is not None else getattr(trainer, "progress_bar_callback", None) is not None:
        text = summary_text(result, top=10, describe=describe, describe_query=describe_query)
        if path:
            text += f"\n\nAll scores: {path}"
        log(text)
    return path


def warn_failure(trainer: "pl.Trainer", err: BaseException) -> None:
    """The warning of a failed automatic audit under ``on_error="warn"`` (a failure on another
    rank: once, from rank zero)."""
    if isinstance(err, RemoteStageError):
        if trainer.is_global_zero:
            warnings.warn(f"InfluenceCallback: the audit failed on another rank ({err}); the training "
                          "run and its checkpoints are unaffected", RuntimeWarning, stacklevel=3)
        return
    rank = "" if trainer.world_size == 1 else f" on rank {trainer.global_rank}"
    warnings.warn(f"InfluenceCallback: the audit failed{rank} with {type(err).__name__}: {err}. "
                  "The training run and its checkpoints are unaffected; pass on_error='raise' "
                  "to see the traceback", RuntimeWarning, stacklevel=3)
