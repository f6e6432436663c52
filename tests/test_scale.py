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
    # fvm scores as it gathers (only its validation store spills); with a per-validation matrix
    # its training gradients are stored, and spill, as standard's do
    for method, extra in (("fvm", {}), ("fvm", {"per_validation": True}), ("standard", {})):
        ref = audit(model, train, val, method=method, tuning={"steps": 5}, **extra)
        spilled = audit(model, train, val, method=method, tuning={"steps": 5}, max_memory=1024,
                        spill_dir=str(tmp_path / "spill"), **extra)
        torch.testing.assert_close(spilled.influence, ref.influence, rtol=1e-6, atol=0)
        assert not (tmp_path / "spill").exists()  # the spill files, and the folder the audit made, removed


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


def _dense_hyperinf_scores(train: dict, curv: dict, lam: float, direction: dict = None) -> torch.Tensor:
    """The reference, dense and direct: per block ``A = (1/N) Σ g_iᵀ g_i + λI`` ``(d, d)`` solved
    with ``torch.linalg.solve``; ``Σ_l ⟨g_l, g_l A_l⁻¹⟩`` per sample, or ``− Σ_l ⟨v_l A_l⁻¹, g_l⟩``."""
    total = 0
    for name, g in train.items():
        c = curv[name].reshape(-1, g.shape[-1])
        a = c.T @ c / curv[name].shape[0] + lam * torch.eye(g.shape[-1], dtype=torch.float64)
        if direction is None:
            total = total + (g * torch.linalg.solve(a, g.transpose(1, 2)).transpose(1, 2)).sum((1, 2))
        else:
            total = total - (g * torch.linalg.solve(a, direction[name].T).T).sum((1, 2))  # v: (r, d)
    return total


def test_chunked_streaming_equals_dense_reference_and_reads_within_budget(tmp_path, monkeypatch):
    """A budget of 3 rows of every block per chunk (a spilled store, 17 chunks for 50 rows, the
    largest block most of each row): the vm and standard scores equal a dense solve's and the
    unbudgeted run's, and no read ever holds more than the budget's rows × numbers."""
    from lightning_influence.config import CurvatureConfig
    from lightning_influence.scoring import fit_solvers, method_scores
    from lightning_influence.store import chunk_bytes

    gen = torch.Generator().manual_seed(0)
    shapes = {"big": (4, 24), "bias": (1, 24), "small": (2, 5)}
    train = {k: torch.randn(50, r, d, generator=gen, dtype=torch.float64) for k, (r, d) in shapes.items()}
    val = {k: torch.randn(30, r, d, generator=gen, dtype=torch.float64) for k, (r, d) in shapes.items()}
    valid = torch.ones(30, dtype=torch.bool)
    valid[7] = False
    row = sum(r * d for r, d in shapes.values()) * 8
    budget = 8 * 3 * row  # chunk_bytes = 3 rows
    assert chunk_bytes(budget) == 3 * row
    reads, chunks = [], []
    real_read, real_chunks = GradientStore._read_into, GradientStore.group_chunks

    def read_into(self, name, start, out):
        reads.append(out.numel() * out.element_size())
        return real_read(self, name, start, out)

    def group_chunks(self, size):
        for start, groups in real_chunks(self, size):
            chunks.append(sum(t.numel() * t.element_size() for t in groups.values()))
            yield start, groups

    monkeypatch.setattr(GradientStore, "_read_into", read_into)
    monkeypatch.setattr(GradientStore, "group_chunks", group_chunks)
    config = CurvatureConfig(damping=0.05, damping_rule="absolute", solver_options={"tol": 1e-12, "max_iter": 200})
    cpu = torch.device("cpu")
    results = {}
    for label, max_memory in (("none", None), ("budget", budget)):
        spill = str(tmp_path / label)
        with GradientStore(50, shapes, torch.float64, max_memory, spill) as store, \
                GradientStore(30, shapes, torch.float64) as vstore:
            store.write(0, train)
            vstore.write(0, val)
            rows = store.chunk_size(chunk_bytes(max_memory))
            assert store.spilled == (max_memory is not None) and rows == (50 if max_memory is None else 3)
            solvers = fit_solvers(vstore, valid, "hyperinf", config, cpu, torch.float64, rows)
            vm = method_scores("vm", store, vstore, valid, float(valid.sum()), solvers, rows, cpu, torch.float64)
            std = method_scores("standard", store, vstore, valid, float(valid.sum()), solvers, rows, cpu,
                                torch.float64)
            results[label] = (vm, std)
    curv = {k: v[valid] for k, v in val.items()}
    mean = {k: v.mean(0) for k, v in curv.items()}
    ref_vm = _dense_hyperinf_scores(train, curv, 0.05)
    ref_std = _dense_hyperinf_scores(train, curv, 0.05, mean)
    for vm, std in results.values():
        torch.testing.assert_close(vm, ref_vm, rtol=1e-9, atol=0)
        torch.testing.assert_close(std, ref_std, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(results["budget"][0], results["none"][0], rtol=1e-12, atol=0)
    assert reads and max(reads) <= 3 * row and len(reads) >= 3 * 17  # every block of every 3-row chunk
    budgeted = chunks[-17:]  # the last pass: the standard scores over the spilled store
    assert max(budgeted) <= 3 * row


def test_audit_under_a_budget_streams_blocks_by_sample_chunks(blobs, tmp_path, monkeypatch):
    """audit() with a budget of 2 rows per chunk: the same scores as without one (float64), and no
    chunk of any store (training, validation) holds more rows × numbers than the budget."""
    from lightning_influence.store import chunk_bytes

    train, val = blobs
    model = mlp(hidden=32)
    numbers = sum(p.numel() for p in model.parameters())
    budget = 8 * 2 * numbers * 8
    sizes = []
    real = GradientStore.group_chunks

    def group_chunks(self, size):
        for start, groups in real(self, size):
            sizes.append(sum(t.numel() * t.element_size() for t in groups.values()))
            yield start, groups

    whole = []
    real_block = GradientStore.block

    def block(self, name, rows=None):
        out = real_block(self, name, rows)
        if out.numel() * out.element_size() > chunk_bytes(budget):
            whole.append(name)  # a read of more rows than a chunk holds
        return out

    ref = audit(model, train, val, method="standard", params="trainable")
    monkeypatch.setattr(GradientStore, "group_chunks", group_chunks)
    monkeypatch.setattr(GradientStore, "block", block)
    got = audit(model, train, val, method="standard", params="trainable", max_memory=budget,
                spill_dir=str(tmp_path))
    torch.testing.assert_close(got.influence, ref.influence, rtol=1e-9, atol=0)
    assert len(sizes) >= 40 // 2 and max(sizes) <= chunk_bytes(budget) == 2 * numbers * 8
    assert not whole
