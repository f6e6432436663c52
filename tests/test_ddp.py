"""Two CPU processes (gloo, ddp_spawn) give the same audit as one process on the same weights."""
from __future__ import annotations

import functools

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from helpers import gaussian_blobs, run_gloo_ranks
from lightning_influence import InfluenceCallback, audit

COMBOS = [("standard", "hyperinf"), ("standard", "datainf"), ("fvm", "hyperinf"), ("fvm", "datainf")]
OPTIONS = dict(tuning={"steps": 8, "batch_size": 8}, batch_size=8)


class GlooTeardown(L.Callback):
    """Ends a ``ddp_spawn`` worker's gloo process group before the worker exits: every rank meets
    at a barrier, then destroys the group. Lightning destroys only NCCL groups (at exit); a gloo
    group left to the spawned interpreter's shutdown is torn down with its threads still running,
    which now and then aborts a rank ("terminate called without an active exception", SIGABRT)
    after the test's work is done."""

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            dist.barrier()
            dist.destroy_process_group()


def make_data():
    # odd sizes: shards of unequal length, no sampler padding allowed
    return gaussian_blobs(37, 13, 6)


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
    callbacks = [InfluenceCallback(method=m, solver=s, noisy=torch.arange(37) % 4 == 0,
                                   dirpath=str(tmp_path / f"{m}-{s}"), **OPTIONS) for m, s in COMBOS]
    module = Classifier()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, precision="64-true",
                        callbacks=[*callbacks, GlooTeardown()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8))
    module = module.double()  # the weights the workers trained, handed back by ddp_spawn
    for (method, solver), cb in zip(COMBOS, callbacks):
        distributed = cb.result  # produced by 2 ranks, handed back to this process
        assert distributed is not None, f"{method}/{solver}: no result reached the main process ({cb.last_error!r})"
        assert distributed.config["world_size"] == 2
        single = audit(module, train, val, method=method, solver=solver, noisy=torch.arange(37) % 4 == 0, **OPTIONS)
        assert single.config["world_size"] == 1
        torch.testing.assert_close(distributed.influence, single.influence, rtol=1e-5, atol=0)
        assert torch.equal(distributed.ranking, single.ranking)
        assert distributed.metrics["auroc"] == pytest.approx(single.metrics["auroc"])


def smoothed_loss(model, batch):
    """Cross-entropy with label smoothing: its minimum is finite, so a step far too large raises it."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none", label_smoothing=0.3)


class SmoothedClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        return smoothed_loss(self, batch).mean()


@pytest.mark.timeout(300) if hasattr(pytest.mark, "timeout") else (lambda f: f)
def test_ddp_ranks_retry_an_overshooting_tuning_together(tmp_path):
    """A probed step 16 times too large raises the validation loss: both ranks undo it and retry
    (one decision for all, else one rank would wait in a collective the other never calls), and
    the result is the one process's."""
    train, val = make_data()
    options = dict(tuning={"steps": 8, "batch_size": 8, "probe_factor": 16.0}, batch_size=8, loss_fn=smoothed_loss)
    cb = InfluenceCallback(method="fvm", dirpath=str(tmp_path / "fvm"), **options)
    module = SmoothedClassifier()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, precision="64-true",
                        callbacks=[cb, GlooTeardown()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8))
    distributed, single = cb.result, audit(module.double(), train, val, method="fvm", **options)
    assert distributed is not None, f"no result reached the main process ({cb.last_error!r})"
    assert distributed.config["world_size"] == 2
    assert single.tuning["retries"] >= 1 and distributed.tuning["retries"] == single.tuning["retries"]
    assert (single.tuning["val_loss_tuned_attempt_0"] > single.tuning["val_loss_trained"]
            > single.tuning["val_loss_tuned"])
    assert distributed.tuning["val_loss_tuned"] == pytest.approx(single.tuning["val_loss_tuned"], rel=1e-6)
    torch.testing.assert_close(distributed.influence, single.influence, rtol=1e-5, atol=0)


def test_sharded_strategies_are_refused_in_setup(tmp_path):
    """FSDP-like strategies shard the parameters: setup() says so before the first training step."""
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_influence.callback import InfluenceCallbackError
    from lightning_influence.trainer_data import check_strategy

    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)  # the type is what matters, not a live process group

    with pytest.raises(InfluenceCallbackError, match="FSDPStrategy"):
        check_strategy(FakeTrainer())

    class DDPTrainer:
        strategy = L.strategies.DDPStrategy.__new__(L.strategies.DDPStrategy)

    check_strategy(DDPTrainer())  # DDP is supported: no error


@pytest.mark.parametrize("kind", ["DeepSpeedStrategy", "FSDPStrategy", "mock-DeepSpeedStrategy"])
def test_sharded_strategies_are_refused_by_the_callbacks_setup(kind):
    """Through InfluenceCallback.setup (the hook Lightning calls before training): Lightning's
    DeepSpeed and FSDP strategies (built without a process group; DeepSpeed needs no deepspeed
    package for its type), and a user's subclass that only shares the name, all refused with a
    message that names the strategy and the supported alternative."""
    from lightning.pytorch import strategies

    from lightning_influence import InfluenceCallback
    from lightning_influence.callback import InfluenceCallbackError

    if kind.startswith("mock-"):
        cls = type(kind[5:], (strategies.DDPStrategy,), {})  # e.g. a wrapper defined by the user
    else:
        cls = getattr(strategies, kind)

    class FakeTrainer:
        strategy = cls.__new__(cls)

    with pytest.raises(InfluenceCallbackError, match=rf"{cls.__name__}.*sharded.*strategy='ddp'"):
        InfluenceCallback().setup(FakeTrainer(), None, "fit")


def _failing_rank_worker(rank: int, world: int, port: int, queue, where: str = "first gradient") -> None:
    """One process of a 2-rank gloo group whose rank 1 fails: ``"first gradient"``, at its first
    gradient of a standard audit; ``"training pass"``, at its first training batch of an fvm audit,
    after both ranks fitted the solvers together and while they score the batches as gathered."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train, val = make_data()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        training_rows = {tuple(row.tolist()) for row in train.x}

        def loss_fn(model, batch):
            x, y = batch
            if rank == 1 and torch.is_grad_enabled() and (where == "first gradient"
                                                          or tuple(x[0].tolist()) in training_rows):
                raise RuntimeError(f"boom on rank 1 ({where})")
            return nn.functional.cross_entropy(model(x), y, reduction="none")

        options = (dict(method="standard", batch_size=8) if where == "first gradient" else
                   dict(method="fvm", batch_size=4, preflight=False, tuning={"steps": 3}))
        try:
            audit(model, train, val, loss_fn=loss_fn, **options)
            queue.put((rank, "finished"))
        except Exception as err:  # noqa: BLE001 - the test inspects which error each rank saw
            queue.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("where", ["first gradient", "training pass"])
def test_an_error_on_one_rank_is_agreed_and_nobody_hangs(where):
    outcome = run_gloo_ranks(functools.partial(_failing_rank_worker, where=where))
    assert outcome[1].startswith(f"RuntimeError: boom on rank 1 ({where})")
    assert outcome[0].startswith("RemoteStageError")  # rank 0 learns of it and raises too
