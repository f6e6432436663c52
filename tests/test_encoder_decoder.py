"""Encoder-decoders (T5, BART from small configs) with the default loss: bare, PEFT LoRA on
q/v, and inside a LightningModule. Batches ``{input_ids, attention_mask, labels}`` with labels
padded with -100: each sample's loss is the model's own ``loss`` for that sample alone (the
decoder reads the labels shifted right, which the model builds itself), and each sample's
gradient is autograd of that loss, in float64, on the fast (Linear) and the vmap path; the
pre-flight check, the callback and ``audit()`` run on them."""
from __future__ import annotations

import warnings

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import hf_models as hf
from lightning_influence import AuditOptions, InfluenceCallback, audit
from lightning_influence.gradients import gradient_mode, per_sample_gradients
from lightning_influence.losses import default_loss
from lightning_influence.params import select_blocks
from lightning_influence.preflight import check

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*validation tuning")]
VOCAB = 100


def t5(dtype=torch.float64) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).to(dtype).eval()


def bart(dtype=torch.float64) -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return BartForConditionalGeneration(config).to(dtype).eval()


MODELS = {"t5": (t5, 0, ["q", "v"]), "bart": (bart, 1, ["q_proj", "v_proj"])}
#: non-Linear parameters (vmap path) and Linear weights (fast path) of the bare models; not the key
#: projections' biases, whose gradient is exactly 0 (softmax ignores a shift of every key alike)
BARE_PARAMS = {"t5": ["shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      "decoder.block.1.layer.2.layer_norm.weight", "encoder.block.1.layer.0.SelfAttention.q.weight",
                      "decoder.block.0.layer.1.EncDecAttention.v.weight"],
               "bart": ["model.shared.weight", "model.encoder.embed_positions.weight",
                        "model.decoder.layers.1.final_layer_norm.*", "model.encoder.layers.0.self_attn.q_proj.*",
                        "model.decoder.layers.0.encoder_attn.v_proj.weight"]}


def samples(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Source sequences of 4-9 tokens and target sequences of 2-6, of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        source, target = int(torch.randint(4, 10, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g))
        out.append({"input_ids": torch.randint(3, VOCAB, (source,), generator=g),
                    "labels": torch.randint(3, VOCAB, (target,), generator=g)})
    return out


def collate(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded sources (pad id, attention mask) and targets (-100)."""
    size, source = len(items), max(len(it["input_ids"]) for it in items)
    target = max(len(it["labels"]) for it in items)
    batch = {"input_ids": torch.full((size, source), pad_id),
             "attention_mask": torch.zeros(size, source, dtype=torch.long),
             "labels": torch.full((size, target), -100)}
    for i, it in enumerate(items):
        batch["input_ids"][i, :len(it["input_ids"])] = it["input_ids"]
        batch["attention_mask"][i, :len(it["input_ids"])] = 1
        batch["labels"][i, :len(it["labels"])] = it["labels"]
    return batch


class Pairs(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def loader(items, pad_id: int, batch_size: int = 4) -> DataLoader:
    return DataLoader(Pairs(items), batch_size=batch_size, collate_fn=lambda b: collate(b, pad_id))


def wrapped(name: str, wrapper: str, dtype=torch.float64):
    """``(model to audit, the Hugging Face model inside it)``."""
    make, _, targets = MODELS[name]
    model = make(dtype)
    if wrapper in ("peft", "module"):
        model = hf.with_lora(model, "SEQ_2_SEQ_LM", targets).eval()
    inner = model.get_base_model() if wrapper != "bare" else model
    return (hf.NoForwardHolder(model) if wrapper == "module" else model), inner


def own_loss(inner: nn.Module, sample: dict[str, torch.Tensor], pad_id: int) -> torch.Tensor:
    return inner(**collate([sample], pad_id)).loss


@pytest.mark.parametrize("wrapper", ["bare", "peft", "module"])
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_each_samples_loss_is_the_models_own_loss_for_it_alone(name, wrapper):
    model, inner = wrapped(name, wrapper)
    pad_id = MODELS[name][1]
    items = samples(5)
    assert len({len(s["labels"]) for s in items}) > 1 and len({len(s["input_ids"]) for s in items}) > 1  # padded
    with torch.no_grad():
        got = default_loss(model, collate(items, pad_id)).losses
        expected = torch.stack([own_loss(inner, s, pad_id) for s in items])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _autograd_alone(inner, blocks, items, pad_id) -> dict[str, torch.Tensor]:
    rows = []
    with gradient_mode(inner, blocks):
        for s in items:
            found = torch.autograd.grad(own_loss(inner, s, pad_id), [b.param for b in blocks], allow_unused=True)
            rows.append([b.to_matrix((torch.zeros_like(b.param) if g is None else g).unsqueeze(0))[0]
                         for b, g in zip(blocks, found)])
    return {b.name: torch.stack([r[i] for r in rows]) for i, b in enumerate(blocks)}


@pytest.mark.parametrize("wrapper", ["bare", "peft", "module"])
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_per_sample_gradients_are_autograd_of_each_sample_alone(name, wrapper):
    model, inner = wrapped(name, wrapper)
    pad_id = MODELS[name][1]
    items = samples(4, seed=1)
    blocks = select_blocks(model, BARE_PARAMS[name] if wrapper == "bare" else "auto")
    assert any(b.linear is None for b in blocks) == (wrapper == "bare")  # the vmap path on the bare models
    expected = _autograd_alone(inner, blocks, items, pad_id)  # the same parameter objects
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*falling back to one backward per sample")  # vmap must work
        with gradient_mode(model, blocks):
            got, _ = per_sample_gradients(model, blocks, collate(items, pad_id))
    for b in blocks:
        assert expected[b.name].norm() > 0, b.name
        error = float((got[b.name] - expected[b.name]).norm() / expected[b.name].norm())
        assert error < 1e-9, (b.name, error)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_the_check_compares_with_the_models_own_loss_and_passes_every_trainable_parameter(name):
    """``params="trainable"``: every parameter, the key biases (gradient exactly 0) included."""
    model, _ = wrapped(name, "bare", torch.float32)
    data = loader(samples(6), MODELS[name][1])
    report = check(model, data, data, AuditOptions(params="trainable"))
    assert report.loss_reference == "the model's own loss" and report.loss_error < 1e-5
    assert max(report.gradient_error.values()) < 1e-4


class Seq2Seq(L.LightningModule):
    """The LightningModule users write: training_step returns the model's own loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_the_callback_audits_a_peft_encoder_decoder_in_a_lightning_module(tmp_path, name):
    model, _ = wrapped(name, "peft", torch.float32)
    pad_id = MODELS[name][1]
    cb = InfluenceCallback(tuning={"steps": 4}, scores_filename=None, solver="datainf")
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_epochs=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[cb])
    trainer.fit(Seq2Seq(model), loader(samples(16), pad_id), loader(samples(8, seed=2), pad_id))
    report = cb.preflight_report
    assert report.loss_reference == "the model's own loss" and report.loss_error < 1e-5
    assert report.gradient_error and max(report.gradient_error.values()) < 1e-4
    assert cb.result is not None and bool(torch.isfinite(cb.result.influence).all())
    assert float(cb.result.influence.std()) > 0


def test_audit_of_a_peft_bart_scores_every_sample():
    model, _ = wrapped("bart", "peft", torch.float32)
    result = audit(model, loader(samples(12), 1), loader(samples(6, seed=3), 1), method="standard", solver="exact")
    assert result.scores.shape == (12,) and bool(torch.isfinite(result.influence).all())
    assert result.preflight.loss_reference == "the model's own loss"
