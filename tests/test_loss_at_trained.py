"""The loss at θ* is a forward pass over the training set: the audit runs it only when a ranking
uses it (``noisy`` flags for the baseline metrics, or ``rank_by="loss_trained"``)."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import audit


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x, y)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def test_the_loss_at_theta_star_pass_runs_only_when_a_ranking_uses_it():
    model, train, val = _model(), _data(40, 1), _data(16, 2)
    options = dict(method="fvm", params="trainable", tuning={"steps": 5, "batch_size": 8}, batch_size=8)
    plain = audit(model, train, val, **options)
    assert plain.loss_trained is None and "loss_at_trained" not in plain.stage_seconds
    assert "loss_trained" not in plain.rows()[0]
    noisy = torch.zeros(40, dtype=torch.bool)
    noisy[:4] = True
    flagged = audit(model, train, val, noisy=noisy, **options)
    assert "loss_at_trained" in flagged.stage_seconds and "loss_trained" in flagged.metrics_by
    # the model's own per-sample cross entropy at θ*, computed here independently
    x, y = train.tensors
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y, reduction="none").double()
    torch.testing.assert_close(flagged.loss_trained, expected, rtol=1e-5, atol=1e-6)
    # the same scores either way: the pass only adds a column
    torch.testing.assert_close(flagged.influence, plain.influence)
    by_rank = audit(model, train, val, rank_by="loss_trained", **options)
    torch.testing.assert_close(by_rank.scores, expected, rtol=1e-5, atol=1e-6)
