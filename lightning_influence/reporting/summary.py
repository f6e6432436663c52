"""The one-screen plain-text summary and the full per-sample scores file."""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

from ..result import AuditResult
from .tables import format_cell, text_table, top_k_rows


def summary_text(result: AuditResult, top: int = 10, describe: Optional[Callable[[int], str]] = None) -> str:
    """A one-screen plain-text summary of ``result``: method and solver, number of samples
    (and excluded ones), wall time per stage, the ``top`` most harmful samples and the metrics."""
    n = len(result)
    head = f"Influence audit: method={result.method or '?'}, solver={result.solver or '?'}, {n} training samples"
    if result.excluded:
        head += f" ({len(result.excluded)} excluded: non-finite loss or gradient)"
    if result.noisy is not None:
        head += f", {int(torch.as_tensor(result.noisy).sum())} flagged noisy"
    lines = [head]
    if result.stage_seconds:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.stage_seconds.items())
        lines.append(f"Time per stage: {stages} (total {sum(result.stage_seconds.values()):.2f}s)")
    k = min(int(top), n)
    lines += ["", f"Top {k} most harmful samples:", text_table(top_k_rows(result, k, describe))]
    if result.metrics:
        lines += ["", "Metrics:"]
        items = [f"{name}={format_cell(float(v))}" for name, v in result.metrics.items()
                 if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))]
        for i in range(0, len(items), 4):
            lines.append("  " + "  ".join(items[i:i + 4]))
    return "\n".join(lines)


def write_scores_file(result: AuditResult, directory: str, filename: str = "influence_scores.csv") -> str:
    """Write every sample's row (id, score, rank, losses, label, suggested label, noisy flag
    when known, score percentile), most harmful first, to ``directory/filename`` atomically via
    :meth:`AuditResult.save` (format by suffix). Returns the path."""
    return result.save(os.path.join(os.fspath(directory), filename))
