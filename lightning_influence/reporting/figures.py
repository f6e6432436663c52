"""Figures (matplotlib, Agg canvas, no pyplot state) and curve data."""
from __future__ import annotations

import math
from typing import Any

from ..metrics import detection_curve, ranking_values
from ..result import AuditResult


def _require_noisy(result: AuditResult) -> None:
    if result.noisy is None:
        raise ValueError("the detection curve needs ground-truth noisy flags; this AuditResult has noisy=None")


def detection_curve_rows(result: AuditResult, num_points: int = 101) -> list[dict[str, Any]]:
    """The detection curve as rows ``{"fraction_inspected", "fraction_noisy_found"}``:
    the fraction of noisy samples found when inspecting the ranking's top fraction.
    Excluded (NaN-score) samples count as inspected last. Needs ``result.noisy``."""
    _require_noisy(result)
    x, y = detection_curve(ranking_values(result.scores), result.noisy.bool(), num_points=num_points)
    return [{"fraction_inspected": float(a), "fraction_noisy_found": float(b)} for a, b in zip(x, y)]


def detection_curve_figure(result: AuditResult, num_points: int = 101):
    """A matplotlib ``Figure`` (on an Agg canvas, outside pyplot) of the detection curve,
    with the random-inspection and the ideal curves for reference. Raises ``ValueError``
    when ``result.noisy`` is unknown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = detection_curve_rows(result, num_points)
    x = [r["fraction_inspected"] for r in rows]
    y = [r["fraction_noisy_found"] for r in rows]
    rate = float(result.noisy.float().mean())
    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, y, label=f"{result.method or 'influence'} ranking", linewidth=2)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="random order")
    if rate > 0:
        ax.plot(x, [min(v / rate, 1.0) for v in x], ":", color="green", label="ideal")
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of noisy samples found")
    auroc = result.metrics.get("auroc")
    has_auroc = isinstance(auroc, float) and math.isfinite(auroc)
    ax.set_title("Mislabeled-data detection" + (f" (AUROC {auroc:.3f})" if has_auroc else ""))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
