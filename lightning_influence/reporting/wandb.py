"""Weights & Biases adapter: ``logger.experiment`` is a ``wandb`` run."""
from __future__ import annotations

from typing import Any

from ..result import AuditResult
from .attribution import columns_of as attribution_columns
from .figures import detection_curve_figure
from .gallery import Gallery
from .tables import columns_of

IMAGE_COLUMN = "image"


def write(logger: Any, result: AuditResult, rows: list[dict[str, Any]], step: int | None = None,
          gallery: Gallery | None = None) -> None:
    """Log ``influence/top_k`` (a ``wandb.Table``), ``influence/scores`` (a ``wandb.Histogram``),
    when ``result.noisy`` is known ``influence/detection_curve`` (a ``wandb.Image``), and with
    a ``gallery`` the sample's picture in the table's last column ``image`` (a captioned
    ``wandb.Image`` per row; empty for rows past the gallery) and the grid
    ``influence/gallery``."""
    import wandb  # the optional package itself (absolute import)

    scores = result.scores.detach().cpu().double()
    cols = columns_of(rows)
    data = [[r.get(c) for c in cols] for r in rows]
    if gallery is not None:
        where = {sample_id: i for i, sample_id in enumerate(gallery.ids)}
        cols = cols + [IMAGE_COLUMN]
        for r, line in zip(rows, data):
            i = where.get(int(r["id"]))
            line.append(None if i is None else
                        wandb.Image(gallery.pixels(i), caption=gallery.captions[i].replace("\n", ", ")))
    payload: dict[str, Any] = {"influence/top_k": wandb.Table(columns=cols, data=data)}
    finite = scores[scores.isfinite()]
    if finite.numel():
        payload["influence/scores"] = wandb.Histogram(finite.numpy())
    if result.noisy is not None:
        payload["influence/detection_curve"] = wandb.Image(detection_curve_figure(result))
    if gallery is not None:
        payload["influence/gallery"] = wandb.Image(gallery.figure())
    if step is not None:  # as WandbLogger.log_metrics does, so the panels share the x-axis
        payload["trainer/global_step"] = step
    logger.experiment.log(payload)


def write_attribution(logger: Any, result: AuditResult, rows: list[dict[str, Any]], step: int | None = None,
                      gallery: Any = None) -> None:
    """``influence/attribution``: one ``wandb.Table`` (a row per query, side and rank; filter by
    ``query``), and with a ``gallery`` its picture ``influence/attribution_gallery``."""
    import wandb

    cols = attribution_columns(rows)
    payload: dict[str, Any] = {"influence/attribution": wandb.Table(columns=cols,
                                                                    data=[[r.get(c) for c in cols] for r in rows])}
    if gallery is not None:
        payload["influence/attribution_gallery"] = wandb.Image(gallery.figure())
    if step is not None:
        payload["trainer/global_step"] = step
    logger.experiment.log(payload)
