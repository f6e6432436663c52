"""Small Hugging Face models built from configs (no hub), their wrappers, and padded batches.

Shared by the tests that check the default loss and the per-sample gradients against each
model's own loss and against autograd, sample by sample.
"""
from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as L
import torch
from torch import nn

VOCAB = 40


def gpt2(tie: bool = True, dtype=torch.float64, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1,
                        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie)
    return GPT2LMHeadModel(config).to(dtype)


def llama(dtype=torch.float64, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).to(dtype)


def bert_classifier(num_labels: int = 3, dtype=torch.float64, seed: int = 0, **extra) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)
    return BertForSequenceClassification(config).to(dtype)


def bert_token_classifier(dtype=torch.float64, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=4,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForTokenClassification(config).to(dtype)


def bert_masked_lm(dtype=torch.float64, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config).to(dtype)


def with_lora(model: nn.Module, task_type: str, targets: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                               task_type=task_type, fan_in_fan_out=False))
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)  # LoRA B starts at zero; make every gradient non-trivial
    return wrapped


class Holder(L.LightningModule):
    """A LightningModule holding the HF model as an attribute; forward takes the mapping's
    keys and returns the HF output (as most LightningModules written for HF models do)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch)


class LogitsOnlyHolder(L.LightningModule):
    """A wrapper whose forward takes only ``input_ids``/``attention_mask`` and returns logits:
    the model's own loss can't be asked through it (the inner HF model is asked instead)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class NoForwardHolder(L.LightningModule):
    """A LightningModule without a forward of its own: its training_step calls ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss


def lm_samples(n: int = 5, seed: int = 0, prompt_masked: bool = True) -> list[dict[str, torch.Tensor]]:
    """Variable-length token sequences; labels = input ids with the first tokens (the prompt)
    masked with -100, as instruction tuning does."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        labels = ids.clone()
        if prompt_masked:
            labels[: int(torch.randint(1, length - 2, (1,), generator=g))] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def pad(items: list[dict[str, torch.Tensor]], label_pad: int = -100) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into a batch (pad id 0, attention mask, labels -100)."""
    longest = max(len(it["input_ids"]) for it in items)
    batch = {"input_ids": torch.zeros(len(items), longest, dtype=torch.long),
             "attention_mask": torch.zeros(len(items), longest, dtype=torch.long)}
    per_token = items[0]["labels"].dim() == 1
    batch["labels"] = (torch.full((len(items), longest), label_pad, dtype=torch.long) if per_token
                       else torch.stack([it["labels"] for it in items]))
    for i, it in enumerate(items):
        k = len(it["input_ids"])
        batch["input_ids"][i, :k] = it["input_ids"]
        batch["attention_mask"][i, :k] = 1
        if per_token:
            batch["labels"][i, :k] = it["labels"]
    return batch


def own_loss_alone(model: nn.Module, sample: dict[str, torch.Tensor]) -> float:
    """The model's own ``.loss`` for one sample, alone in its batch (no padding)."""
    with torch.no_grad():
        return float(model(**pad([sample])).loss)


Factory = Callable[[], nn.Module]
