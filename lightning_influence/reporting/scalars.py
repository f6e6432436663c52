"""Scalars for every logger: ``influence/<metric>``, ``influence/time/<stage>``."""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, Optional

from ..metrics import score_summary
from ..result import AuditResult

PREFIX = "influence/"


def scalar_metrics(result: AuditResult) -> Dict[str, float]:
    """The scalars to log: every finite entry of ``result.metrics`` (plus the score summary
    statistics if absent) as ``influence/<name>`` and each stage time as
    ``influence/time/<stage>``. NaN/inf and non-numeric values are left out."""
    metrics: Dict[str, Any] = dict(result.metrics)
    finite = result.scores[result.scores.isfinite()]
    if finite.numel():
        for key, value in score_summary(finite).items():
            metrics.setdefault(key, value)
    out = {f"{PREFIX}{k}": v for k, v in metrics.items()}
    out.update({f"{PREFIX}time/{k}": v for k, v in result.stage_seconds.items()})
    clean: Dict[str, float] = {}
    for key, value in out.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            clean[key] = value
    return clean


def mlflow_name(name: str) -> str:
    """An MLflow-legal metric name (only letters, digits, ``_ - . / space``): ``@`` becomes
    ``_at_`` and ``%`` becomes ``pct`` (``influence/detection@5%`` -> ``influence/detection_at_5pct``)."""
    name = name.replace("@", "_at_").replace("%", "pct")
    return re.sub(r"[^a-zA-Z0-9_/. -]+", "_", name)


def log_scalars(logger: Any, scalars: Dict[str, float], step: Optional[int] = None,
                rename: Optional[Callable[[str], str]] = None) -> None:
    """Send ``scalars`` through the logger's own ``log_metrics(metrics, step)``."""
    if rename is not None:
        scalars = {rename(k): v for k, v in scalars.items()}
    if scalars:
        logger.log_metrics(scalars, step)
