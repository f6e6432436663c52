"""MLflow adapter: ``logger.experiment`` is an ``MlflowClient``, ``logger.run_id`` the run."""
from __future__ import annotations

import tempfile
from typing import Any

from ..result import AuditResult
from .attribution import columns_of as attribution_columns
from .figures import detection_curve_figure
from .gallery import Gallery
from .summary import write_scores_file
from .tables import columns_of

ARTIFACT_DIR = "influence"


def write(logger: Any, result: AuditResult, rows: list[dict[str, Any]], step: int | None = None,
          gallery: Gallery | None = None) -> None:
    """Log the table ``influence/top_k.json`` (``log_table``), the full scores file
    ``influence/influence_scores.csv`` (``log_artifact``), when ``result.noisy`` is known the
    figure ``influence/detection_curve.png``, and with a ``gallery`` its picture
    ``influence/gallery.png`` (``log_figure``)."""
    client, run_id = logger.experiment, logger.run_id
    cols = columns_of(rows)
    client.log_table(run_id, data={c: [r.get(c) for r in rows] for c in cols},
                     artifact_file=f"{ARTIFACT_DIR}/top_k.json")
    with tempfile.TemporaryDirectory(prefix="influence-") as folder:
        client.log_artifact(run_id, write_scores_file(result, folder), ARTIFACT_DIR)
    if result.noisy is not None:
        client.log_figure(run_id, detection_curve_figure(result), f"{ARTIFACT_DIR}/detection_curve.png")
    if gallery is not None:
        client.log_figure(run_id, gallery.figure(), f"{ARTIFACT_DIR}/gallery.png")


def write_attribution(logger: Any, result: AuditResult, rows: list[dict[str, Any]], step: int | None = None,
                      gallery: Any = None) -> None:
    """The table ``influence/attribution.json`` (``log_table``) and with a ``gallery`` its
    picture ``influence/attribution_gallery.png``."""
    client, run_id = logger.experiment, logger.run_id
    cols = attribution_columns(rows)
    client.log_table(run_id, data={c: [r.get(c) for r in rows] for c in cols},
                     artifact_file=f"{ARTIFACT_DIR}/attribution.json")
    if gallery is not None:
        client.log_figure(run_id, gallery.figure(), f"{ARTIFACT_DIR}/attribution_gallery.png")
