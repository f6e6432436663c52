"""The tuning budget in training epochs (``TuningConfig.budget``): how many passes over the
validation set it buys, its checks inside it, and a bad value refused when the config is made."""
from __future__ import annotations

import pytest
import torch

from lightning_influence import TuningConfig, audit
from lightning_influence.tuning import budget_epochs

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
              pytest.mark.filterwarnings("ignore:.*did not reach a validation minimum")]


def test_the_budget_buys_passes_over_the_validation_set():
    assert TuningConfig().budget == 0.5
    # b x n / (2m) passes under two-pass SAM, b x n / m under one-pass SAM (the default) or without SAM,
    # within [0.5, 10]
    two = dict(sam="two_pass")
    assert budget_epochs(TuningConfig(budget=0.5, **two), 1000, 100, True) == pytest.approx(0.5 * 1000 / 200)
    assert budget_epochs(TuningConfig(budget=0.5), 1000, 100, True) == pytest.approx(0.5 * 1000 / 100)
    assert budget_epochs(TuningConfig(budget=0.5), 1000, 100, False) == pytest.approx(0.5 * 1000 / 100)
    assert budget_epochs(TuningConfig(budget=1.5, **two), 1000, 100, True) == pytest.approx(1.5 * 1000 / 200)
    assert budget_epochs(TuningConfig(budget=3.0), 1000, 100, True) == 10.0  # at most ten passes
    assert budget_epochs(TuningConfig(budget=0.25, **two), 1000, 300, True) == 0.5  # at least half a pass
    assert budget_epochs(TuningConfig(epochs=2.0, budget=0.25), 1000, 100, True) == 2.0  # epochs as given


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "half", True])
def test_a_bad_budget_is_refused_when_the_config_is_made(bad):
    with pytest.raises(ValueError, match="tuning.budget"):
        TuningConfig(budget=bad)


def test_a_quarter_budget_spends_a_quarter_epoch_checks_included(digits):
    split, model = digits
    n, m = len(split.train), len(split.val)
    kw = dict(method="fvm", params="trainable", batch_size=128, noisy=split.noisy)
    quarter = audit(model, split.train, split.val, tuning={"budget": 0.25, "sam": "two_pass"}, **kw)
    t = quarter.tuning
    assert t["budget_training_epochs"] == 0.25
    assert t["budget_epochs"] == pytest.approx(max(0.5, 0.25 * n / (2 * m)))
    # the checks and the SAM steps (two forward-backward passes per sample) within the quarter epoch and
    # one step, unless the steps' floor (a quarter of the budget's passes) is what is left after the checks
    step = 2 * TuningConfig().batch_size / n
    floor = 0.25 * t["budget_epochs"] * 2 * m / n
    assert t["check_epochs"] + t["steps"] * step <= max(0.25, t["check_epochs"] + floor) + step
    full = audit(model, split.train, split.val, tuning={"budget": 1.0, "sam": "two_pass"}, **kw)
    assert full.tuning["budget_training_epochs"] == 1.0 and full.tuning["steps"] > 2 * t["steps"]
    default = audit(model, split.train, split.val, **kw)
    explicit = audit(model, split.train, split.val, tuning={"budget": 0.5, "sam": "momentum"}, **kw)
    assert torch.equal(explicit.scores, default.scores)  # the default: half an epoch of one-pass SAM, bit for bit
    assert default.tuning["budget_training_epochs"] == 0.5
    assert quarter.config["tuning"]["budget"] == 0.25
    # a budget given as steps or passes reports none in training epochs
    fixed = audit(model, split.train, split.val, tuning={"steps": 3}, **kw)
    assert "budget_training_epochs" not in fixed.tuning and fixed.tuning["steps"] == 3


def _hint(stats, config):
    from lightning_influence.tuning import minimum_check

    with pytest.warns(RuntimeWarning, match="did not reach a validation minimum") as caught:
        minimum_check({"steps": 10.0, "val_loss_trained": 1.0, "planned_epochs": 0.4, "lr": 0.1, **stats}, config,
                      0.999, float("nan"), 1.0)
    return str(caught[-1].message)


def test_the_warning_names_the_budget_that_applies_and_never_a_retried_lr():
    auto = _hint({}, TuningConfig(budget=0.5))
    assert "raise tuning.budget (now 0.5 training epochs, 0.4 passes) or tuning.lr (now 0.1, probed)" in auto
    assert "raise tuning.epochs (now 3 passes)" in _hint({}, TuningConfig(epochs=3.0))
    assert "raise tuning.steps (now 7)" in _hint({}, TuningConfig(steps=7))
    # after a retry at a quarter of the probed lr (the larger one raised the loss), raising it is no advice
    retried = _hint({"retries": 1.0, "lr": 0.025}, TuningConfig(lr=0.025))
    assert "raise tuning.budget (now 0.5 training epochs" in retried
    assert "retried at a quarter (1x, now 0.025)" in retried
    assert "or tuning.lr" not in retried

