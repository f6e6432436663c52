"""Momentum-SAM (``tuning.sam="momentum"``): one forward-backward pass per tuning step, taken at
θ + ε with SAM's ε along minus the optimiser's momentum, checked against the formula by hand."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_influence import TuningConfig, audit
from lightning_influence.tuning import budget_epochs
from lightning_influence.tuning.steps import _Loop, _momentum_sam_step, make_optimizer

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
              pytest.mark.filterwarnings("ignore:.*did not reach a validation minimum")]


def test_a_bad_sam_is_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match="tuning.sam"):
        TuningConfig(sam="one")


def test_one_pass_sam_buys_twice_the_passes_of_two_pass_sam():
    two, one = TuningConfig(budget=0.5, sam="two_pass"), TuningConfig(budget=0.5, sam="momentum")
    assert budget_epochs(two, 1000, 100, True) == pytest.approx(0.5 * 1000 / 200)
    assert budget_epochs(one, 1000, 100, True) == pytest.approx(0.5 * 1000 / 100)
    assert budget_epochs(one, 1000, 100, False) == budget_epochs(two, 1000, 100, False)  # vm: no SAM either way


@pytest.mark.parametrize("adaptive", [True, False])
def test_a_step_takes_the_gradient_at_theta_minus_rho_times_the_momentum_direction(adaptive):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    params = list(model.parameters())
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    ascent = [torch.randn_like(p) for p in params]
    config = TuningConfig(sam="momentum", adaptive=adaptive, rho=0.3, momentum=0.0)
    lr = 0.1
    optimizer, _ = make_optimizer(params, config, lr, 0.0, 10, sharpness_aware=True)
    theta = [p.detach().clone() for p in params]
    # by hand: SAM's ε for the direction d = -ascent, the gradient there, the step from θ
    scale = [t.abs() if adaptive else torch.ones_like(t) for t in theta]
    d = [-a for a in ascent]
    norm = math.sqrt(sum(float((s * v).pow(2).sum()) for s, v in zip(scale, d)))
    eps = [s.pow(2) * v * config.rho / (norm + 1e-12) for s, v in zip(scale, d)]
    probe = [(t + e).requires_grad_() for t, e in zip(theta, eps)]
    loss = nn.functional.cross_entropy(x @ probe[0].T + probe[1], y)
    grads = torch.autograd.grad(loss, probe)
    seen: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append(m.weight.detach().clone()))
    try:
        got, size, following = _momentum_sam_step(optimizer, model, params, (x, y), None, _Loop(), ascent)
    finally:
        handle.remove()
    assert len(seen) == 1 and size == 8  # one forward pass, at θ + ε
    torch.testing.assert_close(seen[0], theta[0] + eps[0], rtol=1e-6, atol=1e-9)
    assert float(got.detach()) == pytest.approx(float(loss), rel=1e-7)  # SAM adds 1e-12 to the norm
    for p, t, g in zip(params, theta, grads):
        torch.testing.assert_close(p.detach(), t - lr * g, rtol=1e-6, atol=1e-9)  # restored, then stepped
    for f, g in zip(following, grads):  # no momentum: the next direction is this step's gradient
        torch.testing.assert_close(f, g, rtol=1e-6, atol=1e-9)


def test_momentum_sam_tunes_with_one_pass_per_step_and_finds_the_flips(digits):
    split, model = digits
    rows: list[int] = []
    results = {}
    for sam in ("two_pass", "momentum"):
        rows.clear()
        handle = model.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]) if torch.is_grad_enabled()
                                             and o.requires_grad else None)
        try:
            results[sam] = audit(model, split.train, split.val, method="fvm", params="trainable", noisy=split.noisy,
                                 batch_size=128, tuning={"sam": sam, "steps": 20, "lr": 0.05})
        finally:
            handle.remove()
        results[sam + "_rows"] = sum(rows)
    one, two = results["momentum"], results["two_pass"]
    assert one.tuning["steps"] == two.tuning["steps"] == 20
    # the tuning's forward passes with autograd: 20 x 8 samples against 2 x 20 x 8 (the rest of the audit alike)
    assert results["two_pass_rows"] - results["momentum_rows"] == 20 * 8
    assert math.isnan(one.tuning["sharpness"]) and one.tuning["sharpness_aware"] == 1.0
    # as far as two-pass SAM's 20 steps go (0.390 -> 0.293 and 0.299 here), and the flips found alike
    assert one.tuning["val_loss_tuned"] < 0.8 * one.tuning["val_loss_trained"]
    assert one.tuning["val_loss_tuned"] < 1.1 * two.tuning["val_loss_tuned"]
    assert one.metrics["auroc"] > 0.99 and abs(one.metrics["auroc"] - two.metrics["auroc"]) < 0.01
