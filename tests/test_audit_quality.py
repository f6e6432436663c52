"""The audit finds what it should: leave-one-out agreement and noisy-label detection."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import digits_mlp
from lightning_influence import audit
from tasks import TensorPairs, noisy_digits


def LogisticRegression(d: int) -> nn.Module:
    """Two-class logistic regression (softmax); training minimises mean CE + reg/2 ||θ||²."""
    torch.manual_seed(0)
    return nn.Linear(d, 2, dtype=torch.float64)


def per_sample_ce(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def fit_logreg(model, x, y, reg, weights=None):
    w = torch.ones(len(y), dtype=torch.float64) if weights is None else weights
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (per_sample_ce(model, x, y) * w).sum() / w.sum() \
            + reg / 2 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def spearman(a, b):
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_leave_one_out_correlation(fisher):
    g = torch.Generator().manual_seed(0)
    d, n, m, reg = 4, 80, 200, 0.05
    w_true = torch.randn(d, generator=g, dtype=torch.float64) * 2
    def make(k):
        x = torch.randn(k, d, generator=g, dtype=torch.float64)
        return x, (torch.sigmoid(x @ w_true) > torch.rand(k, generator=g, dtype=torch.float64)).long()
    x, y = make(n)
    flip = torch.randperm(n, generator=g)[: n // 10]
    y[flip] = 1 - y[flip]
    xv, yv = make(m)
    model = fit_logreg(LogisticRegression(d), x, y, reg)

    def val_loss(mod):
        with torch.no_grad():
            return float(per_sample_ce(mod, xv, yv).mean())

    base = val_loss(model)
    actual = torch.empty(n, dtype=torch.float64)
    for i in range(n):  # retrain without sample i (the ground truth; a loop over retrainings is the point)
        keep = torch.ones(n, dtype=torch.float64)
        keep[i] = 0
        retrained = fit_logreg(LogisticRegression(d), x, y, reg, keep)
        actual[i] = val_loss(retrained) - base
    # the regulariser is the curvature's damping: H = C + reg·I
    result = audit(model, TensorPairs(x, y), TensorPairs(xv, yv), method="standard", solver="exact",
                   curvature={"damping": reg, "damping_rule": "absolute", "fisher": fisher})
    # higher score = more harmful = removing it lowers the validation loss
    rho = spearman(result.scores, -actual)
    print(f"LOO Spearman ({fisher} Fisher): {rho:.3f}")
    assert rho >= 0.85


def test_fvm_detects_flipped_digits_and_beats_standard():
    split = noisy_digits(rate=0.2, seed=0)
    model = digits_mlp(split)
    common = dict(solver="hyperinf", noisy=split.noisy, clean_labels=split.clean_labels, batch_size=128)
    fvm = audit(model, split.train, split.val, method="fvm", tuning={"steps": 300, "batch_size": 128}, **common)
    standard = audit(model, split.train, split.val, method="standard", **common)
    print("fvm", {k: round(v, 4) for k, v in fvm.metrics.items()}, fvm.stage_seconds)
    print("standard", {k: round(v, 4) for k, v in standard.metrics.items()})
    assert fvm.metrics["auroc"] >= 0.95
    assert fvm.metrics["auroc"] > standard.metrics["auroc"]
    assert fvm.metrics["relabel_accuracy"] > 0.5
    assert fvm.loss_tuned is not None and fvm.loss_trained is not None
