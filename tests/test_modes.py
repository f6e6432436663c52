"""modes.preserved: the one save-and-restore of train/eval modes, requires_grad and .grad."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_influence.modes import preserved
from lightning_influence.tuning import evaluate, mean_gradient


def model_with_a_frozen_part() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 3)).double()
    model.train()
    model[1].eval()  # a submodule the user keeps in eval mode
    model[0].weight.requires_grad_(False)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    return model


def state(model: nn.Module):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a[2], b[2]))


def test_preserved_sets_inside_and_restores_everything_after_an_error():
    model = model_with_a_frozen_part()
    before = state(model)
    with pytest.raises(RuntimeError):
        with preserved(model, training=False, requires_grad=[model[0].weight], clear_grads=True):
            assert not any(m.training for m in model.modules())
            assert [p.requires_grad for p in model.parameters()] == [True, False, False, False]
            assert all(p.grad is None for p in model.parameters())
            raise RuntimeError("boom")
    assert same(state(model), before)


def test_tuning_passes_restore_each_module_own_mode():
    # evaluate() used to restore with model.train(was), which put the frozen submodule in train mode
    model = model_with_a_frozen_part()
    before = state(model)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    loader = [(x[:3], y[:3]), (x[3:], y[3:])]
    loss, _, count, norm = evaluate(model, loader, grad_of=list(model.parameters()))
    assert count == 6 and loss > 0 and norm > 0
    assert same(state(model), before)
    mean_gradient(model, list(model.parameters()), loader, None)
    assert same(state(model), before)
