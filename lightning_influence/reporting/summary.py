"""The one-screen plain-text summary and the full per-sample scores file."""
from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from ..result import AuditResult
from .attribution import attribution_rows, attribution_text
from .tables import format_cell, text_table, top_k_rows


def summary_text(result: AuditResult, top: int = 10, describe: Callable[[int], str] | None = None,
                 describe_query: Callable[[int], str] | None = None) -> str:
    """A one-screen plain-text summary of ``result``: method and solver, number of samples
    (and excluded ones), wall time per stage, the ``top`` most harmful samples, the metrics, and
    with an attribution the training samples behind the first few queries."""
    n = len(result)
    head = f"Influence audit: method={result.method or '?'}, solver={result.solver or '?'}, {n} training samples"
    if result.audited is not None:  # the loader's sampler selected a subset: the others score NaN
        head += f" ({int(result.audited.numel())} audited, the ones the loader's sampler selects)"
    if result.excluded:
        head += f" ({len(result.excluded)} excluded: non-finite loss or gradient)"
    if result.noisy is not None:
        head += f", {int(torch.as_tensor(result.noisy).sum())} {'of them ' if result.audited is not None else ''}" \
                "flagged noisy"
    lines = [head]
    if result.stage_seconds:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.stage_seconds.items())
        lines.append(f"Time per stage: {stages} (total {sum(result.stage_seconds.values()):.2f}s)")
    lines += tuning_lines(result)
    k = min(int(top), n)
    lines += ["", f"Top {k} most harmful samples (ranked by {RANKING_NAMES.get(result.rank_by, result.rank_by)}):",
              text_table(top_k_rows(result, k, describe))]
    lines += ranking_table(result)
    if result.metrics:
        lines += ["", "Metrics:"]
        items = [f"{name}={format_cell(float(v))}" for name, v in result.metrics.items()
                 if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))]
        for i in range(0, len(items), 4):
            lines.append("  " + "  ".join(items[i:i + 4]))
    if getattr(result, "attribution", None) is not None:
        lines += attribution_text(result, attribution_rows(result, describe, describe_query))
    return "\n".join(lines)


#: plain names of the rankings
RANKING_NAMES = {"influence": "the influence score", "loss_tuned": "the loss at θ̃ (validation-tuned)",
                 "loss_trained": "the loss at θ* (trained)"}
#: the detection metrics shown side by side for every ranking
SIDE_BY_SIDE = ("auroc", "ap", "recall@noise_rate", "precision@k")


def tuning_lines(result: AuditResult) -> list[str]:
    """vm/fvm: where the validation tuning went (full validation set at θ* and θ̃), its
    flatness, whether θ̃ is a validation minimum, and its cost beside one training epoch."""
    t = result.tuning or {}
    if "val_loss_tuned" not in t or not t.get("steps"):
        return []
    f = lambda v: format_cell(float(v))  # noqa: E731
    parts = [f"{t.get('epochs', float('nan')):.2g} passes over the validation set ({int(t['steps'])} steps, "
             f"lr {t.get('lr', float('nan')):.3g})",
             f"full validation set: loss {f(t.get('val_loss_trained', float('nan')))} -> {f(t['val_loss_tuned'])}"]
    if t.get("retries"):  # the probed step raised the loss: restarted from θ* at a smaller one
        first = t.get("val_loss_tuned_attempt_0", float("nan"))
        parts[0] += (f", retried {int(t['retries'])}x from θ* after the probed lr "
                     f"{t.get('lr_attempt_0', float('nan')):.3g} raised the loss to {f(first)}")
    if math.isfinite(t.get("val_acc_tuned", float("nan"))):
        parts.append(f"accuracy {f(t.get('val_acc_trained', float('nan')))} -> {f(t['val_acc_tuned'])}")
    if math.isfinite(t.get("sharpness", float("nan"))):
        parts.append(f"sharpness (SAM loss gap) {f(t['sharpness'])}")
    if math.isfinite(t.get("grad_noise_ratio", float("nan"))):
        z = t.get("grad_z", float("nan"))
        parts.append(f"gradient {t['grad_noise_ratio']:.2g}× its sampling noise" + (f" (z {z:.1f})" if z == z else ""))
    seconds = result.stage_seconds.get("tuning")
    if seconds is not None:
        cost = f"{seconds:.1f}s"
        if math.isfinite(t.get("epochs_of_training", float("nan"))):
            cost += f" = {t['epochs_of_training']:.2f} training epochs"
        parts.append(cost)
    verdict = "at a validation minimum" if t.get("at_minimum") == 1.0 else "NOT at a validation minimum"
    return [f"Validation tuning: {', '.join(parts)}: {verdict}"]


def ranking_table(result: AuditResult) -> list[str]:
    """The detection metrics of every ranking side by side (with ``noisy`` flags), the one
    ``result.ranking`` follows first."""
    by = getattr(result, "metrics_by", None) or {}
    if not by:
        return []
    order = [result.rank_by] + [r for r in ("loss_tuned", "influence", "loss_trained") if r != result.rank_by]
    rows = []
    for name in order:
        if name not in by:
            continue
        label = f"{name} ({result.method})" if name == "influence" else name
        if name == result.rank_by:
            label += " <- ranking"
        rows.append({"ranking": label, **{m: by[name].get(m, float("nan")) for m in SIDE_BY_SIDE}})
    cols = ["ranking", *SIDE_BY_SIDE]
    cells = [[r["ranking"]] + [format_cell(float(r[m])) for m in SIDE_BY_SIDE] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                                  for i, (v, w) in enumerate(zip(vals, widths))).rstrip()
    return ["", "Detection by ranking (against the noisy flags):", fmt(cols)] + [fmt(c) for c in cells]


def write_scores_file(result: AuditResult, directory: str, filename: str = "influence_scores.csv") -> str:
    """Write every sample's row (id, score, rank, losses, label, suggested label, noisy flag
    when known, score percentile), most harmful first, to ``directory/filename`` atomically via
    :meth:`AuditResult.save` (format by suffix). Returns the path."""
    return result.save(os.path.join(os.fspath(directory), filename))
