"""The top-k table of the most harmful samples, as rows, markdown and plain text."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ..result import AuditResult
from ._common import warn

#: column order of every top-k table (``percentile``, the scale-free score, beside the raw one)
COLUMNS = ("rank", "id", "score", "percentile", "loss_trained", "loss_tuned", "label", "suggested_label", "noisy",
           "text")
MAX_TEXT = 120


def top_k_rows(result: AuditResult, k: int, describe: Callable[[int], str] | None = None) -> list[dict[str, Any]]:
    """Rows of the ``k`` most harmful samples, most harmful first.

    Each row has ``rank``, ``id``, ``score``, ``percentile`` and those of ``loss_trained``, ``loss_tuned``,
    ``label``, ``suggested_label``, ``noisy`` the result holds, plus ``text`` =
    ``describe(id)`` when ``describe`` is given (empty when it raises, with one warning).
    """
    rows = result.top(max(int(k), 0))
    out: list[dict[str, Any]] = []
    failed = False
    for row in rows:
        ordered = {c: row[c] for c in COLUMNS if c in row}
        if describe is not None:
            try:
                ordered["text"] = str(describe(int(row["id"])))
            except Exception as err:  # a user callback must not break reporting
                ordered["text"] = ""
                if not failed:
                    warn(f"lightning_influence: describe({row['id']}) raised {type(err).__name__}: {err}; "
                         "the top-k table has no text for such samples")
                failed = True
        out.append(ordered)
    return out


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table columns present in ``rows``, in :data:`COLUMNS` order."""
    present = set().union(*(r.keys() for r in rows)) if rows else {"rank", "id", "score"}
    return [c for c in COLUMNS if c in present]


def format_cell(value: Any, width: int = MAX_TEXT) -> str:
    """A short display string: floats to 4 significant digits, text shortened to ``width``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (as from :func:`top_k_rows`)."""
    cols = columns_of(rows)
    esc = lambda s: s.replace("\\", "\\\\").replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(format_cell(r.get(c))) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[dict[str, Any]], text_width: int = 48) -> str:
    """A fixed-width plain-text table of ``rows`` for terminals and log files."""
    cols = columns_of(rows)
    cells = [[format_cell(r.get(c), text_width) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) if c == "text" else v.rjust(w)  # noqa: E731
                                  for v, w, c in zip(vals, widths, cols)).rstrip()
    return "\n".join([fmt(cols)] + [fmt(row) for row in cells])
