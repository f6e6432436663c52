"""vm/fvm scores made as the training gradients are gathered (no training store): the same
scores as scoring a store of those gradients afterwards, no training store made, and a
Prepared scored this way refusing to be scored otherwise."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import lightning_influence.gathering as gathering
from helpers import TokenDataset, mlp, pad_collate, tiny_bert_lora
from lightning_influence import AuditOptions, audit
from lightning_influence.audit import prepare, score
from lightning_influence.distributed import Collectives
from lightning_influence.scoring import scored_as_gathered


def _stored(model, train, val, options):
    """The same audit with the training gradients stored and scored afterwards (the old path)."""
    prepared = prepare(model, train, val, options, loss_at_trained=False)
    try:
        assert prepared.streamed is None and prepared.train.store is not None
        return score(prepared, options)
    finally:
        prepared.close()


@pytest.fixture
def store_sizes(monkeypatch):
    """The row counts of every GradientStore the gradient stage makes."""
    sizes: list[int] = []
    real = gathering.GradientStore

    def counting(n, *args, **kwargs):
        sizes.append(n)
        return real(n, *args, **kwargs)

    monkeypatch.setattr(gathering, "GradientStore", counting)
    return sizes


@pytest.mark.parametrize("method,solver,fisher,rtol", [
    ("fvm", "hyperinf", "empirical", 1e-9), ("vm", "datainf", "empirical", 1e-9), ("fvm", "exact", "true", 1e-9),
    ("vm", "identity", "empirical", 1e-9),
    # LiSSA iterates each chunk until its slowest vector converges: batches of 8 instead of one
    # chunk of 40 stop at other iterations, within its tolerance
    ("fvm", "lissa", "empirical", 1e-5),
])
def test_scores_equal_a_stored_audit_and_no_training_store_is_made(blobs, store_sizes, method, solver, fisher, rtol):
    train, val = blobs  # 40 training, 20 validation samples
    options = AuditOptions(method=method, solver=solver, curvature={"fisher": fisher}, tuning={"steps": 3},
                           batch_size=8)
    assert scored_as_gathered(options)
    streamed = audit(mlp(), train, val, options=options)
    assert 40 not in store_sizes  # validation stores only (20 rows; the true Fisher's too)
    assert set(store_sizes) == {20}
    stored = _stored(mlp(), train, val, options)
    assert 40 in store_sizes
    torch.testing.assert_close(streamed.influence, stored.influence, rtol=rtol, atol=1e-12)  # float64 model
    assert streamed.influence.abs().min() > 0
    assert set(streamed.stage_seconds) >= {"gradients", "solve", "score"}
    assert streamed.config["scored_as_gathered"] and not stored.config["scored_as_gathered"]


def test_a_float32_lora_transformer_scores_as_its_stored_audit():
    """A float32 PEFT BERT (per-sample gradients through attention, padded batches): the same
    scores as the stored path, to float32 rounding (the quadratic forms run on batches of 8
    instead of the store's chunks)."""
    train, val = TokenDataset(24, vocab=60, classes=3, seed=1), TokenDataset(12, vocab=60, classes=3, seed=2)
    loader = torch.utils.data.DataLoader(train, batch_size=8, collate_fn=pad_collate)
    vloader = torch.utils.data.DataLoader(val, batch_size=8, collate_fn=pad_collate)
    options = AuditOptions(tuning={"steps": 2}, batch_size=8, params="lora")
    model = tiny_bert_lora(torch.float32)
    streamed = audit(model, loader, vloader, options=options)
    stored = _stored(model, loader, vloader, options)
    assert torch.isfinite(streamed.influence).all()
    torch.testing.assert_close(streamed.influence, stored.influence, rtol=1e-4, atol=1e-6)


def test_a_non_finite_training_sample_is_excluded_as_before(blobs):
    train, val = blobs
    x = train.x.clone()
    x[3] = float("nan")
    bad = type(train)(x, train.y)
    options = AuditOptions(tuning={"steps": 3}, batch_size=8)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        streamed = audit(mlp(), bad, val, options=options)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        stored = _stored(mlp(), bad, val, options)
    assert streamed.excluded == stored.excluded == [3]
    assert torch.isnan(streamed.influence[3])
    keep = torch.arange(40) != 3
    torch.testing.assert_close(streamed.influence[keep], stored.influence[keep], rtol=1e-9, atol=1e-12)


def test_a_streamed_prepare_refuses_other_scoring(blobs):
    train, val = blobs
    options = AuditOptions(tuning={"steps": 3}, batch_size=8)
    prepared = prepare(mlp(), train, val, options, scores_as_gathered=True)
    try:
        assert prepared.train.store is None and prepared.streamed is not None
        from lightning_influence.solvers import make_solver

        for other in (replace(options, solver="exact"), replace(options, per_validation=True),
                      replace(options, curvature={"damping": 0.5}),
                      replace(options, solver=make_solver("hyperinf", form="schulz"))):  # same name, other solver
            with pytest.raises(ValueError, match="scored as its gradients were gathered"):
                score(prepared, other)
        result = score(prepared, options)
        assert torch.isfinite(result.influence).all()
    finally:
        prepared.close()


def test_only_vm_fvm_without_readers_of_the_training_gradients_stream(blobs):
    assert scored_as_gathered(AuditOptions())
    assert not scored_as_gathered(AuditOptions(method="standard"))
    assert not scored_as_gathered(AuditOptions(per_validation=True))
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for options in (AuditOptions(method="standard"), AuditOptions(per_validation=True)):
        with pytest.raises(ValueError, match="only vm/fvm without per_validation"):
            prepare(model, *blobs, options, scores_as_gathered=True)  # refused before any work
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="validation curvature"):
        gathering.gather_training(nn.Linear(1, 1), [], [], torch.arange(0), None, None, False, 0, {}, None, None,
                                  None, None, Collectives(), scorer=lambda curv: None)


class NoCollectiveInsideACheckpoint(Collectives):
    """Single-process collectives that fail a collective called inside a checkpoint (a local
    stage): under several ranks a rank failing there would leave the others waiting in it."""

    def __init__(self) -> None:
        self.depth, self.calls = 0, 0

    def checkpoint(self, stage):
        self.depth += 1
        try:
            return stage()
        finally:
            self.depth -= 1

    def _collective(self, value):
        assert self.depth == 0, "a collective inside a checkpointed (local) stage"
        self.calls += 1
        return value

    def all_reduce_sum(self, tensor):
        return self._collective(tensor)

    def all_gather_cat(self, tensor):
        return self._collective(tensor)

    def broadcast_(self, tensors, src=0):
        self._collective(None)


@pytest.mark.parametrize("extra", [
    {}, {"curvature": {"fisher": "true"}}, {"method": "vm"},  # scored as gathered
    {"method": "standard"}, {"method": "standard", "curvature": {"fisher": "true"}},  # stored
    {"method": "fvm", "per_validation": True}, {"method": "fvm", "attribution": True},
])
def test_no_collective_runs_inside_a_checkpoint(blobs, extra):
    """The invariant the DDP error handling rests on, over the whole pipeline: the ranks agree
    on a local stage's failure at its checkpoint, so no collective may run inside one."""
    train, val = blobs
    dist = NoCollectiveInsideACheckpoint()
    result = audit(mlp(), train, val, tuning={"steps": 3}, batch_size=8, dist=dist, **extra)
    assert dist.calls > 0
    assert result.config["scored_as_gathered"] == (extra.get("method", "fvm") != "standard"
                                                    and not extra.get("per_validation")
                                                    and "attribution" not in extra)


def test_the_batch_scores_ignore_a_users_autocast():
    """The callback keeps the user's autocast on around the gradient pass (bf16-mixed): the scores
    made there are still computed in the compute dtype, equal to the store's scores made outside."""
    from types import SimpleNamespace

    from lightning_influence.progress import StageTimes
    from lightning_influence.scoring import ScoresAsGathered, self_influence
    from lightning_influence.store import GradientStore

    g = torch.Generator().manual_seed(0)
    shapes = {"a": (4, 96), "b": (4, 96), "c": (2, 160)}
    val = GradientStore(30, shapes, torch.float32)
    val.write(0, {k: torch.randn(30, *s, generator=g) for k, s in shapes.items()})
    train = {k: torch.randn(12, *s, generator=g) for k, s in shapes.items()}
    cpu = torch.device("cpu")
    scorer = ScoresAsGathered(12, AuditOptions(), cpu, torch.float32, StageTimes(cpu), Collectives())
    scorer.fit(SimpleNamespace(store=val, valid=torch.ones(30, dtype=torch.bool)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scorer(0, {k: v[:8] for k, v in train.items()})
        scorer(8, {k: v[8:] for k, v in train.items()})
    stored = GradientStore(12, shapes, torch.float32)
    stored.write(0, train)
    reference = self_influence(stored, scorer.solvers, 12, cpu, torch.float32)
    torch.testing.assert_close(scorer.scores, reference, rtol=1e-5, atol=0)
