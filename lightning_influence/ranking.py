"""From per-sample values to what the result ranks by: the rankings side by side (the influence
score, the loss at θ* and at θ̃), the one ``rank_by`` chooses, and the detection metrics of each
when the noisy samples are known."""
from __future__ import annotations

from torch import Tensor

from .metrics import detection_metrics, nan_last_ranking, score_summary


def rankings_of(influence: Tensor, loss_trained: Tensor | None, loss_tuned: Tensor | None,
                valid: Tensor) -> dict[str, Tensor]:
    """``{"influence", "loss_trained", "loss_tuned"}`` (those given), each ``(n,)`` with the
    samples not ``valid`` set to NaN, so that they rank last whatever the ranking. ``influence``
    is kept as given (the caller has set its excluded samples already); the losses are copies."""
    rankings = {"influence": influence}
    if loss_trained is not None:
        rankings["loss_trained"] = loss_trained.clone()
    if loss_tuned is not None:
        rankings["loss_tuned"] = loss_tuned.clone()
    for values in rankings.values():
        values[~valid] = float("nan")  # excluded samples rank last whatever the ranking
    return rankings


def ranking_metrics(rankings: dict[str, Tensor], chosen: str, valid: Tensor, noisy: Tensor | None,
                    predicted: Tensor | None, clean: Tensor | None, top_k: int,
                    ) -> tuple[Tensor, dict[str, float], dict[str, dict[str, float]]]:
    """The order of ``rankings[chosen]`` ``(n,)`` (most harmful first, NaN last), its summary
    (plus its detection metrics with ``noisy``), and with ``noisy`` ``(n,)`` the detection
    metrics of every ranking over the ``valid`` samples (relabel accuracy from ``predicted`` and
    ``clean`` labels when both are given)."""
    scores = rankings[chosen]
    order = nan_last_ranking(scores)
    metrics: dict[str, float] = score_summary(scores[valid])
    by: dict[str, dict[str, float]] = {}
    if noisy is not None:
        sub_pred = None if predicted is None or clean is None else predicted[valid]
        for name, values in rankings.items():
            by[name] = detection_metrics(values[valid], noisy[valid], k=top_k, predicted=sub_pred,
                                         clean_labels=None if clean is None or sub_pred is None else clean[valid])
        metrics.update(by[chosen])
    return order, metrics, by
