"""Per-sample gradients against an independent reference: autograd of the model's own loss
on each sample alone (float64, relative error <= 1e-4), on set-ups beyond plain MLPs: causal
LMs with padding (LoRA), tied and shared weights without LoRA, custom batch containers, and a
CNN with batch norm, in full and with PEFT LoRA on its Conv2d layers."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import hf_models as hf
from lightning_influence.gradients import gradient_mode, per_sample_gradients
from lightning_influence.losses import BatchFormatError
from lightning_influence.params import select_blocks


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def own_loss_gradients(model, blocks, samples):
    """(n, r, d) per block: autograd of ``model(**sample).loss`` for each sample alone."""
    rows = []
    with gradient_mode(model, blocks):
        for s in samples:
            loss = model(**hf.pad([s])).loss
            grads = torch.autograd.grad(loss, [b.param for b in blocks], allow_unused=True)
            rows.append([b.to_matrix((torch.zeros_like(b.param) if g is None else g).unsqueeze(0))[0]
                         for b, g in zip(blocks, grads)])
    return {b.name: torch.stack([r[i] for r in rows]) for i, b in enumerate(blocks)}


def check_against_own_loss(model, params, samples):
    blocks = select_blocks(model, params)
    expected = own_loss_gradients(model, blocks, samples)
    with gradient_mode(model, blocks):
        got, _ = per_sample_gradients(model, blocks, hf.pad(samples))
    for b in blocks:
        assert expected[b.name].norm() > 0, b.name
        assert rel_err(got[b.name], expected[b.name]) <= 1e-4, (b.name, rel_err(got[b.name], expected[b.name]))
    return blocks


@pytest.mark.parametrize("make,targets", [(hf.gpt2, ["c_attn"]), (hf.llama, ["q_proj", "v_proj"])])
def test_causal_lm_lora_padded_batches_match_the_models_own_loss(make, targets):
    model = hf.with_lora(make(), "CAUSAL_LM", targets).eval()
    samples = hf.lm_samples(5)
    assert len({len(s["input_ids"]) for s in samples}) > 1  # really padded
    blocks = check_against_own_loss(model, "auto", samples)
    assert blocks and all(b.linear is not None for b in blocks)  # LoRA took the fast path


def test_tied_embedding_gradient_covers_both_uses():
    """GPT-2 without LoRA: lm_head.weight is wte.weight; its gradient has two parts."""
    model = hf.gpt2(tie=True).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    blocks = check_against_own_loss(model, ["transformer.wte.weight", "transformer.h.1.ln_2.*"], hf.lm_samples(4))
    assert blocks[0].linear is None  # the tied weight is not taken for a plain Linear weight


class TwiceUsed(nn.Module):
    """One Linear weight used by the layer and again functionally: a shared parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(6, 6)
        self.alias = nn.Module()
        self.alias.weight = self.inner.weight  # a second module holds the same parameter
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        h = torch.tanh(h @ self.alias.weight.T)
        return self.head(h)


def test_a_weight_held_by_two_modules_gets_its_full_gradient():
    model = TwiceUsed().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    blocks = select_blocks(model, ["inner.weight", "head.weight"])
    rows = []
    with gradient_mode(model, blocks):
        for i in range(5):
            loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
            rows.append(torch.autograd.grad(loss, [b.param for b in blocks]))
        got, _ = per_sample_gradients(model, blocks, (x, y))
    for j, b in enumerate(blocks):
        expected = b.to_matrix(torch.stack([r[j] for r in rows]))
        assert rel_err(got[b.name], expected) <= 1e-4, b.name


@dataclasses.dataclass
class Batch:
    features: torch.Tensor
    target: torch.Tensor
    note: str = "a custom container"


class Opaque:
    """Not a dataclass, not a pytree: its tensors are invisible to a generic splitter."""

    def __init__(self, features, target):
        self.features, self.target = features, target


def _loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch.features), batch.target, reduction="none")


def _layer_norm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3)).double()


def test_dataclass_batch_with_a_layer_norm_block_is_split_per_sample():
    model = _layer_norm_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    blocks = select_blocks(model, ["1.weight", "1.bias", "3.weight"])
    assert {b.role for b in blocks} == {"generic", "weight"}
    with gradient_mode(model, blocks):
        got, out = per_sample_gradients(model, blocks, Batch(x, y), _loss_fn)
        for i in range(6):
            loss = _loss_fn(model, Batch(x[i:i + 1], y[i:i + 1])).sum()
            for b, gr in zip(blocks, torch.autograd.grad(loss, [b.param for b in blocks])):
                assert rel_err(got[b.name][i], b.to_matrix(gr.unsqueeze(0))[0]) <= 1e-4, (b.name, i)
    assert out.losses.shape == (6,)


def test_an_opaque_batch_is_refused_not_given_the_batch_gradient():
    model = _layer_norm_model()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    blocks = select_blocks(model, ["1.weight"])
    with gradient_mode(model, blocks), pytest.raises(BatchFormatError, match="split"):
        per_sample_gradients(model, blocks, Opaque(x, y), _loss_fn)


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm2d + pooling + Linear head over 8x8 single-channel images."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x.reshape(-1, 1, 8, 8))))
        return self.head(nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2).flatten(1))


def _cnn_reference(model, blocks, x, y):
    rows = []
    with gradient_mode(model, blocks):
        for i in range(len(y)):
            loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
            grads = torch.autograd.grad(loss, [b.param for b in blocks])
            rows.append([b.to_matrix(g.unsqueeze(0))[0] for b, g in zip(blocks, grads)])
    return {b.name: torch.stack([r[i] for r in rows]) for i, b in enumerate(blocks)}


@pytest.mark.parametrize("lora", [False, True])
def test_conv_net_per_sample_gradients_match_autograd(lora):
    """A vision model: every parameter of a CNN with batch norm (its running statistics
    updated first, then eval mode), and PEFT LoRA on its Conv2d layers (conv ``lora_A``,
    1x1-conv ``lora_B``) and head, against autograd on each image alone."""
    model = SmallCNN().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(7, 64, generator=g, dtype=torch.float64), torch.randint(0, 5, (7,), generator=g)
    model.train()
    model(torch.rand(32, 64, generator=g, dtype=torch.float64))  # non-trivial running statistics
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1, generator=g)  # B = 0 at init would make A's gradient 0
    model.eval()
    blocks = select_blocks(model, "auto" if lora else "trainable")
    if lora:
        assert {b.name.split(".lora_")[1][0] for b in blocks} == {"A", "B"} and len(blocks) == 6
        assert any(b.param.dim() == 4 for b in blocks)  # the conv LoRA factors are 4-d
    expected = _cnn_reference(model, blocks, x, y)

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")

    with gradient_mode(model, blocks):
        got, _ = per_sample_gradients(model, blocks, (x, y), loss_fn=loss_fn)
    for b in blocks:
        assert expected[b.name].norm() > 0, b.name
        assert rel_err(got[b.name], expected[b.name]) <= 1e-6, (b.name, rel_err(got[b.name], expected[b.name]))
        assert not got[b.name].requires_grad, b.name  # no graph kept alive past the batch


@pytest.mark.parametrize("make", [hf.gpt2, hf.llama])
def test_embedding_lora_and_layer_norm_are_vmapped_and_match_the_models_own_loss(make):
    """Non-Linear parameters of a Hugging Face LM with padding (LoRA on the token embedding,
    and a norm layer's weight): its sdpa mask code branches on the mask's values, which vmap
    can't trace, so they are vmapped under eager attention, not looped over one sample at a
    time, and the model's attention setting is back afterwards."""
    model = hf.with_lora(make(), "CAUSAL_LM", ["embed_tokens" if make is hf.llama else "wte"]).eval()
    norm = "model.norm.weight" if make is hf.llama else "transformer.ln_f.weight"
    for name, p in model.named_parameters():
        if "lora_embedding_A" in name:
            nn.init.normal_(p, std=0.1)  # B is already random (with_lora); A = 0 would hide B's gradient
        if name.endswith(norm):
            p.requires_grad_(True)
    base = model.get_base_model()
    assert base.config._attn_implementation == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the per-sample loop's "can't be vmapped" warning
        warnings.filterwarnings("ignore", message=".*(fan_in_fan_out|loss_type).*")
        blocks = check_against_own_loss(model, ["*lora_embedding*", f"*{norm}"], hf.lm_samples(5))
    assert len(blocks) == 3 and all(b.linear is None for b in blocks)
    assert base.config._attn_implementation == "sdpa"
