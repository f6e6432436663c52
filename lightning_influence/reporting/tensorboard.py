"""TensorBoard adapter: ``logger.experiment`` is a ``SummaryWriter``."""
from __future__ import annotations

from typing import Any

from ..result import AuditResult
from ._common import rank_normalised
from .attribution import by_query, query_markdown
from .figures import detection_curve_figure
from .gallery import Gallery
from .tables import markdown_table


def write(logger: Any, result: AuditResult, rows: list[dict[str, Any]], step: int | None = None,
          gallery: Gallery | None = None) -> None:
    """Score histogram ``influence/scores``, markdown top-k table ``influence/top_k``, and, when
    ``result.noisy`` is known, the PR curve ``influence/pr_curve`` (rank-normalised scores as
    predictions) and the detection-curve figure ``influence/detection_curve``; with a
    ``gallery``, its figure as the image ``influence/gallery``."""
    writer = logger.experiment
    scores = result.scores.detach().cpu().double()
    finite = scores[scores.isfinite()]
    if finite.numel():
        writer.add_histogram("influence/scores", finite.numpy(), global_step=step)
    writer.add_text("influence/top_k", markdown_table(rows), global_step=step)
    if result.noisy is not None:
        labels = result.noisy.detach().cpu().bool().numpy()
        writer.add_pr_curve("influence/pr_curve", labels, rank_normalised(scores).numpy(), global_step=step)
        writer.add_figure("influence/detection_curve", detection_curve_figure(result), global_step=step, close=True)
    if gallery is not None:
        writer.add_figure("influence/gallery", gallery.figure(), global_step=step, close=True)
    writer.flush()


def write_attribution(logger: Any, result: AuditResult, rows: list[dict[str, Any]], step: int | None = None,
                      gallery: Any = None) -> None:
    """One markdown text per query, ``influence/attribution/query_<id>`` (its heading, then its
    supporters and opposers), and with a ``gallery`` the image ``influence/attribution_gallery``."""
    writer = logger.experiment
    for query, query_rows in by_query(rows).items():
        writer.add_text(f"influence/attribution/query_{query}", query_markdown(query_rows), global_step=step)
    if gallery is not None:
        writer.add_figure("influence/attribution_gallery", gallery.figure(), global_step=step, close=True)
    writer.flush()
