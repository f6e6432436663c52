"""``AuditResult``: every training sample's score, the ranking, the metrics, and ``save()``."""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_open


@dataclass
class AuditResult:
    """The outcome of an audit.

    Attributes:
        scores: ``(n,)`` float64, one per training sample (sample id = dataset position);
            higher = more harmful, by the ranking ``rank_by`` names (the loss at θ̃ by default
            for vm/fvm; see ``audit(rank_by=)``). Samples excluded for non-finite gradients
            score NaN.
        ranking: ``(n,)`` long, sample ids, most harmful first (excluded samples last; when a
            sampler selected a subset, only its ``k`` samples).
        metrics: detection metrics of ``scores`` when ``noisy`` was given (``auroc``, ``ap``, ...).
        rank_by: what ``scores``/``ranking`` rank by: ``"influence"``, ``"loss_tuned"`` or
            ``"loss_trained"``.
        influence: ``(n,)`` the method's influence score (higher = more harmful), whatever
            ``rank_by`` is.
        metrics_by: with ``noisy``, the detection metrics of every ranking, side by side:
            ``{"influence": {...}, "loss_tuned": {...}, "loss_trained": {...}}``.
        method, solver: what produced the scores.
        loss_trained: ``(n,)`` each sample's training loss at the trained weights θ*: for vm/fvm
            only when ``noisy`` flags or ``rank_by="loss_trained"`` ask for it (a forward pass over
            the training set), else ``None``; always for ``standard``.
        loss_tuned: ``(n,)`` the loss at the validation-tuned weights θ̃ (``vm``/``fvm``).
        labels: ``(n,)`` the given class labels (classification), else ``None``.
        predicted: ``(n,)`` the tuned model's predicted label, a relabel suggestion.
        noisy: ``(n,)`` bool ground-truth flags, when given.
        per_validation: ``(m, n)`` per-validation-point scores, when asked for.
        attribution: with ``audit(attribution=...)``, an
            :class:`~lightning_influence.attribution.Attribution`: per query (by default the
            validation samples the trained model gets wrong), its ``k`` most helpful and most
            harmful training samples with their scores. ``save()`` writes it beside the scores
            file (``<stem>_attribution.csv``).
        excluded: ids of samples left out (non-finite loss or gradient).
        stage_seconds: wall time of each pipeline stage.
        solver_info: the solver's report (iterations, residuals per block).
        tuning: validation-tuning statistics.
        config: the options the audit ran with.
        audited: ``(k,)`` the dataset positions that were scored when the loader's sampler
            selected a subset (the others score NaN and are not in ``ranking``); ``None``: all.
        preflight: the :class:`~lightning_influence.preflight.PreflightReport` of the check
            that ran before the audit (``None`` with ``preflight=False``).
    """

    scores: Tensor
    ranking: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    method: str = ""
    solver: str = ""
    loss_trained: Tensor | None = None
    loss_tuned: Tensor | None = None
    labels: Tensor | None = None
    predicted: Tensor | None = None
    noisy: Tensor | None = None
    per_validation: Tensor | None = None
    excluded: list[int] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    solver_info: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    audited: Tensor | None = None
    preflight: Any | None = None
    rank_by: str = "influence"
    influence: Tensor | None = None
    metrics_by: dict[str, dict[str, float]] = field(default_factory=dict)
    attribution: Any | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def rank(self) -> Tensor:
        """``(n,)`` each sample's rank, 1 = most harmful (0 for samples that were not audited)."""
        rank = torch.zeros(len(self), dtype=torch.long)
        rank[self.ranking] = torch.arange(1, self.ranking.numel() + 1)
        return rank

    @property
    def percentile(self) -> Tensor:
        """``(n,)`` float64, each sample's score percentile in ``(0, 100]``: the share of scored
        samples whose score is at most this one's (the most harmful sample is at 100, ties share
        a value). Scale-free, unlike the raw score, whose size depends on the curvature and the
        damping. Excluded (NaN-score) samples get NaN."""
        scores = self.scores.detach().to("cpu", torch.float64)
        out = torch.full_like(scores, float("nan"))
        ok = torch.isfinite(scores)
        if bool(ok.any()):
            ordered = torch.sort(scores[ok]).values
            out[ok] = 100.0 * torch.searchsorted(ordered, scores[ok], right=True).double() / ordered.numel()
        return out

    COLUMNS = ("id", "score", "rank", "influence", "loss_trained", "loss_tuned", "label", "suggested_label", "noisy",
               "percentile")

    def rows(self, ids: Tensor | None = None) -> list[dict[str, Any]]:
        """One dict per sample (all, or ``ids`` in that order) with the columns of ``COLUMNS``
        that this result has."""
        ids = self.ranking if ids is None else ids
        rank = self.rank
        columns = {
            "score": self.scores, "rank": rank, "loss_trained": self.loss_trained,
            "loss_tuned": self.loss_tuned, "label": self.labels, "suggested_label": self.predicted,
            "noisy": self.noisy, "percentile": self.percentile,
            "influence": self.influence if self.rank_by != "influence" else None,  # else it is "score"
        }
        present = {k: v.tolist() for k, v in columns.items() if v is not None}
        out = []
        for i in ids.tolist():
            row: dict[str, Any] = {"id": i}
            for key, values in present.items():
                row[key] = values[i]
            out.append(row)
        return out

    def top(self, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` most harmful samples as rows."""
        return self.rows(self.ranking[:k])

    def save(self, path: str) -> str:
        """Write every sample's id, score and rank (plus losses, labels, suggested labels and
        noisy flags when known, and the score percentile), most harmful first. The format follows the suffix:
        ``.csv`` (default), ``.json`` (rows + metrics), ``.pt`` (this object's tensors).
        The file is written atomically: a temporary file in the same folder, then a rename,
        so an interruption never leaves a truncated file under ``path``. With :attr:`attribution`,
        its table goes beside (``<stem>_attribution.csv``; inside the ``.pt`` file too). Returns ``path``."""
        path = os.fspath(path)
        suffix = os.path.splitext(path)[1].lower()
        with atomic_open(path, binary=suffix == ".pt", what="the audit result") as handle:
            if suffix == ".pt":
                torch.save(self.to_dict(), handle)
            elif suffix == ".json":
                json.dump({"method": self.method, "solver": self.solver, "metrics": _jsonable(self.metrics),
                           "excluded": self.excluded, "stage_seconds": self.stage_seconds,
                           "rows": _jsonable(self.rows())}, handle, indent=1)
            else:
                rows = self.rows()
                writer = csv.DictWriter(handle, fieldnames=[c for c in self.COLUMNS if c in rows[0]]
                                        if rows else ["id", "score", "rank"])
                writer.writeheader()
                writer.writerows(rows)
        if self.attribution is not None:
            from .attribution import attribution_path

            self.attribution.save(attribution_path(path))
        return path

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the result (tensors kept), e.g. for ``torch.save`` or broadcasting."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AuditResult":
        return cls(**data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def on_dataset_positions(result: AuditResult, ids: Tensor, n: int, val_ids: Tensor | None = None) -> AuditResult:
    """A result computed on the ``ids`` ``(k,)`` subset of a dataset of ``n`` samples, indexed
    by dataset position: per-sample tensors become ``(n,)`` (NaN, or -1 for labels, where not
    audited), ``ranking`` and ``excluded`` hold dataset positions, ``audited`` the ids."""
    def spread(values: Tensor | None, fill: float) -> Tensor | None:
        if values is None:
            return None
        out = torch.full((n, *values.shape[1:]), fill, dtype=values.dtype)
        out[ids] = values
        return out

    result.scores = spread(result.scores, float("nan"))
    result.ranking = ids[result.ranking]
    for name in ("loss_trained", "loss_tuned", "influence"):
        setattr(result, name, spread(getattr(result, name), float("nan")))
    for name in ("labels", "predicted"):
        setattr(result, name, spread(getattr(result, name), -1))
    if result.noisy is not None:
        result.noisy = spread(result.noisy, False)
    if result.per_validation is not None:
        result.per_validation = spread(result.per_validation.T.contiguous(), float("nan")).T
    if result.attribution is not None:  # training ids, and validation ids when those were a subset too
        a = result.attribution
        for name in ("helpful_ids", "harmful_ids"):
            values = getattr(a, name)
            setattr(a, name, torch.where(values >= 0, ids[values.clamp(min=0)], values))
        if val_ids is not None and a.source == "validation":
            a.query_ids = val_ids[a.query_ids]
    result.excluded = [int(ids[i]) for i in result.excluded]
    result.audited = ids
    result.config = {**result.config, "audited_samples": int(ids.numel()), "dataset_samples": n,
                     "validation_ids": None if val_ids is None else val_ids.tolist()}
    return result
