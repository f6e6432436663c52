"""Per-sample gradients equal a batch-size-1 autograd loop (float64, 1e-5)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from helpers import TokenDataset, mlp, pad_collate, tiny_bert_lora
from lightning_influence.gradients import gradient_mode, per_sample_gradients
from lightning_influence.losses import default_loss
from lightning_influence.params import select_blocks


def loop_reference(model, blocks, samples):
    """One backward per sample, each sample alone (no padding)."""
    rows = []
    with gradient_mode(model, blocks):
        for batch in samples:
            loss = default_loss(model, batch).losses.sum()
            grads = torch.autograd.grad(loss, [b.param for b in blocks])
            rows.append({b.name: b.to_matrix(g.unsqueeze(0))[0] for b, g in zip(blocks, grads)})
    return {b.name: torch.stack([r[b.name] for r in rows]) for b in blocks}


def test_lora_padded_batches_match_per_sample_loop():
    model = tiny_bert_lora()
    blocks = select_blocks(model, "auto")
    assert blocks and all(("lora_A" in b.name or "lora_B" in b.name) for b in blocks)
    assert all(b.linear is not None for b in blocks)  # the fast activation x output-grad path
    data = TokenDataset(n=10)
    assert len(set(data.lengths.tolist())) > 2  # really variable lengths
    singles = [pad_collate([data[i]]) for i in range(len(data))]
    expected = loop_reference(model, blocks, singles)
    got = {b.name: [] for b in blocks}
    with gradient_mode(model, blocks):
        for batch in DataLoader(data, batch_size=4, collate_fn=pad_collate):
            grads, _ = per_sample_gradients(model, blocks, batch)
            for name, g in grads.items():
                got[name].append(g)
    for b in blocks:
        torch.testing.assert_close(torch.cat(got[b.name]), expected[b.name], rtol=1e-5, atol=1e-9)
    assert blocks[0].shape[0] == 4  # rank-r rows: (r, d)


def test_lora_b_is_transposed_to_rank_rows():
    model = tiny_bert_lora()
    shapes = {b.name.split(".")[-3]: b.shape for b in select_blocks(model, "lora")}
    assert shapes["lora_A"] == (4, 16) and shapes["lora_B"] == (4, 16)


def test_mlp_trainable_matches_per_sample_loop():
    model = mlp()
    blocks = select_blocks(model, "trainable")
    assert len(blocks) == 4 and {b.role for b in blocks} == {"weight", "bias"}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    expected = loop_reference(model, blocks, [(x[i:i + 1], y[i:i + 1]) for i in range(9)])
    with gradient_mode(model, blocks):
        grads, out = per_sample_gradients(model, blocks, (x, y))
    assert out.losses.shape == (9,)
    for b in blocks:
        torch.testing.assert_close(grads[b.name], expected[b.name], rtol=1e-5, atol=1e-12)


def test_generic_fallback_matches_loop():
    """Non-Linear parameters (LayerNorm) go through torch.func and agree too."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)).double()
    blocks = select_blocks(model, ["1.*", "2.weight"])
    assert {b.role for b in blocks} == {"generic", "weight"}
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    expected = loop_reference(model, blocks, [(x[i:i + 1], y[i:i + 1]) for i in range(6)])
    with gradient_mode(model, blocks):
        grads, _ = per_sample_gradients(model, blocks, (x, y))
    for b in blocks:
        torch.testing.assert_close(grads[b.name], expected[b.name], rtol=1e-5, atol=1e-12)


def test_dropout_is_off_and_modes_restored():
    model = tiny_bert_lora()
    model.train()
    blocks = select_blocks(model, "lora")
    batch = pad_collate([TokenDataset(n=4)[i] for i in range(4)])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with gradient_mode(model, blocks):
        a, _ = per_sample_gradients(model, blocks, batch)
        b, _ = per_sample_gradients(model, blocks, batch)
    for name in a:
        assert torch.equal(a[name], b[name])  # deterministic: dropout off
    assert model.training and all(m.training for m in model.modules())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
