"""The audit's options: one AuditOptions, checked once, shared by audit(), prepare()/score() and the callback."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence import AuditOptions, CurvatureConfig, TuningConfig, audit, prepare, score


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def test_options_normalise_once_and_fold_damping_into_curvature():
    options = AuditOptions(damping=0.3, curvature={"damping": 0.1, "damping_rule": "absolute"},
                           tuning={"steps": 2}, noisy=[0, 1, 1], clean_labels=[2, 0, 1], params=("a*",))
    assert options.curvature == CurvatureConfig(damping=0.3, damping_rule="absolute")
    assert options.damping is None  # the shortcut lives in curvature from here on: one source
    assert options.tuning == TuningConfig(steps=2)
    assert options.noisy.dtype == torch.bool and options.clean_labels.dtype == torch.long
    assert options.params == ["a*"]
    with pytest.raises(ValueError, match=r"one flag per training sample \(4\)"):
        options.check_samples(4)
    with pytest.raises(ValueError, match="unknown method"):
        AuditOptions(method="nope")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        AuditOptions(loss_fn="mse")


def test_audit_takes_the_options_as_one_object(blobs):
    train, val = blobs
    kwargs = dict(method="standard", solver="exact", top_k=5, damping=0.2, preflight=False)
    by_keywords = audit(small_mlp(), train, val, **kwargs)
    by_object = audit(small_mlp(), train, val, options=AuditOptions(**kwargs))
    assert torch.equal(by_keywords.scores, by_object.scores)
    assert by_object.config["curvature"]["damping"] == 0.2
    with pytest.raises(ValueError, match=r"either as options= or as keywords.*top_k"):
        audit(small_mlp(), train, val, options=AuditOptions(**kwargs), top_k=7)


def test_prepare_and_score_check_their_options_like_audit(blobs):
    train, val = blobs
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        prepare(small_mlp(), train, val, method="standard", batch_size=2.5)
    prepared = prepare(small_mlp(), train, val, method="standard")
    try:
        # score() used to truncate float labels with .long(); audit() and the callback refuse them
        with pytest.raises(ValueError, match="clean_labels must be one integer label"):
            score(prepared, "exact", clean_labels=torch.linspace(0, 1.7, len(train)))
        with pytest.raises(ValueError, match="rank_by='loss_tuned' needs"):
            score(prepared, "exact", rank_by="loss_tuned")
    finally:
        prepared.close()


def test_callback_keeps_its_audit_options_in_one_object():
    from lightning_influence import InfluenceCallback

    cb = InfluenceCallback(method="vm", tuning={"steps": 4}, damping=0.5, top_k=7)
    assert isinstance(cb.options, AuditOptions)
    assert cb.method == "vm" and cb.tuning.steps == 4 and cb.top_k == 7
    assert cb.options.curvature.damping == 0.5
    cb.top_k = 9  # an attribute set goes into the options (checked again in setup())
    assert cb.options.top_k == 9 and "top_k" not in cb.__dict__
    given = AuditOptions(method="standard", solver="exact")
    assert InfluenceCallback(options=given, scores_filename=None).options == given
    with pytest.raises(ValueError, match=r"not both.*method"):
        InfluenceCallback(options=given, method="vm")


@pytest.mark.parametrize("bad", [-1, 0.5, True, "1"])
def test_tuning_retries_must_be_a_count(bad):
    from lightning_influence.config import TuningConfig

    with pytest.raises((ValueError, TypeError), match="retries"):
        TuningConfig(retries=bad)
    assert TuningConfig(retries=2).retries == 2
    assert type(TuningConfig(retries=1.0).retries) is int  # a whole float is taken as the count it is
