"""Per-query tables and gallery rows of an :class:`~lightning_influence.attribution.Attribution`.

For each query (a validation or test sample the model got wrong, by default), its most helpful
training samples (supporters: they lower its loss) and most harmful ones (opposers), with their
scores, given labels and noisy flags, and readable text when a ``describe`` hook is known.
The adapters write them where users look: TensorBoard one markdown text per query
(``influence/attribution/query_<id>``), W&B one table (``influence/attribution``), MLflow a table
artifact (``influence/attribution.json``), the CSV logger ``influence_attribution.csv``; with
image data a gallery, one row per query: the query image, then its training images
(``influence/attribution_gallery``, ``influence_attribution_gallery.png``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..result import AuditResult
from ._common import warn
from .gallery import to_image
from .tables import format_cell

#: columns of the flat attribution table, in order
COLUMNS = ("query", "query_label", "query_predicted", "query_loss", "query_text", "side", "rank", "train_id",
           "score", "label", "noisy", "text")
#: columns of one query's markdown table
QUERY_TABLE = ("side", "rank", "train_id", "score", "label", "noisy", "text")
#: queries drawn in the gallery, and training images per side and query
GALLERY_QUERIES = 16
GALLERY_PER_SIDE = 5


def _safe(hook: Callable[[int], Any] | None, i: int, what: str, failed: list[bool]) -> Any:
    """``hook(i)``, or ``None`` (one warning per hook) when it raises."""
    if hook is None:
        return None
    try:
        return hook(int(i))
    except Exception as err:  # noqa: BLE001 - a user hook must not break reporting
        if not failed[0]:
            warn(f"lightning_influence: {what}({i}) raised {type(err).__name__}: {err}; the attribution report "
                 "leaves it out")
        failed[0] = True
        return None


def attribution_rows(result: AuditResult, describe: Callable[[int], str] | None = None,
                     describe_query: Callable[[int], str] | None = None) -> list[dict[str, Any]]:
    """The flat table: one row per (query, side, rank) with the query's id, label, prediction,
    loss and text, the training sample's id, score, given label, noisy flag and text."""
    attribution = result.attribution
    if attribution is None:
        return []
    labels = result.labels.tolist() if result.labels is not None else None
    noisy = result.noisy.tolist() if result.noisy is not None else None
    fail_q, fail_t = [False], [False]
    texts: dict[int, Any] = {}
    queries: dict[int, Any] = {}
    out = []
    for row in attribution.rows():
        q, i = row["query"], row["train_id"]
        if describe_query is not None and q not in queries:
            queries[q] = _safe(describe_query, q, "describe_query", fail_q)
        if describe is not None and i >= 0 and i not in texts:
            texts[i] = _safe(describe, i, "describe", fail_t)
        if queries.get(q) is not None:
            row["query_text"] = str(queries[q])
        if i >= 0:
            if labels is not None and labels[i] >= 0:
                row["label"] = labels[i]
            if noisy is not None:
                row["noisy"] = bool(noisy[i])
            if texts.get(i) is not None:
                row["text"] = str(texts[i])
        out.append({c: row[c] for c in COLUMNS if c in row})
    return out


def columns_of(rows: Sequence[dict[str, Any]], order: Sequence[str] = COLUMNS) -> list[str]:
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    return [c for c in order if c in present]


def by_query(rows: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The flat rows grouped by query id, in order."""
    out: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(int(row["query"]), []).append(row)
    return out


def query_heading(row: dict[str, Any]) -> str:
    """``query 12: given 3, predicted 5, loss 2.31 — "text"`` from a query's first row."""
    parts = []
    if "query_label" in row:
        parts.append(f"given {row['query_label']}")
    if "query_predicted" in row:
        parts.append(f"predicted {row['query_predicted']}")
    if "query_loss" in row:
        parts.append(f"loss {format_cell(float(row['query_loss']))}")
    text = f"query {row['query']}" + (": " + ", ".join(parts) if parts else "")
    if row.get("query_text"):
        text += f' — "{format_cell(row["query_text"])}"'
    return text


def query_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One query's markdown: its heading, then a table of its supporters and opposers."""
    cols = columns_of(rows, QUERY_TABLE)
    esc = lambda s: s.replace("\\", "\\\\").replace("|", "\\|")  # noqa: E731
    lines = [f"**{esc(query_heading(rows[0]))}**", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(format_cell(r.get(c))) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def attribution_text(result: AuditResult, rows: Sequence[dict[str, Any]], queries: int = 5, top: int = 3,
                     width: int = 60) -> list[str]:
    """Plain-text lines for the summary: the first ``queries`` queries, ``top`` per side."""
    a = result.attribution
    if a is None or not rows:
        return []
    lines = ["", f"Training samples behind {len(a)} {a.source} prediction(s) ({a.rule}); "
             "helpful lowers the query's loss, harmful raises it:"]
    for q, qrows in list(by_query(rows).items())[:queries]:
        lines.append("  " + query_heading(qrows[0]))
        for side in ("helpful", "harmful"):
            picked = [r for r in qrows if r["side"] == side][:top]
            cells = []
            for r in picked:
                cell = f"{r['train_id']} ({format_cell(float(r['score']))}"
                if "label" in r:
                    cell += f", label {r['label']}"
                if r.get("noisy"):
                    cell += ", NOISY"
                cell += ")"
                if r.get("text"):
                    cell += f' "{format_cell(r["text"], width)}"'
                cells.append(cell)
            lines.append(f"    {side:8s} " + "; ".join(cells))
    if len(a) > queries:
        lines.append(f"  ... {len(a) - queries} more queries in the attribution file")
    return lines


# ------------------------------------------------------------------ the gallery


@dataclass
class AttributionGallery:
    """One row per query: the query's image, then its most helpful and most harmful training
    images (``None`` where a picture could not be drawn), each with a caption."""

    images: list[list[Tensor | None]]
    captions: list[list[str]]
    noisy: list[list[bool]]

    def __len__(self) -> int:
        return len(self.images)

    def figure(self):
        """A matplotlib ``Figure`` (Agg canvas, outside pyplot): a row per query; known-noisy
        training samples in red."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows, cols = len(self.images), max(len(r) for r in self.images)
        fig = Figure(figsize=(1.5 * cols + 0.2, 1.9 * rows + 0.6), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        for r, (images, captions, flags) in enumerate(zip(self.images, self.captions, self.noisy)):
            for c, (image, text, flag) in enumerate(zip(images, captions, flags)):
                ax = fig.add_subplot(rows, cols, r * cols + c + 1)
                ax.set_xticks([])
                ax.set_yticks([])
                if image is not None:
                    ax.imshow(image.numpy(), interpolation="nearest", vmin=0.0, vmax=1.0)
                color = "#c0392b" if flag else ("#1f4e79" if c == 0 else "black")
                ax.set_title(text, fontsize=7, color=color, linespacing=1.1)
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(2 if flag or c == 0 else 0.8)
        fig.suptitle("Each row: a query (blue), then its most helpful (+) and most harmful (−) training samples"
                     "; red: known noisy", fontsize=9)
        return fig


def _caption(row: dict[str, Any]) -> str:
    sign = "+" if row["side"] == "helpful" else "−"
    lines = [f"{sign}{row['rank']}  id {row['train_id']}"]
    if "label" in row:
        lines.append(f"label {row['label']}")
    lines.append("score " + ("nan" if not math.isfinite(float(row["score"])) else f"{float(row['score']):.3g}"))
    return "\n".join(lines)


def _query_caption(row: dict[str, Any]) -> str:
    lines = [f"query {row['query']}"]
    if "query_label" in row:
        lines.append(f"given {row['query_label']}"
                     + (f" → {row['query_predicted']}" if "query_predicted" in row else ""))
    if "query_loss" in row:
        lines.append(f"loss {float(row['query_loss']):.3g}")
    return "\n".join(lines)


def build_attribution_gallery(rows: Sequence[dict[str, Any]], render: Callable[[int], Any] | None,
                              render_query: Callable[[int], Any] | None, queries: int = GALLERY_QUERIES,
                              per_side: int = GALLERY_PER_SIDE) -> AttributionGallery | None:
    """The gallery of the first ``queries`` queries (``per_side`` training images each side),
    or ``None`` when nothing could be drawn."""
    if render is None and render_query is None:
        return None
    fail_q, fail_t = [False], [False]

    def draw(hook: Callable[[int], Any] | None, i: int, what: str, failed: list[bool]) -> Tensor | None:
        picture = _safe(hook, i, what, failed) if i >= 0 else None
        if picture is None:
            return None
        try:
            return to_image(picture)
        except Exception as err:  # noqa: BLE001 - not an image: a blank cell
            if not failed[0]:
                warn(f"lightning_influence: {what}({i}) is not an image ({err}); the gallery leaves it out")
            failed[0] = True
            return None

    images, captions, noisy = [], [], []
    for q, qrows in list(by_query(rows).items())[:queries]:
        picked = ([r for r in qrows if r["side"] == "helpful"][:per_side]
                  + [r for r in qrows if r["side"] == "harmful"][:per_side])
        images.append([draw(render_query, q, "render_query", fail_q)]
                      + [draw(render, int(r["train_id"]), "render", fail_t) for r in picked])
        captions.append([_query_caption(qrows[0])] + [_caption(r) for r in picked])
        noisy.append([False] + [bool(r.get("noisy")) for r in picked])
    if not any(i is not None for row in images for i in row):
        return None
    return AttributionGallery(images, captions, noisy)


__all__ = ["AttributionGallery", "attribution_rows", "attribution_text", "build_attribution_gallery", "by_query",
           "query_heading", "query_markdown", "COLUMNS"]
