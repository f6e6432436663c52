"""Reporting an :class:`~lightning_influence.AuditResult` to Lightning loggers.

:func:`report` sends the scalars (``influence/<metric>``, ``influence/time/<stage>``) to every
logger through its own ``log_metrics``, then the rich output through one adapter per logger
type (TensorBoard, W&B, MLflow, CSV), with a picture gallery of the top-k samples when a
``render`` hook draws them (:mod:`.gallery`). Logger types are recognised by class name within the
``lightning.pytorch`` / ``pytorch_lightning`` (and Fabric) logger modules, so neither namespace
is imported here. Only global rank zero writes; an adapter's failure (a missing optional
package, a closed run) becomes a warning, never an exception.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..result import AuditResult
from . import csv as _csv
from . import mlflow as _mlflow
from . import tensorboard as _tensorboard
from . import wandb as _wandb
from ._common import is_rank_zero, warn
from .attribution import attribution_rows, build_attribution_gallery
from .figures import detection_curve_figure, detection_curve_rows
from .gallery import Gallery, build_gallery, dataset_renderer, find_tokenizer, text_describer
from .scalars import log_scalars, mlflow_name, scalar_metrics
from .summary import summary_text, write_scores_file
from .tables import markdown_table, text_table, top_k_rows

__all__ = ["report", "logger_kind", "top_k_rows", "markdown_table", "text_table", "summary_text",
           "write_scores_file", "detection_curve_figure", "detection_curve_rows", "scalar_metrics", "ADAPTERS",
           "Gallery", "build_gallery", "dataset_renderer", "find_tokenizer", "text_describer", "attribution_rows",
           "ATTRIBUTION_ADAPTERS"]

log = logging.getLogger(__name__)

#: logger modules whose classes are recognised by name (both namespaces, and Fabric's)
LOGGER_MODULES = ("lightning.pytorch.loggers", "pytorch_lightning.loggers",
                  "lightning.fabric.loggers", "lightning_fabric.loggers")
#: logger class name -> adapter kind
LOGGER_CLASSES = {"TensorBoardLogger": "tensorboard", "WandbLogger": "wandb",
                  "MLFlowLogger": "mlflow", "CSVLogger": "csv"}
#: adapter kind -> function ``write(logger, result, rows, step, gallery=None)`` for the rich output
#: (``gallery`` is passed only when there is one)
ADAPTERS: dict[str, Callable[..., None]] = {"tensorboard": _tensorboard.write, "wandb": _wandb.write,
                                            "mlflow": _mlflow.write, "csv": _csv.write}
#: adapter kind -> ``write_attribution(logger, result, rows, step, gallery=None)``: the per-query tables
ATTRIBUTION_ADAPTERS: dict[str, Callable[..., None]] = {
    "tensorboard": _tensorboard.write_attribution, "wandb": _wandb.write_attribution,
    "mlflow": _mlflow.write_attribution, "csv": _csv.write_attribution}
#: adapter kind -> metric-name rewrite its backend needs
RENAMES: dict[str, Callable[[str], str]] = {"mlflow": mlflow_name}
#: optional packages each adapter needs, for the warning's hint
PACKAGES = {"tensorboard": "tensorboard, matplotlib", "wandb": "wandb, matplotlib",
            "mlflow": "mlflow, pandas, matplotlib", "csv": "matplotlib (for the gallery)"}


def logger_kind(logger: Any) -> str | None:
    """``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"csv"`` or ``None`` (unknown) for a logger
    instance (subclasses included), from either Lightning namespace."""
    for cls in type(logger).__mro__:
        kind = LOGGER_CLASSES.get(cls.__name__)
        if kind is not None and cls.__module__.startswith(LOGGER_MODULES):
            return kind
    return None


def report(result: AuditResult, loggers: Sequence[Any], *, top_k: int = 50,
           describe: Callable[[int], str] | None = None, step: int | None = None,
           render: Callable[[int], Any] | None = None, describe_query: Callable[[int], str] | None = None,
           render_query: Callable[[int], Any] | None = None) -> None:
    """Report ``result`` to every logger in ``loggers`` (on global rank zero only).

    Every logger gets the scalars via its ``log_metrics(metrics, step)``: ``influence/<name>``
    for each finite metric (AUROC, AP, precision@k, ..., score summary statistics) and
    ``influence/time/<stage>``. Known logger types also get rich output: TensorBoard (score
    histogram, markdown top-k table, PR curve and detection-curve figure when ``noisy`` is
    known), W&B (``wandb.Table``, histogram, figure), MLflow (table, scores file and figure
    artifacts), CSV (``influence_top_k.csv``, ``influence_detection_curve.csv`` in ``log_dir``).
    With ``render``, the top-k samples' pictures too: the gallery figure ``influence/gallery``
    in TensorBoard, a ``wandb.Image`` per W&B table row (column ``image``) and the gallery,
    ``influence/gallery.png`` in MLflow, ``influence_gallery.png`` in the CSV logger's folder.
    Other loggers get the scalars only (and a debug message). Failures are warnings.

    Args:
        result: the audit result.
        loggers: the loggers, e.g. ``trainer.loggers`` (a single logger is accepted too).
        top_k: rows in the top-k table.
        describe: optional ``describe(sample_id) -> str`` for a readable ``text`` column.
        step: the step passed to the loggers (e.g. ``trainer.global_step``).
        render: optional ``render(sample_id) -> image`` (PIL image, array or tensor, see
            :func:`.gallery.to_image`) for the gallery; e.g. :func:`.gallery.dataset_renderer`.
        describe_query, render_query: the same for the queries of ``result.attribution`` (samples
            of the validation or query set). With an attribution, every known logger also gets
            the per-query tables and, with ``render``/``render_query``, a gallery row per query
            (:mod:`.attribution`).
    """
    if not is_rank_zero():
        return
    if loggers is None:
        return
    loggers = [loggers] if hasattr(loggers, "log_metrics") else list(loggers)
    if not loggers:
        return
    scalars = scalar_metrics(result)
    rows = top_k_rows(result, top_k, describe)
    gallery: Gallery | None = None
    if render is not None:
        try:
            gallery = build_gallery(rows, render)
        except Exception as err:  # noqa: BLE001 - e.g. a broken image hook: the tables still go out
            warn(f"lightning_influence: could not draw the top-k gallery ({type(err).__name__}: {err})")
    extra = {"gallery": gallery} if gallery is not None else {}
    attr_rows = attribution_rows(result, describe, describe_query) if result.attribution is not None else []
    attr_gallery = None
    if attr_rows:
        try:
            attr_gallery = build_attribution_gallery(attr_rows, render, render_query)
        except Exception as err:  # noqa: BLE001 - the tables still go out
            warn(f"lightning_influence: could not draw the attribution gallery ({type(err).__name__}: {err})")
    for logger in loggers:
        kind = logger_kind(logger)
        name = type(logger).__name__
        try:
            log_scalars(logger, scalars, step, rename=RENAMES.get(kind))
        except Exception as err:
            warn(f"lightning_influence: could not log the influence scalars to {name} "
                 f"({type(err).__name__}: {err})")
        if kind is None:
            log.debug("lightning_influence: no rich-output adapter for logger type %s.%s; it got the scalars only",
                      type(logger).__module__, type(logger).__qualname__)
        else:
            try:
                ADAPTERS[kind](logger, result, rows, step=step, **extra)
            except Exception as err:
                hint = f" (needs: {PACKAGES[kind]})" if isinstance(err, ImportError) and PACKAGES[kind] else ""
                warn(f"lightning_influence: could not write the {kind} report to {name}{hint}: "
                     f"{type(err).__name__}: {err}")
            if attr_rows:
                try:
                    ATTRIBUTION_ADAPTERS[kind](logger, result, attr_rows, step=step, gallery=attr_gallery)
                except Exception as err:
                    warn(f"lightning_influence: could not write the {kind} attribution report to {name}: "
                         f"{type(err).__name__}: {err}")
        try:
            logger.save()
        except Exception as err:
            log.debug("lightning_influence: %s.save() failed: %s", name, err)
