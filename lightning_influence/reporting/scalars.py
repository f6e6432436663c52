"""Scalars for every logger: ``influence/<metric>``, ``influence/time/<stage>``."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from ..metrics import score_summary
from ..result import AuditResult

PREFIX = "influence/"
#: validation-tuning statistics (``result.tuning`` key -> scalar name after ``influence/``)
TUNING_SCALARS = {"val_loss_trained": "val_loss_trained", "val_loss_tuned": "val_loss_tuned",
                  "val_acc_trained": "val_acc_trained", "val_acc_tuned": "val_acc_tuned",
                  "sharpness": "sharpness", "grad_ratio": "tuning/grad_ratio",
                  "grad_noise_ratio": "tuning/grad_noise_ratio", "grad_z": "tuning/grad_z", "epochs": "tuning/epochs",
                  "lr": "tuning/lr", "at_minimum": "tuning/at_minimum", "retries": "tuning/retries",
                  "epochs_of_training": "tuning/cost_in_training_epochs"}


def scalar_metrics(result: AuditResult) -> dict[str, float]:
    """The scalars to log: every finite entry of ``result.metrics`` (plus the score summary
    statistics if absent) as ``influence/<name>``, each stage time as
    ``influence/time/<stage>``, every ranking's detection metrics as
    ``influence/by_<ranking>/<name>`` (``by_influence``, ``by_loss_tuned``, ``by_loss_trained``),
    and the validation tuning's figures (``influence/val_loss_trained``, ``val_loss_tuned``,
    ``val_acc_*``, ``sharpness``, ``tuning/*``). NaN/inf and non-numeric values are left out."""
    metrics: dict[str, Any] = dict(result.metrics)
    finite = result.scores[result.scores.isfinite()]
    if finite.numel():
        for key, value in score_summary(finite).items():
            metrics.setdefault(key, value)
    out = {f"{PREFIX}{k}": v for k, v in metrics.items()}
    out.update({f"{PREFIX}time/{k}": v for k, v in result.stage_seconds.items()})
    for ranking, values in getattr(result, "metrics_by", {}).items():  # every ranking's metrics, side by side
        out.update({f"{PREFIX}by_{ranking}/{k}": v for k, v in values.items()})
    tuning = getattr(result, "tuning", {}) or {}
    out.update({f"{PREFIX}{name}": tuning[key] for key, name in TUNING_SCALARS.items() if key in tuning})
    clean: dict[str, float] = {}
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


def log_scalars(logger: Any, scalars: dict[str, float], step: int | None = None,
                rename: Callable[[str], str] | None = None) -> None:
    """Send ``scalars`` through the logger's own ``log_metrics(metrics, step)``."""
    if rename is not None:
        scalars = {rename(k): v for k, v in scalars.items()}
    if scalars:
        logger.log_metrics(scalars, step)
