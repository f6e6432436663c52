"""Scale features on one process: the spilling gradient store and gradient projection."""
from __future__ import annotations

import os

import torch

from helpers import mlp
from lightning_influence import audit
from lightning_influence.gradients import gradient_mode, per_sample_gradients
from lightning_influence.params import select_blocks
from lightning_influence.projection import project_blocks
from lightning_influence.store import GradientStore


def test_store_spills_and_reads_back(tmp_path):
    shapes = {"a": (3, 4), "b": (2, 5)}
    g = {"a": torch.randn(10, 3, 4), "b": torch.randn(10, 2, 5)}
    with GradientStore(10, shapes, max_memory=100, spill_dir=str(tmp_path)) as store:
        assert store.spilled and not store.blocks  # nothing kept in RAM
        store.write(0, {k: v[:6] for k, v in g.items()})
        store.write(6, {k: v[6:] for k, v in g.items()})
        for k in g:
            assert torch.equal(store.block(k), g[k])
            assert torch.equal(store.block(k, slice(3, 8)), g[k][3:8])
        assert [start for start, _ in store.chunks(4)] == [0, 4, 8]
        directory = store.directory
        assert os.listdir(directory)
    assert not os.path.exists(directory)


def test_spilled_audit_equals_in_memory(blobs, tmp_path):
    train, val = blobs
    model = mlp()
    for method in ("fvm", "standard"):
        ref = audit(model, train, val, method=method, tuning={"steps": 5})
        spilled = audit(model, train, val, method=method, tuning={"steps": 5}, max_memory=1024,
                        spill_dir=str(tmp_path / "spill"))
        torch.testing.assert_close(spilled.influence, ref.influence, rtol=1e-6, atol=0)
        assert os.listdir(tmp_path / "spill") == []  # spill files removed afterwards


def test_projection_sketches_the_full_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3)).double()
    x, y = torch.randn(6, 50, dtype=torch.float64), torch.randint(0, 3, (6,))
    full_blocks = select_blocks(model, "trainable")
    with gradient_mode(model, full_blocks):
        full, _ = per_sample_gradients(model, full_blocks, (x, y))
    blocks = project_blocks(select_blocks(model, "trainable"), 8)
    assert blocks[0].shape == (8, 8) and blocks[2].shape == (3, 8)
    with gradient_mode(model, blocks):
        sketch, _ = per_sample_gradients(model, blocks, (x, y))
    b = blocks[0]
    torch.testing.assert_close(sketch[b.name], b.projection[0].T @ full[b.name] @ b.projection[1])


def test_projection_keeps_scores_correlated(blobs):
    train, val = blobs
    model = mlp(d_in=8, hidden=64)
    full = audit(model, train, val, method="fvm", tuning={"steps": 5})
    sketched = audit(model, train, val, method="fvm", tuning={"steps": 5}, projection=32)
    assert sketched.config["projection"] == 32
    rank = lambda s: s.argsort().argsort().double()  # noqa: E731
    rho = float(torch.corrcoef(torch.stack([rank(full.influence), rank(sketched.influence)]))[0, 1])
    assert rho > 0.8
