"""A causal LM: LoRA fine-tune of a small GPT-2 on instruction data with planted bad responses.

A character-level GPT-2 (built from a small ``GPT2Config``; nothing is downloaded) is first
"pretrained" in full on clean samples of the format ``<task> <letters>=<response>``
(tasks: copy, sort, reverse). It is then wrapped with PEFT LoRA (``c_attn``) and
fine-tuned through a Lightning ``Trainer`` on ``reverse <letters>=`` instructions, where
a share of the training responses (default 20 %) is replaced by a random wrong string.
``InfluenceCallback`` audits the fine-tune when ``fit`` ends, with the default per-sample
loss (the library asks the model whether its labels shift, as causal LMs do): labels are the
input ids with the prompt and the padding masked by -100, so only response tokens count.

Run: python examples/causal_lm_lora.py [--n-train 800] [--epochs 4] [--seed 0] [--out demo_logs]
     python examples/causal_lm_lora.py --quick      # tiny sizes, a smoke test
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lightning_influence import InfluenceCallback, TuningConfig  # noqa: E402

IGNORE = -100
LETTERS = "abcdefghijklmnop"
TASKS = {"copy": lambda s: s, "sort": lambda s: "".join(sorted(s)), "reverse": lambda s: s[::-1]}


class CharVocab:
    """Character-level vocabulary: ``<pad>``, ``<eos>``, then every character used."""

    PAD, EOS = 0, 1

    def __init__(self) -> None:
        chars = sorted(set(LETTERS + "".join(TASKS) + " ="))
        self.itos = ["<pad>", "<eos>"] + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.itos[i] for i in ids if i > self.EOS)


VOCAB = CharVocab()


@dataclass
class Sample:
    prompt: str
    response: str
    corrupted: bool = False


def make_samples(n: int, rng: random.Random, tasks: Sequence[str], min_len: int = 3, max_len: int = 7,
                 corrupt: float = 0.0) -> list[Sample]:
    """``n`` instructions ``"<task> <letters>="`` with their correct response; a ``corrupt``
    share (exactly ``round(corrupt * n)``, at random positions) gets a random wrong response
    of the same length instead."""
    bad = set(rng.sample(range(n), round(corrupt * n)))
    out = []
    for i in range(n):
        task = rng.choice(list(tasks))
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        response = TASKS[task](s)
        if i in bad:
            wrong = response
            while wrong == response:
                wrong = "".join(rng.choice(LETTERS) for _ in range(len(s)))
            response = wrong
        out.append(Sample(f"{task} {s}=", response, i in bad))
    return out


class InstructionDataset(Dataset):
    """One tokenised sample per item: ``input_ids`` (prompt + response + eos) and ``labels``
    (the same ids, the prompt masked with -100)."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        s = self.samples[i]
        prompt, response = VOCAB.encode(s.prompt), VOCAB.encode(s.response) + [VOCAB.EOS]
        return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response}

    def describe(self, i: int) -> str:
        """The sample decoded from its token ids: ``prompt -> response``."""
        item = self[i]
        n_prompt = sum(1 for t in item["labels"] if t == IGNORE)
        return f"{VOCAB.decode(item['input_ids'][:n_prompt])} -> {VOCAB.decode(item['input_ids'][n_prompt:])}"


def collate(items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right padding: pad ids in ``input_ids``, 0 in ``attention_mask``, -100 in ``labels``."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), VOCAB.PAD, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.tensor(it["input_ids"])
        labels[row, :n] = torch.tensor(it["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretrain(args: argparse.Namespace) -> GPT2LMHeadModel:
    """A small GPT-2, trained in full on clean samples of every task (a plain PyTorch loop)."""
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=32, n_embd=args.n_embd, n_layer=args.n_layer,
                        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=VOCAB.EOS, eos_token_id=VOCAB.EOS, pad_token_id=VOCAB.PAD)
    model = GPT2LMHeadModel(config)
    data = InstructionDataset(make_samples(args.pretrain_steps * 64, random.Random(args.seed + 1), list(TASKS)))
    loader = DataLoader(data, batch_size=64, shuffle=True, collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.pretrain_steps, pct_start=0.1)
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, args.pretrain_steps // 4) == 0:
            print(f"pretraining step {step + 1}/{args.pretrain_steps}: loss {loss.item():.3f}")
    print(f"pretraining: {time.perf_counter() - start:.1f} s")
    return model


@torch.no_grad()
def exact_match(model: torch.nn.Module, samples: list[Sample]) -> float:
    """Share of ``samples`` whose greedy response (teacher-forced argmax over the response
    tokens) is exactly right."""
    was_training = model.training
    model.eval()
    batch = collate([InstructionDataset(samples)[i] for i in range(len(samples))])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    pred, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    ok = ((pred == labels) | (labels == IGNORE)).all(1)
    return float(ok.float().mean())


class InstructionLoRA(L.LightningModule):
    """The pretrained GPT-2 with LoRA adapters on ``c_attn`` (GPT-2's Conv1D: fan_in_fan_out)."""

    def __init__(self, base: GPT2LMHeadModel, rank: int = 8, lr: float = 3e-3) -> None:
        super().__init__()
        config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                            target_modules=["c_attn"], fan_in_fan_out=True)
        self.model = get_peft_model(base, config)
        self.lr = lr

    def forward(self, **batch):
        # the audit's default per-sample loss calls the LightningModule with the batch's keys (all
        # but labels); a module without a forward would have the PEFT model inside called instead
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.2, help="share of corrupted training responses")
    parser.add_argument("--task", choices=sorted(TASKS), default="reverse", help="the fine-tune's task")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_logs", help="log folder (TensorBoard logs, the scores file)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_val, args.epochs, args.pretrain_steps = 100, 40, 1, 20
    torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "2"))))
    hf_logging.set_verbosity_error()
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO)

    t0 = time.perf_counter()
    base = pretrain(args)
    rng = random.Random(args.seed + 2)
    train_samples = make_samples(args.n_train, rng, [args.task], corrupt=args.noise)
    val_samples = make_samples(args.n_val, rng, [args.task])
    print(f"base model, exact match on the clean validation set ({args.task}): {exact_match(base, val_samples):.2f}")
    train, val = InstructionDataset(train_samples), InstructionDataset(val_samples)
    flags = [s.corrupted for s in train_samples]

    L.seed_everything(args.seed, verbose=False)
    callback = InfluenceCallback(
        method="fvm", solver="hyperinf", params="lora", noisy=flags, top_k=20, verbose=True,
        describe=train.describe,  # "reverse abcd= -> dcba"
        # Tuning pinned explicitly (not the library's defaults, which are being reworked): Adam
        # with a relative lr of 0.05 (a fraction of each LoRA matrix's RMS), under ASAM, 4 passes
        # over the 200 validation samples, batches of 32: a few seconds on a CPU. The defaults of
        # the time of writing (SGD, probed lr, batches of 8) moved this model away from the
        # validation minimum (validation loss 0.53 -> 5.1) and the ranking to chance.
        tuning=TuningConfig(epochs=4 if not args.quick else 1, optimizer="adam", lr=0.05, lr_scale="relative",
                            batch_size=32, rho=0.5, adaptive=True))
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[callback], accelerator="cpu", devices=1,
                        logger=TensorBoardLogger(args.out, name="causal_lm"), enable_model_summary=False,
                        enable_progress_bar=False, log_every_n_steps=10, deterministic=True)
    module = InstructionLoRA(base, rank=args.rank, lr=args.lr)
    trainer.fit(module, DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate),
                DataLoader(val, batch_size=64, collate_fn=collate))
    result = callback.result
    if result is None:
        raise SystemExit(f"the audit failed: {callback.last_error!r}")
    print(f"fine-tuned model, exact match on the clean validation set: {exact_match(module.model, val_samples):.2f}")
    top10 = [int(i) for i in result.ranking[:10]]
    hits = sum(flags[i] for i in top10)
    m = result.metrics
    print(f"Scores file: {callback.scores_path}  (total {time.perf_counter() - t0:.1f} s)")
    print(f"top-10 flagged: {hits}/10 corrupted; AUROC {m['auroc']:.3f}, AP {m['ap']:.3f} "
          f"({sum(flags)} of {len(flags)} training responses corrupted)")
    by = getattr(result, "metrics_by", None) or {}  # every ranking's metrics, where the library has them
    for name, values in by.items():
        if name != getattr(result, "rank_by", None):
            print(f"  ranked by {name}: AUROC {values['auroc']:.3f}, AP {values['ap']:.3f}")


if __name__ == "__main__":
    main()
