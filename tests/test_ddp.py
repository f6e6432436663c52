"""Two CPU processes (gloo, ddp_spawn) give the same audit as one process on the same weights."""
from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence import InfluenceCallback, audit
from lightning_influence.datasets import TensorPairs

COMBOS = [("standard", "hyperinf"), ("standard", "datainf"), ("fvm", "hyperinf"), ("fvm", "datainf")]
OPTIONS = dict(tuning={"steps": 8, "batch_size": 8}, batch_size=8)


def make_data():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g, dtype=torch.float64) * 2

    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return TensorPairs(centers[y] + torch.randn(n, 6, generator=g, dtype=torch.float64), y)

    return make(37), make(13)  # odd sizes: shards of unequal length, no sampler padding allowed


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.timeout(300) if hasattr(pytest.mark, "timeout") else (lambda f: f)
def test_ddp_spawn_matches_single_process(tmp_path):
    train, val = make_data()
    callbacks = [InfluenceCallback(method=m, solver=s, noisy=torch.arange(37) % 4 == 0, dirpath=str(tmp_path / f"{m}-{s}"),
                                   **OPTIONS) for m, s in COMBOS]
    module = Classifier()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, precision="64-true",
                        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8))
    module = module.double()  # the weights the workers trained, handed back by ddp_spawn
    for (method, solver), cb in zip(COMBOS, callbacks):
        distributed = cb.result  # produced by 2 ranks, handed back to this process
        assert distributed is not None, f"{method}/{solver}: no result reached the main process ({cb.last_error!r})"
        assert distributed.config["world_size"] == 2
        single = audit(module, train, val, method=method, solver=solver, noisy=torch.arange(37) % 4 == 0, **OPTIONS)
        assert single.config["world_size"] == 1
        torch.testing.assert_close(distributed.scores, single.scores, rtol=1e-5, atol=0)
        assert torch.equal(distributed.ranking, single.ranking)
        assert distributed.metrics["auroc"] == pytest.approx(single.metrics["auroc"])


def test_sharded_strategies_are_refused_in_setup(tmp_path):
    """FSDP-like strategies shard the parameters: setup() says so before the first training step."""
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_influence.callback import InfluenceCallbackError, _check_strategy

    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)  # the type is what matters, not a live process group

    with pytest.raises(InfluenceCallbackError, match="FSDPStrategy"):
        _check_strategy(FakeTrainer())

    class DDPTrainer:
        strategy = L.strategies.DDPStrategy.__new__(L.strategies.DDPStrategy)

    _check_strategy(DDPTrainer())  # DDP is supported: no error
