"""CSV-logger adapter: files in ``logger.log_dir``."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from ..result import AuditResult
from ._common import write_csv
from .figures import detection_curve_rows
from .tables import columns_of

TOP_K_FILE = "influence_top_k.csv"
CURVE_FILE = "influence_detection_curve.csv"


def write(logger: Any, result: AuditResult, rows: List[Dict[str, Any]], step: Optional[int] = None) -> None:
    """Write ``influence_top_k.csv`` and, when ``result.noisy`` is known,
    ``influence_detection_curve.csv`` into the logger's ``log_dir`` (atomically)."""
    folder = os.fspath(logger.log_dir)
    write_csv(os.path.join(folder, TOP_K_FILE), rows, columns_of(rows))
    if result.noisy is not None:
        write_csv(os.path.join(folder, CURVE_FILE), detection_curve_rows(result),
                  ["fraction_inspected", "fraction_noisy_found"])
