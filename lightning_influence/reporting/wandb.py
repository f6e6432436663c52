"""Weights & Biases adapter: ``logger.experiment`` is a ``wandb`` run."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..result import AuditResult
from .figures import detection_curve_figure
from .tables import columns_of


def write(logger: Any, result: AuditResult, rows: List[Dict[str, Any]], step: Optional[int] = None) -> None:
    """Log ``influence/top_k`` (a ``wandb.Table``), ``influence/scores`` (a ``wandb.Histogram``)
    and, when ``result.noisy`` is known, ``influence/detection_curve`` (a ``wandb.Image``)."""
    import wandb  # the optional package itself (absolute import)

    scores = result.scores.detach().cpu().double()
    cols = columns_of(rows)
    payload: Dict[str, Any] = {
        "influence/top_k": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows]),
    }
    finite = scores[scores.isfinite()]
    if finite.numel():
        payload["influence/scores"] = wandb.Histogram(finite.numpy())
    if result.noisy is not None:
        payload["influence/detection_curve"] = wandb.Image(detection_curve_figure(result))
    if step is not None:  # as WandbLogger.log_metrics does, so the panels share the x-axis
        payload["trainer/global_step"] = step
    logger.experiment.log(payload)
