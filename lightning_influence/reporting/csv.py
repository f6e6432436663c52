"""CSV-logger adapter: files in ``logger.log_dir``."""
from __future__ import annotations

import os
from typing import Any

from .._io import atomic_open
from ..result import AuditResult
from ._common import write_csv
from .attribution import columns_of as attribution_columns
from .figures import detection_curve_rows
from .gallery import Gallery
from .tables import columns_of

TOP_K_FILE = "influence_top_k.csv"
CURVE_FILE = "influence_detection_curve.csv"
GALLERY_FILE = "influence_gallery.png"


def write(logger: Any, result: AuditResult, rows: list[dict[str, Any]], step: int | None = None,
          gallery: Gallery | None = None) -> None:
    """Write ``influence_top_k.csv``, when ``result.noisy`` is known
    ``influence_detection_curve.csv``, and with a ``gallery`` its picture
    ``influence_gallery.png`` into the logger's ``log_dir`` (atomically)."""
    folder = os.fspath(logger.log_dir)
    write_csv(os.path.join(folder, TOP_K_FILE), rows, columns_of(rows))
    if result.noisy is not None:
        write_csv(os.path.join(folder, CURVE_FILE), detection_curve_rows(result),
                  ["fraction_inspected", "fraction_noisy_found"])
    if gallery is not None:
        save_figure(gallery.figure(), os.path.join(folder, GALLERY_FILE))


def save_figure(figure: Any, path: str) -> str:
    """Save a matplotlib ``figure`` as PNG to ``path`` atomically. Returns ``path``."""
    with atomic_open(path, binary=True, what="the figure") as handle:
        figure.savefig(handle, format="png")
    return path


ATTRIBUTION_FILE = "influence_attribution.csv"
ATTRIBUTION_GALLERY_FILE = "influence_attribution_gallery.png"


def write_attribution(logger: Any, result: AuditResult, rows: list[dict[str, Any]], step: int | None = None,
                      gallery: Any = None) -> None:
    """``influence_attribution.csv`` (one row per query, side and rank) and with a ``gallery``
    ``influence_attribution_gallery.png`` in the logger's ``log_dir``."""
    folder = os.fspath(logger.log_dir)
    write_csv(os.path.join(folder, ATTRIBUTION_FILE), rows, attribution_columns(rows))
    if gallery is not None:
        save_figure(gallery.figure(), os.path.join(folder, ATTRIBUTION_GALLERY_FILE))
