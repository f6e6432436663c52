"""``(x, y)`` batches with float targets, shape ``(B,)`` or ``(B, k)``: where the
LightningModule's ``training_step`` computes the mean squared error, the pre-flight check
confirms the per-sample MSE (mean over outputs) sample by sample and the audit uses it (checked
against each sample's squared error computed here, and its gradients against autograd);
another training loss, or no training_step to confirm it, is refused before training with a
message that says the targets are floats and names ``loss_fn``."""
from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence import InfluenceCallback, audit
from lightning_influence.exceptions import BatchFormatError, PreflightError
from lightning_influence.gradients import gradient_mode, per_sample_gradients
from lightning_influence.losses import mean_squared_error
from lightning_influence.params import select_blocks
from tasks import TensorPairs

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*validation tuning")]
FLOATS = r"targets are floats.*loss_fn=\(model, batch\) -> per-sample losses"


class Regressor(L.LightningModule):
    """An 8-16-k MLP; ``(B,)`` outputs for one target, ``(B, k)`` for several; ``loss`` its training loss."""

    def __init__(self, outputs: int = 1, loss: str = "mse") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, outputs))
        self.outputs, self.loss, self.training_steps = outputs, loss, 0

    def forward(self, x):
        out = self.net(x)
        return out.squeeze(-1) if self.outputs == 1 else out

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        fn = nn.functional.mse_loss if self.loss == "mse" else nn.functional.l1_loss
        return fn(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def regression(n: int, outputs: int, seed: int = 0) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, outputs, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, outputs, generator=g)
    return TensorPairs(x, y.squeeze(-1) if outputs == 1 else y)


def _fit(tmp_path, module, train, val, **options):
    cb = InfluenceCallback(tuning={"steps": 4}, scores_filename=None, **options)
    L.Trainer(default_root_dir=str(tmp_path), max_epochs=1, accelerator="cpu", devices=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, callbacks=[cb]).fit(module, DataLoader(train, batch_size=8),
                                                          DataLoader(val, batch_size=8))
    return cb


@pytest.mark.parametrize("outputs", [1, 3])
def test_an_mse_training_step_is_confirmed_and_audited(tmp_path, outputs):
    train, val = regression(40, outputs), regression(16, outputs, seed=1)
    module = Regressor(outputs)
    cb = _fit(tmp_path, module, train, val, method="standard")  # scored at the trained weights
    report = cb.preflight_report
    assert report.loss_reference == "training_step" and report.loss_error < 1e-5
    assert report.loss_fn is mean_squared_error
    result = cb.result
    assert module.training_steps == 5 and result is not None and bool(torch.isfinite(result.influence).all())
    # the loss the audit used is each sample's squared error averaged over its outputs (trained weights)
    with torch.no_grad():
        expected = (module(train.x) - train.y).pow(2).reshape(40, -1).mean(1).double()
    torch.testing.assert_close(result.loss_trained, expected, rtol=1e-5, atol=1e-7)


def test_the_per_sample_mse_gradients_are_autograd_of_each_sample_alone():
    data = regression(6, 3)
    model = Regressor(3).double()
    x, y = data.x.double(), data.y.double()
    blocks = select_blocks(model, "trainable")
    with gradient_mode(model, blocks):
        got, out = per_sample_gradients(model, blocks, (x, y), mean_squared_error)
        for i in range(6):
            loss = nn.functional.mse_loss(model(x[i:i + 1]), y[i:i + 1])
            assert float(out.losses[i]) == pytest.approx(float(loss), rel=1e-12)
            for b, g in zip(blocks, torch.autograd.grad(loss, [b.param for b in blocks])):
                torch.testing.assert_close(got[b.name][i], b.to_matrix(g.unsqueeze(0))[0], rtol=1e-10, atol=1e-12)


def test_another_training_loss_is_refused_in_setup_naming_loss_fn(tmp_path):
    module = Regressor(1, loss="l1")
    with pytest.raises(PreflightError, match=FLOATS) as info:
        _fit(tmp_path, module, regression(40, 1), regression(16, 1, seed=1))
    assert "not the loss training_step computes" in str(info.value)
    assert module.training_steps == 0  # before the first training step


def test_a_module_without_training_step_is_refused_naming_loss_fn():
    train, val = regression(20, 2), regression(8, 2, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    with pytest.raises(PreflightError, match=r"targets are floats.*no training_step.*loss_fn=\(model, batch\)"):
        audit(model, train, val)
    with pytest.raises(BatchFormatError, match=FLOATS):  # no check: the default loss itself refuses
        audit(model, train, val, preflight=False, method="standard")
    result = audit(model, train, val, loss_fn=mean_squared_error, method="standard")  # the way out it names
    assert bool(torch.isfinite(result.influence).all())


def test_audit_of_a_lightning_module_confirms_against_its_training_step():
    train, val = regression(24, 1), regression(8, 1, seed=1)
    result = audit(Regressor(1), train, val, tuning={"steps": 4})  # fvm: tuned on the validation MSE
    assert result.preflight.loss_reference == "training_step" and result.preflight.loss_fn is mean_squared_error
    assert bool(torch.isfinite(result.influence).all()) and bool(torch.isfinite(result.loss_tuned).all())
    with pytest.raises(PreflightError, match=FLOATS):
        audit(Regressor(1, loss="l1"), train, val, method="standard")
