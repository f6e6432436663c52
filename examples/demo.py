"""The main job: train a LoRA model through Lightning on noisy digits, audited by the callback.

scikit-learn's 8x8 digits (real images, bundled with scikit-learn) get 20 % of their training
labels flipped. An MLP whose Linear layers carry PEFT LoRA adapters (r=8) is trained with
Lightning, and `InfluenceCallback` audits the training data when `fit` ends: it prints a
summary, logs to TensorBoard (with a gallery of the most harmful digits) and writes every
sample's score to a CSV file. The digits are stored flat (64 features), so the demo passes
`render=` to show them as 8x8 pictures.

It also explains the model's mistakes (``attribution=``): for each validation digit the trained
model gets wrong, the training digits behind the prediction, the most helpful (they lower that
digit's loss) and the most harmful (they raise it), with the planted label flips marked. They go
to every logger (a table per query, a gallery row per query) and to
``influence_scores_attribution.csv`` beside the scores file.

Run: python examples/demo.py [--epochs 40] [--logdir demo_logs] [--gallery docs/gallery.png]
Then: tensorboard --logdir demo_logs
"""
from __future__ import annotations

import argparse
import os
import shutil

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence import AttributionConfig, InfluenceCallback, TuningConfig
from tasks import noisy_digits


class DigitsClassifier(L.LightningModule):
    """An MLP (64 -> 128 -> 128 -> 10) with LoRA adapters on its hidden Linear layers; the
    base weights stay frozen, the adapters and the output layer are trained."""

    def __init__(self, lr: float = 3e-3, rank: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0", "2"], modules_to_save=["4"])
        self.net = get_peft_model(base, config)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--logdir", default="demo_logs")
    parser.add_argument("--gallery", default=None, help="also copy the top-k gallery PNG here")
    parser.add_argument("--explain", type=int, default=5, help="mistakes to print with the training digits behind them")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    split = noisy_digits(rate=args.noise, seed=0)
    train = DataLoader(split.train, batch_size=64, shuffle=True)
    val = DataLoader(split.val, batch_size=256)
    callback = InfluenceCallback(
        method="fvm", solver="hyperinf", params="lora", noisy=split.noisy, clean_labels=split.clean_labels,
        top_k=50, tuning=TuningConfig(steps=300),
        render=lambda i: split.train.x[i].reshape(8, 8),  # the flat 64 features are an 8x8 picture
        describe=lambda i: f"digit image #{i}: given {int(split.train.y[i])}, clean {int(split.clean_labels[i])}",
        attribution=AttributionConfig(k=10, max_queries=20),  # the validation digits the model gets wrong
        render_query=lambda j: split.val.x[j].reshape(8, 8))
    loggers = [TensorBoardLogger(args.logdir, name="digits"), CSVLogger(args.logdir, name="digits_csv")]
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[callback], logger=loggers, accelerator="cpu",
                        log_every_n_steps=10, enable_model_summary=False, deterministic=True)
    trainer.fit(DigitsClassifier(), train, val)

    result = callback.result
    if result is None:
        raise SystemExit(f"the audit failed: {callback.last_error!r}")
    print(f"\nTensorBoard logs: {os.path.abspath(loggers[0].log_dir)}  (tensorboard --logdir {args.logdir})")
    print(f"Every sample's score: {callback.scores_path}")
    explain(result, split, args.explain)
    gallery = os.path.join(loggers[1].log_dir, "influence_gallery.png")
    print(f"The {callback.options.top_k} most harmful digits: {gallery}")
    if args.gallery:
        os.makedirs(os.path.dirname(os.path.abspath(args.gallery)), exist_ok=True)
        shutil.copyfile(gallery, args.gallery)
        print(f"  copied to {args.gallery}")


def explain(result, split, count: int, top: int = 5) -> None:
    """Print, for the first ``count`` explained mistakes, the training digits behind them."""
    a = result.attribution
    flips = split.noisy
    print(f"\nThe model's mistakes ({a.rule}) and the training digits behind them "
          f"(* = a planted label flip, given->clean):")
    for j in range(min(count, len(a))):
        q = int(a.query_ids[j])
        print(f"  validation #{q}: a {int(split.val.y[q])}, predicted {int(a.query_predicted[j])}")
        for side, ids in (("helpful", a.helpful_ids[j]), ("harmful", a.harmful_ids[j])):
            cells = [f"#{i}{'*' if flips[i] else ''} {int(split.train.y[i])}"
                     + (f"->{int(split.clean_labels[i])}" if flips[i] else "") for i in ids[:top].tolist()]
            share = int(flips[ids].sum())
            print(f"    {side:8s} {', '.join(cells)}   ({share}/{a.k} of the top {a.k} flipped)")
    share = float(flips[a.harmful_ids].float().mean())
    print(f"  over all {len(a)} mistakes: {100 * share:.0f}% of the top-{a.k} harmful training digits are flips, "
          f"{100 * float(flips[a.helpful_ids].float().mean()):.0f}% of the helpful ones "
          f"({100 * float(flips.float().mean()):.0f}% of the training set)")


if __name__ == "__main__":
    main()
