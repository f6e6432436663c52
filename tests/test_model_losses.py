"""The default per-sample loss equals, sample by sample, the loss the model itself reports for
that sample alone: causal LMs (GPT-2, Llama), a BERT classifier (single-label and regression),
token classification and masked LM, bare, PEFT-wrapped, held inside a wrapper module, and
compiled. The reference is always the model's own ``.loss``, never the library's code."""
from __future__ import annotations

import pytest
import torch

import hf_models as hf
from lightning_influence.losses import BatchFormatError, LossMismatchError, default_loss


def _token_cls_samples(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        labels = torch.randint(0, 4, (length,), generator=g)
        labels[0] = -100  # e.g. a [CLS] position
        out.append({"input_ids": torch.randint(3, hf.VOCAB, (length,), generator=g), "labels": labels})
    return out


def _mlm_samples(n=5, seed=2):
    samples = hf.lm_samples(n, seed, prompt_masked=False)
    g = torch.Generator().manual_seed(seed)
    for s in samples:
        keep = torch.rand(len(s["labels"]), generator=g) < 0.4
        keep[0] = True
        s["labels"] = torch.where(keep, s["labels"], torch.full_like(s["labels"], -100))
    return samples


def _cls_samples(n=5, seed=3, regression=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in hf.lm_samples(n, seed, prompt_masked=False):
        label = (torch.randn((), generator=g, dtype=torch.float64) if regression
                 else torch.randint(0, 3, (), generator=g))
        out.append({"input_ids": s["input_ids"], "labels": label})
    return out


CASES = {
    "gpt2": (lambda: hf.gpt2(), hf.lm_samples, ("CAUSAL_LM", ["c_attn"])),
    "gpt2-untied": (lambda: hf.gpt2(tie=False), hf.lm_samples, ("CAUSAL_LM", ["c_attn"])),
    "llama": (lambda: hf.llama(), hf.lm_samples, ("CAUSAL_LM", ["q_proj", "v_proj"])),
    "bert-cls": (lambda: hf.bert_classifier(), _cls_samples, ("SEQ_CLS", ["query", "value"])),
    "bert-regression": (lambda: hf.bert_classifier(num_labels=1), lambda: _cls_samples(regression=True),
                        ("SEQ_CLS", ["query", "value"])),
    "bert-token-cls": (lambda: hf.bert_token_classifier(), _token_cls_samples, ("TOKEN_CLS", ["query", "value"])),
    "bert-mlm": (lambda: hf.bert_masked_lm(), _mlm_samples, (None, ["query", "value"])),
}


def _wrap(model, how, lora):
    if how == "peft":
        task, targets = lora
        if task is None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
        else:
            model = hf.with_lora(model, task, targets)
        return model, model
    if how == "holder":
        return hf.Holder(model), model
    if how == "logits-only":
        return hf.LogitsOnlyHolder(model), model
    if how == "no-forward":
        return hf.NoForwardHolder(model), model
    if how == "compiled":
        return torch.compile(model, backend="eager"), model
    return model, model


@pytest.mark.parametrize("how", ["bare", "peft", "holder", "logits-only", "no-forward", "compiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_loss_is_the_models_own_loss(case, how):
    make, samples_of, lora = CASES[case]
    if how == "logits-only" and case in ("bert-cls", "bert-regression"):
        pytest.skip("the logits-only wrapper is for token models")
    model, reference = _wrap(make(), how, lora)
    model.eval()
    samples = samples_of()
    batch = hf.pad(samples)
    got = default_loss(model, batch).losses
    expected = torch.tensor([hf.own_loss_alone(reference, s) for s in samples], dtype=got.dtype)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_causal_lm_losses_are_not_the_unshifted_ones():
    """Guards the test above: with the shift, the losses really differ from the unshifted ones."""
    from lightning_influence.losses import cross_entropy_per_sample

    model = hf.gpt2().eval()
    batch = hf.pad(hf.lm_samples())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    unshifted = cross_entropy_per_sample(logits, batch["labels"], shift=False)
    assert (default_loss(model, batch).losses - unshifted).abs().max() > 1e-2


def test_a_model_with_another_loss_is_refused():
    """Label smoothing inside the model: neither candidate reproduces its loss -> a clear error."""
    model = hf.gpt2().eval()

    class Smoothed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None, labels=None):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            if labels is not None:
                shifted = labels[:, 1:].reshape(-1)
                out.loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, hf.VOCAB), shifted,
                                                             label_smoothing=0.2)
            return out

    with pytest.raises(LossMismatchError, match="loss_fn"):
        default_loss(Smoothed(), hf.pad(hf.lm_samples()))


def test_a_key_the_forward_does_not_take_is_named():
    model = hf.LogitsOnlyHolder(hf.gpt2())
    batch = {**hf.pad(hf.lm_samples()), "sample_index": torch.arange(5)}
    with pytest.raises(BatchFormatError, match=r"sample_index.*loss_fn"):
        default_loss(model, batch)
