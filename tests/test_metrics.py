"""Tests for lightning_influence.metrics."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torchmetrics.functional.classification import binary_auroc

from lightning_influence.metrics import (
    detection_curve,
    detection_metrics,
    ranking,
    score_summary,
)


def _random_problem(seed: int, n: int = 400, noise_rate: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.rand(n, generator=g) < noise_rate
    noisy[0], noisy[1] = True, False  # guarantee both classes
    # informative but imperfect detector: noisy samples score higher on average
    base = torch.randn(n, generator=g, dtype=torch.float64) + 1.5 * noisy.double()
    return base, noisy


def _sk(scores: torch.Tensor, noisy: torch.Tensor) -> tuple[float, float]:
    y = noisy.numpy().astype(int)
    s = scores.double().numpy()
    return roc_auc_score(y, s), average_precision_score(y, s)


SCORE_TRANSFORMS = {
    "standard": lambda b: b,
    "huge_magnitude": lambda b: 1e4 * b,
    "all_above_50": lambda b: 60.0 + b - b.min(),
    "negative_huge": lambda b: -1e6 + 1e3 * b,
    "float32": lambda b: (1e4 * b).float(),
    "ties": lambda b: torch.round(2 * b),  # few distinct values, many ties
    "ties_huge": lambda b: 1e5 * torch.round(2 * b),
    "constant": lambda b: torch.full_like(b, 123.0),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", list(SCORE_TRANSFORMS))
def test_auroc_ap_match_sklearn(kind: str, seed: int) -> None:
    base, noisy = _random_problem(seed)
    scores = SCORE_TRANSFORMS[kind](base)
    out = detection_metrics(scores, noisy)
    sk_auc, sk_ap = _sk(scores, noisy)
    assert out["auroc"] == pytest.approx(sk_auc, abs=1e-6)
    assert out["ap"] == pytest.approx(sk_ap, abs=1e-6)


@pytest.mark.parametrize("kind", ["huge_magnitude", "all_above_50", "ties_huge"])
def test_naive_torchmetrics_is_wrong_on_large_scores(kind: str) -> None:
    """The test above could fail: calling torchmetrics on raw scores gives a different AUROC."""
    base, noisy = _random_problem(0)
    scores = SCORE_TRANSFORMS[kind](base).float()
    sk_auc, _ = _sk(scores, noisy)
    naive = float(binary_auroc(scores, noisy.long()))
    assert abs(naive - sk_auc) > 1e-3
    assert detection_metrics(scores, noisy)["auroc"] == pytest.approx(sk_auc, abs=1e-6)


def test_int_noisy_flags_equivalent_to_bool() -> None:
    base, noisy = _random_problem(3)
    a = detection_metrics(base, noisy)
    b = detection_metrics(base, noisy.long())
    c = detection_metrics(base, noisy.to(torch.uint8))
    assert a == b == c


# --------------------------------------------------------------------------- hand example

# id:      0    1    2    3    4    5    6    7    8    9
SCORES = torch.tensor([0.9, 0.1, 0.8, 0.8, 0.3, 0.7, 0.2, 0.5, 0.6, 0.4])
NOISY = torch.tensor([1, 1, 0, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
# ranking (desc, tie 2/3 -> lower id first): 0, 2, 3, 5, 8, 7, 9, 4, 6, 1
# noisy along ranking:                        1, 0, 1, 0, 0, 1, 0, 0, 0, 1
EXPECTED_ORDER = [0, 2, 3, 5, 8, 7, 9, 4, 6, 1]


def test_ranking_hand_example() -> None:
    assert ranking(SCORES).tolist() == EXPECTED_ORDER
    assert ranking(SCORES).dtype == torch.long


def test_ranking_tie_break_lower_id_first() -> None:
    s = torch.tensor([1.0, 3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    assert ranking(s).tolist() == [1, 3, 5, 4, 0, 2, 6]
    big = torch.zeros(1000)
    assert ranking(big).tolist() == list(range(1000))


def test_precision_recall_detection_hand_example() -> None:
    out = detection_metrics(SCORES, NOISY, k=2, fractions=(0.05, 0.1, 0.2, 0.3, 0.6, 1.0))
    # top2 = {0, 2}: one noisy. Tie-break matters: with id 3 first it would be 2 hits.
    assert out["precision@k"] == pytest.approx(1 / 2)
    assert out["recall@k"] == pytest.approx(1 / 4)
    # top m=4 = {0, 2, 3, 5}: two noisy
    assert out["recall@noise_rate"] == pytest.approx(2 / 4)
    assert out["noise_rate"] == pytest.approx(0.4)
    # ceil(f*n): 5% -> 1, 10% -> 1, 20% -> 2, 30% -> 3, 60% -> 6, 100% -> 10
    assert out["detection@5%"] == pytest.approx(1 / 4)
    assert out["detection@10%"] == pytest.approx(1 / 4)
    assert out["detection@20%"] == pytest.approx(1 / 4)
    assert out["detection@30%"] == pytest.approx(2 / 4)
    assert out["detection@60%"] == pytest.approx(3 / 4)
    assert out["detection@100%"] == pytest.approx(1.0)
    assert "relabel_accuracy" not in out

    out3 = detection_metrics(SCORES, NOISY, k=3)
    assert out3["precision@k"] == pytest.approx(2 / 3)
    assert out3["recall@k"] == pytest.approx(2 / 4)
    # k larger than n is clipped to n
    outbig = detection_metrics(SCORES, NOISY, k=50)
    assert outbig["precision@k"] == pytest.approx(4 / 10)
    assert outbig["recall@k"] == pytest.approx(1.0)
    assert set(outbig) >= {
        "auroc", "ap", "precision@k", "recall@k", "recall@noise_rate", "detection@5%",
        "detection@10%", "detection@20%", "detection@30%", "noise_rate",
    }
    assert all(isinstance(v, float) for v in outbig.values())


def test_detection_fraction_rounding() -> None:
    # 0.1 * 30 = 3.0000000000000004 in floating point; must inspect 3, not 4 samples.
    scores = -torch.arange(30, dtype=torch.float64)  # ranking = 0, 1, 2, ...
    noisy = torch.zeros(30, dtype=torch.bool)
    noisy[[0, 1, 2, 3]] = True
    out = detection_metrics(scores, noisy, fractions=(0.1,))
    assert out["detection@10%"] == pytest.approx(3 / 4)


def test_relabel_accuracy_hand_example() -> None:
    clean = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    predicted = clean.clone()
    predicted[3] = 9  # noisy, wrong
    predicted[1] = 9  # noisy, wrong (ranked last)
    predicted[2] = 9  # clean sample, wrong: must not count
    # noisy ids 0 (ok), 1 (wrong), 3 (wrong), 7 (ok) -> 2/4
    out = detection_metrics(SCORES, NOISY, k=6, predicted=predicted, clean_labels=clean)
    assert out["relabel_accuracy"] == pytest.approx(2 / 4)
    # top6 = 0,2,3,5,8,7 -> noisy 0 (ok), 3 (wrong), 7 (ok)
    assert out["relabel_accuracy@k"] == pytest.approx(2 / 3)
    out1 = detection_metrics(SCORES, NOISY, k=1, predicted=predicted, clean_labels=clean)
    assert out1["relabel_accuracy@k"] == pytest.approx(1.0)
    # reversed ranking: top2 = ids 1 (noisy, wrong), 6 (clean) -> 0/1
    out_rev = detection_metrics(-SCORES, NOISY, k=2, predicted=predicted, clean_labels=clean)
    assert out_rev["relabel_accuracy@k"] == pytest.approx(0.0)
    # no truly noisy sample in top-k -> NaN
    s = torch.tensor([5.0, 4.0, 1.0, 0.0])
    nz = torch.tensor([False, False, True, True])
    o = detection_metrics(
        s, nz, k=2, predicted=torch.tensor([0, 0, 1, 1]), clean_labels=torch.tensor([0, 0, 1, 2])
    )
    assert math.isnan(o["relabel_accuracy@k"])
    assert o["relabel_accuracy"] == pytest.approx(0.5)


def test_relabel_requires_both() -> None:
    with pytest.raises(ValueError, match="together"):
        detection_metrics(SCORES, NOISY, predicted=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="predicted"):
        detection_metrics(
            SCORES, NOISY, predicted=torch.zeros(9, dtype=torch.long),
            clean_labels=torch.zeros(10, dtype=torch.long),
        )


# --------------------------------------------------------------------------- curve


def test_detection_curve_hand_example() -> None:
    x, y = detection_curve(SCORES, NOISY, num_points=11)
    assert x.shape == y.shape == (11,)
    torch.testing.assert_close(x, torch.linspace(0, 1, 11, dtype=torch.float64))
    expected = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4], dtype=torch.float64) / 4
    torch.testing.assert_close(y, expected)


def test_detection_curve_consistent_with_metrics() -> None:
    base, noisy = _random_problem(5, n=1000)
    x, y = detection_curve(base, noisy, num_points=101)
    out = detection_metrics(base, noisy)
    assert y[0] == 0 and y[-1] == 1
    assert bool((y[1:] >= y[:-1]).all())
    for pct in (5, 10, 20, 30):
        assert y[pct].item() == pytest.approx(out[f"detection@{pct}%"])


# --------------------------------------------------------------------------- errors


def test_error_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"9.*10|10.*9"):
        detection_metrics(SCORES, NOISY[:9])
    with pytest.raises(ValueError, match=r"9.*10|10.*9"):
        detection_curve(SCORES, NOISY[:9])


def test_error_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="bool"):
        detection_metrics(SCORES, NOISY.float())
    with pytest.raises(ValueError, match="0 and 1"):
        detection_metrics(SCORES, NOISY.long() * 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_error_non_finite(bad: float) -> None:
    s = SCORES.clone()
    s[[2, 5]] = bad
    with pytest.raises(ValueError, match="2 non-finite"):
        detection_metrics(s, NOISY)
    with pytest.raises(ValueError, match="non-finite"):
        ranking(s)
    with pytest.raises(ValueError, match="non-finite"):
        detection_curve(s, NOISY)


def test_error_bad_k_and_fraction() -> None:
    with pytest.raises(ValueError):
        detection_metrics(SCORES, NOISY, k=0)
    with pytest.raises(ValueError):
        detection_metrics(SCORES, NOISY, fractions=(0.0,))
    with pytest.raises(ValueError):
        detection_metrics(SCORES, NOISY, fractions=(1.5,))


@pytest.mark.parametrize("all_noisy", [False, True])
def test_single_class_gives_nan_and_warning(all_noisy: bool) -> None:
    noisy = torch.full((10,), all_noisy)
    with pytest.warns(UserWarning, match="undefined"):
        out = detection_metrics(SCORES, noisy)
    assert math.isnan(out["auroc"]) and math.isnan(out["ap"])
    assert out["noise_rate"] == float(all_noisy)
    if all_noisy:
        assert out["recall@k"] == 1.0 and out["precision@k"] == 1.0
    else:
        assert math.isnan(out["recall@k"]) and out["precision@k"] == 0.0


def test_no_warning_in_normal_case() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detection_metrics(SCORES, NOISY)
        detection_curve(SCORES, NOISY)


# --------------------------------------------------------------------------- summary


def test_score_summary() -> None:
    s = torch.arange(101, dtype=torch.float32)  # 0..100
    out = score_summary(s)
    assert set(out) == {
        "score_mean", "score_std", "score_min", "score_max",
        "score_median", "score_q90", "score_q99",
    }
    assert out["score_mean"] == pytest.approx(50.0)
    assert out["score_std"] == pytest.approx(float(s.double().std()))
    assert out["score_min"] == 0.0 and out["score_max"] == 100.0
    assert out["score_median"] == pytest.approx(50.0)
    assert out["score_q90"] == pytest.approx(90.0)
    assert out["score_q99"] == pytest.approx(99.0)
    even = score_summary(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert even["score_median"] == pytest.approx(2.5)
    assert score_summary(torch.tensor([7.0]))["score_std"] == 0.0


def test_one_nan_last_ranking() -> None:
    from lightning_influence.metrics import nan_last_ranking, ranking_values

    nan, inf = float("nan"), float("inf")
    s = torch.tensor([0.5, nan, inf, -inf, 0.5, 2.0, nan], dtype=torch.float64)
    order = nan_last_ranking(s)
    assert order.tolist() == [2, 5, 0, 4, 1, 3, 6]  # +inf first; NaN and -inf last, by id
    # the finite values curves and colour maps read sort the same way (+inf used to go last there)
    values = ranking_values(s)
    assert bool(torch.isfinite(values).all()) and torch.equal(ranking(values), order)
    assert torch.equal(nan_last_ranking(SCORES), ranking(SCORES))


def test_one_noisy_validator() -> None:
    from lightning_influence.metrics import check_noisy

    assert check_noisy(None, 3) is None
    assert check_noisy([1, 0, 1]).tolist() == [True, False, True]
    assert check_noisy(torch.tensor([0, 1], dtype=torch.uint8), 2).dtype == torch.bool
    with pytest.raises(ValueError, match=r"one flag per training sample \(10\), got shape \(9,\)"):
        detection_metrics(SCORES, NOISY[:9])
    with pytest.raises(ValueError, match="1-D sequence"):
        check_noisy([[True], [False]])
    with pytest.raises(ValueError, match="must be booleans.*float32"):
        check_noisy(torch.zeros(3), 3)
