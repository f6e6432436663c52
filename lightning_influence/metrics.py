"""Evaluation metrics for mislabeled-data detection and relabeling.

Functional core, in the style of ``torchmetrics.functional``: every function takes
plain tensors and is vectorised (no Python loops over samples).

Conventions
-----------
* ``scores``: float tensor of shape ``(n,)``, one influence score per training
  sample. Higher score = more harmful = more likely mislabeled.
* ``noisy``: tensor of shape ``(n,)``, ``True`` (or ``1``) where the training label
  was corrupted. Accepts ``torch.bool`` or an integer dtype holding only 0/1.
* The *ranking* orders samples by descending score, ties broken by lower sample id
  first (see :func:`ranking`). Every top-k / top-x% quantity uses that ranking, so
  results are deterministic even with tied scores.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
)

__all__ = [
    "detection_metrics",
    "detection_curve",
    "check_noisy",
    "nan_last_ranking",
    "ranking",
    "ranking_values",
    "score_summary",
]


# --------------------------------------------------------------------------- helpers


def _check_scores(scores: Tensor, name: str = "scores") -> Tensor:
    """Validate a ``(n,)`` score tensor and return it as float64."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (n,), got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty")
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"{name} must be a real-valued tensor, got dtype {scores.dtype}")
    scores = scores.detach().to(torch.float64)
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) (NaN/inf) out of {scores.numel()}"
        )
    return scores


def check_k(k: object, name: str = "k") -> int:
    """The one rule for a count of top samples (``top_k``, precision/recall at ``k``,
    ``attribution.k``): a positive integer (not a bool, not a float), else ``ValueError``."""
    try:
        ok = not isinstance(k, bool) and operator.index(k) >= 1  # type: ignore[call-overload]
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return operator.index(k)  # type: ignore[call-overload]


def check_noisy(noisy, n: int | None = None, name: str = "noisy") -> Tensor | None:
    """The one ``noisy`` validator: ``noisy`` (a tensor or any sequence of flags) as a bool
    tensor ``(n,)``, or ``None`` for ``None``. ``n=None`` takes the length from ``noisy``
    (it must still be 1-D). Bool, or integers holding only 0 and 1; a clear error otherwise."""
    if noisy is None:
        return None
    flags = noisy.detach() if isinstance(noisy, Tensor) else torch.as_tensor(noisy)
    if n is None:
        if flags.dim() != 1:
            raise ValueError(f"{name} must be a 1-D sequence of flags, one per training sample, got shape "
                             f"{tuple(flags.shape)}")
        n = flags.shape[0]
    if flags.dim() != 1 or flags.shape[0] != n:
        raise ValueError(f"{name} must have one flag per training sample ({n}), got shape {tuple(flags.shape)}")
    if flags.dtype == torch.bool:
        return flags
    if flags.dtype.is_floating_point or flags.dtype.is_complex:
        raise ValueError(f"{name} must be booleans (or 0/1 integers), got dtype {flags.dtype}")
    if not bool(((flags == 0) | (flags == 1)).all()):
        raise ValueError(f"{name} must be booleans (or 0/1 integers): an integer tensor holds values "
                         "other than 0 and 1")
    return flags.bool()


def _check_labels(t: Tensor, name: str, n: int, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 1 or t.numel() != n:
        raise ValueError(
            f"{name} must have shape ({n},) to match scores, got shape {tuple(t.shape)}"
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer (long) tensor, got dtype {t.dtype}")
    return t.detach().to(device)


def _count_for_fraction(f: float, n: int) -> int:
    """``ceil(f * n)`` robust to float round-off (e.g. 0.1 * 30 = 3.0000000000000004)."""
    return min(max(math.ceil(round(f * n, 9)), 0), n)


def ranking_values(scores: Tensor) -> Tensor:
    """``scores`` as finite float64 values in ranking order: NaN (excluded samples) and
    ``-inf`` become a value below every finite score, ``+inf`` one above. Sorting them
    (:func:`nan_last_ranking`) gives ``AuditResult.ranking``; curves and colour maps read them."""
    s = scores.detach().to("cpu", torch.float64)
    ok = torch.isfinite(s)
    if bool(ok.all()):
        return s
    low, high = (float(s[ok].min()) - 1.0, float(s[ok].max()) + 1.0) if bool(ok.any()) else (0.0, 1.0)
    return torch.where(ok, s, torch.where(s == float("inf"), torch.full_like(s, high), torch.full_like(s, low)))


def _order(scores: Tensor) -> Tensor:
    # Stable ascending sort of -scores == descending by score, lower id first on ties.
    return torch.sort(-scores, stable=True).indices


def nan_last_ranking(scores: Tensor) -> Tensor:
    """The one ranking: sample ids, most harmful first; ties by lower id; NaN (excluded) last
    (tied with ``-inf``, by id). :func:`ranking` is this for scores it has checked are finite."""
    return _order(ranking_values(scores))


def _to_unit_interval(scores: Tensor) -> Tensor:
    """Strictly monotone, tie-preserving map of ``scores`` (n,) into [0, 1].

    torchmetrics' binary classification metrics treat any ``preds`` outside [0, 1]
    as logits and apply a sigmoid. For influence scores (often |s| >> 10) the sigmoid
    saturates to exactly 0.0 / 1.0 in floating point, turning many distinct scores
    into ties and silently lowering AUROC / AP. AUROC and AP depend only on the
    ordering of the scores (and on which of them are tied), so we replace each score
    by its dense rank (0 for the smallest distinct value, ``u - 1`` for the largest)
    divided by ``max(u - 1, 1)``. Equal scores keep equal values, distinct scores stay
    distinct (float64 is exact for these ratios), and everything lies in [0, 1], so
    torchmetrics never applies the sigmoid.
    """
    uniq, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    denom = max(uniq.numel() - 1, 1)
    return inverse.to(torch.float64) / denom


def _quantile(sorted_x: Tensor, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an ascending-sorted 1-D tensor.

    Done by hand because ``torch.quantile`` refuses inputs above 2**24 elements.
    """
    n = sorted_x.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * frac)


# --------------------------------------------------------------------------- public API


def ranking(scores: Tensor) -> Tensor:
    """Sample ids ordered most harmful first.

    Args:
        scores: ``(n,)`` real tensor of influence scores (higher = more harmful).

    Returns:
        ``(n,)`` ``torch.long`` tensor of sample ids sorted by descending score; ties
        are broken deterministically by lower sample id first (stable sort of
        ``-scores``).

    Raises:
        ValueError: if ``scores`` is not 1-D, is empty, or contains NaN/inf.
    """
    scores = _check_scores(scores)
    return _order(scores)


def detection_curve(
    scores: Tensor, noisy: Tensor, num_points: int = 101
) -> tuple[Tensor, Tensor]:
    """Detection curve: fraction of noisy samples found vs. fraction of data inspected.

    Samples are inspected in :func:`ranking` order. At inspected fraction ``x`` the
    top ``ceil(x * n)`` samples have been looked at.

    Args:
        scores: ``(n,)`` influence scores (higher = more harmful).
        noisy: ``(n,)`` bool / 0-1 integer flags of truly corrupted samples.
        num_points: number of evenly spaced points ``x`` in ``[0, 1]`` (>= 2).

    Returns:
        ``(x, y)``, both float64 tensors of shape ``(num_points,)``: ``x`` is the
        fraction of data inspected (``0 .. 1``), ``y`` the fraction of all noisy
        samples found within it (``y[0] == 0``, ``y[-1] == 1``). If there are no
        noisy samples, ``y`` is all NaN and a warning is emitted.
    """
    if int(num_points) < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    scores = _check_scores(scores)
    n = scores.numel()
    noisy = check_noisy(noisy, n).to(scores.device)

    x = torch.linspace(0.0, 1.0, int(num_points), dtype=torch.float64, device=scores.device)
    found = torch.zeros(n + 1, dtype=torch.float64, device=scores.device)
    found[1:] = torch.cumsum(noisy[_order(scores)].to(torch.float64), dim=0)
    # Number inspected at each x: ceil(x * n), guarded against float round-off.
    counts = torch.ceil(torch.round(x * n, decimals=9)).clamp_(0, n).long()
    total = found[-1]
    if total == 0:
        warnings.warn(
            "detection_curve: noisy has no positive (corrupted) samples; the fraction of "
            "noisy samples found is undefined, returning NaN",
            stacklevel=2,
        )
        return x, torch.full_like(x, float("nan"))
    return x, found[counts] / total


def detection_metrics(
    scores: Tensor,
    noisy: Tensor,
    k: int = 50,
    fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3),
    predicted: Tensor | None = None,
    clean_labels: Tensor | None = None,
) -> dict[str, float]:
    """Mislabeled-data detection (and optionally relabeling) metrics.

    Args:
        scores: ``(n,)`` influence scores, higher = more harmful. Must be finite.
        noisy: ``(n,)`` ``torch.bool`` or 0/1 integer flags, true where the training
            label was corrupted.
        k: size of the top-k list for ``precision@k`` / ``recall@k`` /
            ``relabel_accuracy@k``; clipped to ``n``.
        fractions: inspected fractions ``f`` in ``(0, 1]`` for ``detection@{100 f}%``.
        predicted: optional ``(n,)`` long tensor, the label the (tuned) model predicts
            for each training sample.
        clean_labels: optional ``(n,)`` long tensor of true clean labels. Must be given
            together with ``predicted``.

    Returns:
        dict of python floats:

        * ``"auroc"``, ``"ap"``: ROC AUC and average precision of ``scores`` as a
          detector of ``noisy`` (torchmetrics, identical to sklearn incl. ties). NaN
          with a warning if ``noisy`` is single-class.
        * ``"precision@k"``, ``"recall@k"``: among the top ``min(k, n)`` ranked samples.
        * ``"recall@noise_rate"``: recall in the top ``m`` with ``m`` = number of noisy
          samples (equals precision there).
        * ``"detection@5%"`` etc. (one per entry of ``fractions``): fraction of all
          noisy samples within the top ``ceil(f * n)`` of the ranking.
        * ``"noise_rate"``: fraction of samples that are noisy.
        * if ``predicted`` and ``clean_labels`` are given: ``"relabel_accuracy"``
          (among truly noisy samples, fraction with ``predicted == clean_labels``) and
          ``"relabel_accuracy@k"`` (same, restricted to the truly noisy samples in the
          top k). NaN when the respective set is empty.

        Recall-type metrics are NaN (with a warning) when there are no noisy samples.

    Raises:
        ValueError: on length mismatch, non-bool/non-0-1 ``noisy``, non-finite scores,
            ``k < 1``, fractions outside ``(0, 1]``, or only one of
            ``predicted`` / ``clean_labels``.
    """
    scores = _check_scores(scores)
    n = scores.numel()
    noisy = check_noisy(noisy, n).to(scores.device)
    k = min(check_k(k), n)
    fractions = tuple(float(f) for f in fractions)
    for f in fractions:
        if not (0.0 < f <= 1.0):
            raise ValueError(f"fractions must lie in (0, 1], got {f}")
    if (predicted is None) != (clean_labels is None):
        raise ValueError("predicted and clean_labels must be given together (or both None)")

    num_noisy = int(noisy.sum())
    nan = float("nan")
    out: dict[str, float] = {}

    # ---- threshold-free metrics (torchmetrics on rank-transformed scores)
    if num_noisy == 0 or num_noisy == n:
        which = "no positive (noisy)" if num_noisy == 0 else "no negative (clean)"
        warnings.warn(
            f"detection_metrics: noisy has {which} samples, so AUROC and average "
            "precision are undefined; returning NaN for 'auroc' and 'ap'",
            stacklevel=2,
        )
        out["auroc"] = nan
        out["ap"] = nan
    else:
        preds = _to_unit_interval(scores)  # see docstring: avoids torchmetrics' sigmoid
        target = noisy.long()
        out["auroc"] = float(binary_auroc(preds, target))
        out["ap"] = float(binary_average_precision(preds, target))

    # ---- ranking-based metrics
    order = _order(scores)
    hits = torch.zeros(n + 1, dtype=torch.long, device=scores.device)
    hits[1:] = torch.cumsum(noisy[order].long(), dim=0)  # hits[m] = noisy in top m

    if num_noisy == 0:
        warnings.warn(
            "detection_metrics: noisy has no positive samples; recall@k, "
            "recall@noise_rate and detection@x% are undefined, returning NaN",
            stacklevel=2,
        )
    out["precision@k"] = int(hits[k]) / k
    out["recall@k"] = int(hits[k]) / num_noisy if num_noisy else nan
    out["recall@noise_rate"] = int(hits[num_noisy]) / num_noisy if num_noisy else nan
    for f in fractions:
        key = f"detection@{round(f * 100, 6):g}%"
        m = _count_for_fraction(f, n)
        out[key] = int(hits[m]) / num_noisy if num_noisy else nan
    out["noise_rate"] = num_noisy / n

    # ---- relabeling
    if predicted is not None and clean_labels is not None:
        predicted = _check_labels(predicted, "predicted", n, scores.device)
        clean_labels = _check_labels(clean_labels, "clean_labels", n, scores.device)
        correct = predicted == clean_labels  # (n,)
        out["relabel_accuracy"] = (
            int((correct & noisy).sum()) / num_noisy if num_noisy else nan
        )
        in_top = torch.zeros(n, dtype=torch.bool, device=scores.device)
        in_top[order[:k]] = True
        noisy_top = noisy & in_top
        num_noisy_top = int(noisy_top.sum())
        out["relabel_accuracy@k"] = (
            int((correct & noisy_top).sum()) / num_noisy_top if num_noisy_top else nan
        )

    return out


def score_summary(scores: Tensor) -> dict[str, float]:
    """Summary statistics of a ``(n,)`` score tensor.

    Returns a dict of python floats with keys ``"score_mean"``, ``"score_std"``
    (unbiased, 0.0 for n == 1), ``"score_min"``, ``"score_max"``, ``"score_median"``,
    ``"score_q90"``, ``"score_q99"``; quantiles use linear interpolation (numpy's
    default), so the median of an even-length input is the mean of the middle two.

    Raises:
        ValueError: if ``scores`` is not 1-D, is empty, or contains NaN/inf.
    """
    scores = _check_scores(scores)
    s = torch.sort(scores).values
    n = s.numel()
    return {
        "score_mean": float(s.mean()),
        "score_std": float(s.std()) if n > 1 else 0.0,
        "score_min": float(s[0]),
        "score_max": float(s[-1]),
        "score_median": _quantile(s, 0.5),
        "score_q90": _quantile(s, 0.9),
        "score_q99": _quantile(s, 0.99),
    }
