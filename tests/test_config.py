"""The audit's options: one frozen AuditOptions, checked once, shared by audit(), prepare()/score() and the callback."""
from __future__ import annotations

import dataclasses

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
    # a keyword beside options= replaces that option (a checked copy; the caller's object stays theirs)
    given = AuditOptions(**kwargs)
    replaced = audit(small_mlp(), train, val, options=given, solver="identity")
    assert replaced.solver == "identity" and given.solver == "exact"
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        audit(small_mlp(), train, val, options=given, top_k=0)


def test_prepare_and_score_take_one_checked_options_object(blobs):
    train, val = blobs
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        AuditOptions(method="standard", batch_size=2.5)
    options = AuditOptions(method="standard", solver="exact")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.top_k = 3  # frozen: a change goes through dataclasses.replace, which checks it again
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        dataclasses.replace(options, top_k=0)
    prepared = prepare(small_mlp(), train, val, options)
    try:
        # score() checks the labels' count against the prepared training set
        with pytest.raises(ValueError, match="one integer label per training sample"):
            score(prepared, dataclasses.replace(options, clean_labels=torch.zeros(len(train) + 1, dtype=torch.long)))
        with pytest.raises(ValueError, match="rank_by='loss_tuned' needs"):
            dataclasses.replace(options, rank_by="loss_tuned")
        with pytest.raises(ValueError, match=r"options.method='fvm', but the gradients were prepared for"):
            score(prepared, AuditOptions(method="fvm"))
    finally:
        prepared.close()


def test_callback_keeps_its_audit_options_in_one_object():
    from lightning_influence import InfluenceCallback

    cb = InfluenceCallback(method="vm", tuning={"steps": 4}, damping=0.5, top_k=7)
    assert isinstance(cb.options, AuditOptions)
    assert cb.options.method == "vm" and cb.options.tuning.steps == 4 and cb.options.top_k == 7
    assert cb.options.curvature.damping == 0.5
    assert not hasattr(cb, "top_k")  # no attribute proxy: the options live in one frozen object
    with pytest.raises(dataclasses.FrozenInstanceError):
        cb.options.top_k = 9
    given = AuditOptions(method="standard", solver="exact")
    assert InfluenceCallback(options=given, scores_filename=None).options == given
    assert InfluenceCallback(options=given, method="vm").options.method == "vm"  # a keyword replaces it
    assert given.method == "standard"


@pytest.mark.parametrize("bad", [-1, 0.5, True, "1"])
def test_tuning_retries_must_be_a_count(bad):
    from lightning_influence.config import TuningConfig

    with pytest.raises((ValueError, TypeError), match="retries"):
        TuningConfig(retries=bad)
    assert TuningConfig(retries=2).retries == 2
    assert type(TuningConfig(retries=1.0).retries) is int  # a whole float is taken as the count it is
