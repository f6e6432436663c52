"""Attribution benchmark: which training records explain each test record (DataInf's task).

DataInf's influential-data identification (Kwon et al. 2024; the flat-validation-minima paper's
text-generation experiment): ten variations of a task, 900 training records (90 per variation)
and 100 test records (10 per variation). After fine-tuning a causal LM on the training records,
each test record's most helpful training records (the most negative per-validation influence)
should be those of its own variation. Metrics, per test record and averaged over the 100: the ROC
AUC of the negated scores against "same variation", and the recall among the 90 lowest scores.

The data is read from ``../shared/data/datainf/`` (``--data-dir``); nothing of it is copied here.

The model, built from a small config (nothing downloaded): a 3-layer character-level GPT-2
(vocabulary built from the training texts), pretrained in full on the training prompts, then
fine-tuned with PEFT LoRA ``r=8`` (``c_attn``, ``c_proj``, ``c_fc``) on ``text`` (every token).
How well it learned: next-character accuracy on the test records' answers (teacher forced) and
exact match (every answer character right, i.e. greedy decoding reproduces the answer).

Two protocols:

- ``datainf`` (DataInf's own): the audited loss of a record is the causal-LM loss of its ``prompt``
  over all its tokens, for the training records and the test records alike.
- ``instruction`` (how people fine-tune): the prompt is masked with -100, the loss is that of the
  answer tokens only.

Every ``method x solver`` runs through ``lightning_influence.audit(..., per_validation=True)`` on
the same trained weights, plus ``defaults`` (no method, no solver: the attribution defaults), with
the seconds of each call. Kronfluence (pairwise EK-FAC) runs as a peer column when installed.

Run: python benchmarks/attribution.py [--seeds 0 1 2] [--out benchmarks/results/attribution.json]
     python benchmarks/attribution.py --quick      # tiny sizes, < 1 min
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import common

DATA_DIR = os.path.join(common.ROOT, "..", "shared", "data", "datainf")
TASKS = ("grammars", "math_without_reason")
METHODS = ("standard", "vm", "fvm")
SOLVERS = ("hyperinf", "datainf", "identity", "exact", "lissa", "kronecker")
#: the grid's default solvers: LiSSA is left out (it ran 100-160 s per column at --quick's size on this
#: 2-core machine, stopping at its flop budget); ``--solvers ... lissa`` runs it
#: the candidates the attribution defaults were chosen from (method standard): name, solver, damping, normalize
ABLATIONS = (("standard/identity unit (cosine)", "identity", 0.1, "unit"),
             ("standard/hyperinf unit", "hyperinf", 0.1, "unit"),
             ("standard/hyperinf d=1e-3", "hyperinf", 1e-3, "none"),
             ("standard/kronecker unit", "kronecker", 0.1, "unit"),
             ("standard/kronecker d=1e-3", "kronecker", 1e-3, "none"),
             ("standard/kronecker d=1e-3 unit", "kronecker", 1e-3, "unit"),
             ("standard/hyperinf d=1e-3 centered", "hyperinf", 1e-3, "centered"),
             ("standard/kronecker d=1e-3 centered", "kronecker", 1e-3, "centered"))
GRID_SOLVERS = ("hyperinf", "datainf", "identity", "exact", "kronecker")
IGNORE = -100
EMBED, PRETRAIN_EPOCHS, FINETUNE_EPOCHS = 64, 3, 6


# --------------------------------------------------------------------------- data

def load_task(task: str, data_dir: str = DATA_DIR) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The task's training and test records (``prompt``, ``text``, ``answer``, ``variation``)."""
    out = []
    for split in ("train", "test"):
        path = os.path.join(data_dir, f"{task}_{split}.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: the DataInf tasks live in ../shared/data/datainf/ "
                                    "(pass --data-dir)")
        with open(path, encoding="utf-8") as fh:
            out.append([json.loads(line) for line in fh if line.strip()])
    return out[0], out[1]


def subsample(train: list[dict], test: list[dict], per_train: int, per_test: int) -> tuple[list[dict], list[dict]]:
    """The first ``per_train`` / ``per_test`` records of every variation (``--quick``)."""
    def take(records: list[dict], k: int) -> list[dict]:
        seen: dict[str, int] = {}
        kept = []
        for r in records:
            if seen.get(r["variation"], 0) < k:
                seen[r["variation"]] = seen.get(r["variation"], 0) + 1
                kept.append(r)
        return kept
    return take(train, per_train), take(test, per_test)


class CharTokenizer:
    """Characters of the training texts, with ``<pad>`` (0), ``<eos>`` (1) and ``<unk>`` (2);
    ``</s>`` at the end of a text is the ``<eos>`` token."""

    PAD, EOS, UNK = 0, 1, 2

    def __init__(self, texts: Sequence[str]) -> None:
        chars = sorted(set("".join(t.replace("</s>", "") for t in texts)))
        self.itos = ["<pad>", "<eos>", "<unk>"] + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        eos = text.endswith("</s>")
        ids = [self.stoi.get(c, self.UNK) for c in (text[:-4] if eos else text)]
        return ids + [self.EOS] if eos else ids


class Records(Dataset):
    """Tokenised records as ``{"input_ids", "labels"}`` (1-D, unpadded). ``field="prompt"``: the
    prompt, every token labelled (DataInf's protocol); ``"text"``: the whole text, every token
    labelled (fine-tuning); ``"answer"``: the whole text with the prompt masked (-100)."""

    def __init__(self, records: list[dict], tok: CharTokenizer, field: str) -> None:
        self.items = []
        for r in records:
            ids = tok.encode(r["prompt"] if field == "prompt" else r["text"])
            labels = list(ids)
            if field == "answer":
                k = len(tok.encode(r["prompt"]))
                labels = [IGNORE] * k + labels[k:]
            self.items.append((torch.tensor(ids), torch.tensor(labels)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids, labels = self.items[i]
        return {"input_ids": ids, "labels": labels}


def collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Right-padding: ``attention_mask`` 0 and label -100 on the padding."""
    width = max(s["input_ids"].numel() for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        k = s["input_ids"].numel()
        ids[i, :k], labels[i, :k], mask[i, :k] = s["input_ids"], s["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loader(ds: Dataset, batch_size: int = 32, shuffle: bool = False, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate)


# --------------------------------------------------------------------------- model

def char_gpt2(vocab: int, seed: int, n_embd: int = 128, n_layer: int = 3, n_head: int = 4,
              n_positions: int = 256) -> nn.Module:
    """A small GPT-2 from a config (no download), initialised from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=CharTokenizer.EOS, eos_token_id=CharTokenizer.EOS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def add_lora(model: nn.Module, seed: int, r: int = 8) -> nn.Module:
    """PEFT LoRA ``r`` on every attention and MLP matrix (``c_attn``, ``c_proj``, ``c_fc``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train_lm(model: nn.Module, ds: Dataset, *, epochs: int, lr: float, seed: int, batch_size: int = 32) -> float:
    """AdamW on the model's own mean token loss, cosine decay; returns the last epoch's mean loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * -(-len(ds) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    last = float("nan")
    for epoch in range(epochs):
        total, count = 0.0, 0
        for batch in loader(ds, batch_size, shuffle=True, seed=seed * 1000 + epoch):
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total, count = total + float(loss.detach()) * len(batch["input_ids"]), count + len(batch["input_ids"])
        last = total / count
    model.eval()
    return last


@torch.no_grad()
def answer_accuracy(model: nn.Module, ds: Dataset) -> dict[str, float]:
    """Teacher-forced next-character accuracy on the answer tokens (``ds``: ``field="answer"``)
    and exact match (every answer token, ``<eos>`` included, is the argmax: greedy decoding
    reproduces the answer)."""
    model.eval()
    right = total = exact = 0
    for batch in loader(ds, 64):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        pred, gold = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        counted = gold != IGNORE
        ok = (pred == gold) | ~counted
        right += int(((pred == gold) & counted).sum())
        total += int(counted.sum())
        exact += int(ok.all(1).sum())
    return {"answer_token_accuracy": right / max(total, 1), "exact_match": exact / len(ds)}


@torch.no_grad()
def mean_loss(model: nn.Module, ds: Dataset) -> float:
    """The model's token-averaged loss over ``ds``."""
    total = count = 0.0
    for batch in loader(ds, 64):
        out = model(**batch)
        k = float((batch["labels"][:, 1:] != IGNORE).sum())
        total, count = total + float(out.loss) * k, count + k
    return total / count


def build(task: str, seed: int, quick: bool, data_dir: str) -> dict[str, Any]:
    """Train the task's model for ``seed``: pretrain on the prompts, LoRA fine-tune on the texts."""
    train, test = load_task(task, data_dir)
    if quick:
        train, test = subsample(train, test, 12, 2)
    tok = CharTokenizer([r["text"] for r in train])
    t0 = time.perf_counter()
    model = char_gpt2(len(tok), seed, n_embd=32 if quick else EMBED)
    pre_loss = train_lm(model, Records(train, tok, "prompt"), epochs=1 if quick else PRETRAIN_EPOCHS, lr=3e-3,
                        seed=seed)
    model = add_lora(model, seed)
    fit_loss = train_lm(model, Records(train, tok, "text"), epochs=1 if quick else FINETUNE_EPOCHS, lr=1e-2,
                        seed=seed + 1)
    seconds = time.perf_counter() - t0
    learned = {"pretrain_loss": pre_loss, "finetune_loss": fit_loss, "train_seconds": seconds,
               "test_text_loss": mean_loss(model, Records(test, tok, "text")),
               **answer_accuracy(model, Records(test, tok, "answer"))}
    return {"model": model, "tok": tok, "train": train, "test": test, "learned": learned}


# --------------------------------------------------------------------------- metrics

def identification(per_validation: Tensor, train_var: Sequence[str], test_var: Sequence[str]) -> dict[str, float]:
    """DataInf's metrics of an ``(m, n)`` per-validation matrix (negative = helpful): per test
    record, the ROC AUC of the negated scores against "same variation" and the recall among the
    ``k`` lowest scores (``k`` = training records per variation); means over the ``m`` rows."""
    names = sorted(set(train_var) | set(test_var))
    tv = torch.tensor([names.index(v) for v in train_var])
    qv = torch.tensor([names.index(v) for v in test_var])
    same = qv[:, None] == tv[None, :]                                   # (m, n)
    helpful = -per_validation.double()
    ranks = helpful.argsort(1).argsort(1).double() + 1                   # ascending ranks (ties: arbitrary)
    pos = same.sum(1).double()
    neg = same.shape[1] - pos
    auc = (ranks * same).sum(1).sub(pos * (pos + 1) / 2) / (pos * neg)
    k = int(pos[0])
    top = helpful.topk(k, dim=1).indices
    recall = same.gather(1, top).double().sum(1) / pos
    return {"auc": float(auc.mean()), "recall": float(recall.mean()),
            "auc_min_row": float(auc.min()), "recall_min_row": float(recall.min())}


# --------------------------------------------------------------------------- runs

def _loaders(b: dict[str, Any], field: str) -> tuple[DataLoader, DataLoader]:
    return (loader(Records(b["train"], b["tok"], field), 32), loader(Records(b["test"], b["tok"], field), 32))


def _row(task: str, seed: int, protocol: str, column: str, pv: Tensor, b: dict[str, Any], seconds: float,
         **extra: Any) -> dict[str, Any]:
    found = identification(pv, [r["variation"] for r in b["train"]], [r["variation"] for r in b["test"]])
    row = {"task": task, "seed": seed, "protocol": protocol, "column": column, **found, "seconds": seconds, **extra}
    print(f"  {protocol:11s} {column:22s} auc {found['auc']:.4f} recall {found['recall']:.4f} "
          f"({seconds:.1f} s)", flush=True)
    return row


def run_grid(task: str, seed: int, b: dict[str, Any], protocol: str, methods: Sequence[str],
             solvers: Sequence[str]) -> list[dict[str, Any]]:
    """Every ``method x solver`` on one trained model: per method one ``prepare()`` (the copy,
    the tuning for vm/fvm, the gradients: the first half of ``audit()``), then ``score()`` (its
    second half) per solver with ``per_validation=True`` and the method's explicit defaults
    (no normalisation: as ``audit(method=..., solver=...)``). Seconds: the method's ``prepare``
    plus the solver's ``score``."""
    from lightning_influence.audit import prepare, score
    from lightning_influence.config import AuditOptions

    train_loader, test_loader = _loaders(b, "prompt" if protocol == "datainf" else "answer")
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        options = AuditOptions(method=method, seed=seed, batch_size=32, per_validation=True)
        prepared = prepare(b["model"], train_loader, test_loader, options)
        prep_s = time.perf_counter() - t0
        try:
            for solver in solvers:
                t1 = time.perf_counter()
                result = score(prepared, replace(options, solver=solver))
                rows.append(_row(task, seed, protocol, f"{method}/{solver}", result.per_validation, b,
                                 prep_s + time.perf_counter() - t1))
            for name, solver, damping, normalize in ABLATIONS if method == "standard" else ():
                t1 = time.perf_counter()
                result = score(prepared, replace(options, solver=solver, damping=damping, normalize=normalize))
                rows.append(_row(task, seed, protocol, name, result.per_validation, b,
                                 prep_s + time.perf_counter() - t1))
        finally:
            prepared.close()
    return rows


def run_defaults(task: str, seed: int, b: dict[str, Any], protocol: str) -> dict[str, Any]:
    """``audit(model, train, test, per_validation=True)`` with no method and no solver: the
    attribution defaults, exactly as a user calls it (pre-flight check included)."""
    from lightning_influence import audit

    train_loader, test_loader = _loaders(b, "prompt" if protocol == "datainf" else "answer")
    t0 = time.perf_counter()
    result = audit(b["model"], train_loader, test_loader, per_validation=True, seed=seed)
    config = {"method": result.method, "solver": result.solver,
              "normalize": result.config.get("normalize"), "damping": result.config["curvature"]["damping"],
              "params": result.config["params"]}
    return _row(task, seed, protocol, "defaults", result.per_validation, b, time.perf_counter() - t0, resolved=config)


def installed_peers() -> list[str]:
    """The peer libraries found (Kronfluence, dattri): optional, never installed by this script."""
    import importlib.util

    return [name for name in ("kronfluence", "dattri") if importlib.util.find_spec(name) is not None]


def run_kronfluence(task: str, seed: int, b: dict[str, Any], protocol: str, strategy: str = "ekfac",
                    matrix: bool = False) -> Any | None:
    """Kronfluence's pairwise EK-FAC scores on a copy of the same trained weights (the LoRA
    Linear layers tracked; each record's loss the mean over its counted tokens, as the audit's),
    when Kronfluence is installed; its sign flipped to this package's (negative = helpful).
    ``matrix``: return the ``(m, n)`` scores instead of a row (for checks)."""
    import copy
    import importlib.util
    import tempfile

    if importlib.util.find_spec("kronfluence") is None:
        return None
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    def record_losses(batch: dict[str, Tensor], model: nn.Module, sample: bool) -> Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]
        if sample:
            with torch.no_grad():
                drawn = torch.multinomial(torch.softmax(logits.detach(), -1).flatten(0, 1), 1).view(labels.shape)
            labels = torch.where(labels == IGNORE, labels, drawn)
        tokens = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        counted = (labels != IGNORE).sum(1).clamp_min(1)
        return (tokens.sum(1) / counted).sum()

    class LMTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            return record_losses(batch, model, sample)

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            return record_losses(batch, model, False)

        def get_influence_tracked_modules(self) -> list[str]:
            return [n for n, m in b["model"].named_modules() if isinstance(m, nn.Linear) and "lora_" in n]

        def get_attention_mask(self, batch: Any) -> Tensor:
            return batch["attention_mask"]

    field = "prompt" if protocol == "datainf" else "answer"
    train_ds, test_ds = Records(b["train"], b["tok"], field), Records(b["test"], b["tok"], field)
    t0 = time.perf_counter()
    task_ = LMTask()
    model = prepare_model(copy.deepcopy(b["model"]).eval(), task_)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="attribution", model=model, task=task_, output_dir=tmp, disable_tqdm=True,
                            cpu=True, disable_model_save=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
        analyzer.fit_all_factors(factors_name=strategy, dataset=train_ds, per_device_batch_size=32,
                                 factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name=strategy, query_dataset=test_ds,
                                         train_dataset=train_ds, per_device_query_batch_size=50,
                                         per_device_train_batch_size=64, overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].double()
    if matrix:
        return -scores
    return _row(task, seed, protocol, "Kronfluence EK-FAC", -scores, b, time.perf_counter() - t0)


def _stat(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = np.array([r[key] for r in rows], dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def aggregate(raw: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{protocol: {task: {column: {auc, recall, seconds: mean/std/min/max}}}}`` over seeds."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for r in raw:
        out.setdefault(r["protocol"], {}).setdefault(r["task"], {}).setdefault(r["column"], {})
    for protocol, tasks in out.items():
        for task, columns in tasks.items():
            for column in columns:
                rows = [r for r in raw if (r["protocol"], r["task"], r["column"]) == (protocol, task, column)]
                columns[column] = {k: _stat(rows, k) for k in ("auc", "recall", "seconds")}
                columns[column]["seeds"] = len(rows)
    return out


def _cell(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f} (min {stat['min']:.3f})"


def tables(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The tables (docs/ATTRIBUTION.md): per protocol, one row per column, AUC and recall per task (mean ± std
    over seeds, the worst seed), seconds; then how well the models learned."""
    meta = {"machine": doc["machine"], "date": doc["date"], "command": doc["command"]}
    out = []
    for protocol, title in (("datainf", "Attribution: DataInf's protocol (gradients of each prompt, every token)"),
                            ("instruction", "Attribution: instruction-tuning protocol (prompt masked, answer tokens)")):
        agg = doc["aggregate"].get(protocol)
        if not agg:
            continue
        tasks = [t for t in doc["options"]["tasks"] if t in agg]
        columns = list(dict.fromkeys(c for t in tasks for c in agg[t]))
        rows = []
        most = max(agg[t][c]["seeds"] for t in tasks for c in agg[t])
        for column in columns:
            seeds = min(agg[t][column]["seeds"] for t in tasks if column in agg[t])
            row: list[Any] = [column if seeds == most else f"{column} ({seeds} seed{'s' if seeds > 1 else ''})"]
            for task in tasks:
                stat = agg[task].get(column)
                row += [_cell(stat["auc"]), _cell(stat["recall"])] if stat else [None, None]
            secs = [agg[t][column]["seconds"]["mean"] for t in tasks if column in agg[t]]
            rows.append(row + [round(float(np.mean(secs)), 1)])
        cols = ["column"] + [f"{t} {k}" for t in tasks for k in ("AUC", "recall")] + ["seconds"]
        out.append({"title": title, **meta, "columns": cols, "rows": rows, "notes": doc["notes"][protocol]})
    learned = []
    for task in doc["options"]["tasks"]:
        runs = doc["learned"].get(task, [])
        if runs:
            learned.append([task, *(round(float(np.mean([r[k] for r in runs])), 3) for k in
                                    ("answer_token_accuracy", "exact_match", "test_text_loss", "train_seconds"))])
    out.append({"title": "Attribution benchmark: how well the models learned (test records, mean over seeds)", **meta,
                "columns": ["task", "answer token accuracy", "exact match", "test text loss", "train seconds"],
                "rows": learned, "notes": [doc["notes"]["model"]]})
    return out


NOTES = {
    "datainf": [
        "Mean over the 100 test records of the ROC AUC of the negated per-validation scores against "
        "'same variation' and the recall among the 90 lowest scores (DataInf's metrics); mean ± std over seeds, "
        "min = the worst seed.",
        "'defaults' is `audit(model, train, test, per_validation=True)` with no method and no solver (the "
        "attribution defaults; its seconds include the pre-flight check). Every other column is one "
        "method/solver pair, without normalisation, on the same trained weights: per method one `prepare()` "
        "(copy, tuning, gradients) shared by the solvers, then `score(per_validation=True)`; seconds = the "
        "method's prepare + the solver's score.",
        "Rows named with a damping or a normalisation are the candidates the defaults were chosen from "
        "(standard method; damping 0.1 unless named). LiSSA is not in the grid by default (100-160 s per column "
        "at --quick's size on this machine, stopping at its flop budget; `--solvers ... lissa` runs it).",
        "Kronfluence EK-FAC (an optional peer, run where installed): pairwise scores on the same trained weights "
        "(same seed, same deterministic training), the LoRA Linear layers tracked, each record's loss its mean "
        "token loss; its identity strategy equals this package's identity column (test_benchmarks.py). Its "
        "seconds include its factor fitting.",
    ],
    "instruction": [
        "The prompt is masked with -100: the audited loss is that of the answer tokens only, for the training "
        "and the test records (how people fine-tune). What limits it: the answer tokens themselves carry "
        "little of the variation (math_without_reason: a number; grammars: the record's own words, "
        "transformed, which this model learned poorly, see the learning table); the variation reaches the "
        "gradient only through the activations the masked prompt leaves in the answer's forward pass (the "
        "inputs of the LoRA A blocks, attention over the prompt). Only the standard method is run here.",
    ],
    "model": "3-layer character GPT-2 (vocabulary from the training texts), pretrained in full on the training "
             "prompts, then PEFT LoRA r=8 on c_attn, c_proj and c_fc fine-tuned on the training texts (every "
             "token). Exact match = every answer character (and the end token) is the argmax under teacher "
             "forcing, i.e. greedy decoding reproduces the answer.",
}


def merge(paths: Sequence[str], out: str) -> dict[str, Any]:
    """One results document from several runs' (their rows, learning figures, tasks and seeds)."""
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            docs.append(json.load(fh))
    doc = dict(docs[0])
    doc["raw"] = [r for d in docs for r in d["raw"]]
    learned: dict[str, dict[int, dict[str, Any]]] = {}
    for d in docs:  # runs merged on the same task and seed must have trained the same weights
        for task, runs in d["learned"].items():
            for run in runs:
                seen = learned.setdefault(task, {}).setdefault(run["seed"], run)
                if (seen["test_text_loss"], seen["answer_token_accuracy"]) != (run["test_text_loss"],
                                                                               run["answer_token_accuracy"]):
                    raise ValueError(f"{task} seed {run['seed']}: the merged runs trained different weights")
    doc["learned"] = {task: [runs[k] for k in sorted(runs)] for task, runs in learned.items()}
    doc["options"] = {**doc["options"], "tasks": [t for t in TASKS if t in doc["learned"]],
                      "merged_from": [d["command"] for d in docs]}
    doc["command"] = " ; ".join(dict.fromkeys(d["command"] for d in docs)) + " (merged with --merge)"
    doc["date"] = max(d["date"] for d in docs)
    doc["wall_seconds"] = max(d.get("wall_seconds", 0.0) for d in docs)
    doc["notes"] = NOTES  # the script's current wording
    doc["aggregate"] = aggregate(doc["raw"])
    doc["tables"] = tables(doc)
    common.write_results(common.clean(doc), out)
    return doc


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--solvers", nargs="+", default=list(GRID_SOLVERS), choices=SOLVERS)
    ap.add_argument("--protocols", nargs="+", default=["datainf", "instruction"], choices=["datainf", "instruction"])
    ap.add_argument("--instruction-methods", nargs="+", default=["standard"], choices=METHODS,
                    help="methods of the instruction-tuning table (every solver each)")
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-peers", action="store_true", help="skip the peer libraries even where installed")
    ap.add_argument("--peers-only", action="store_true", help="train the same models (same seeds: the same "
                    "weights) and run only the peers' columns, to --merge with a run without them")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: 12 training / 2 test records per variation")
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", nargs="+", default=None, help="merge the results files of several runs (e.g. one "
                    "per task, run side by side) into --out, and re-render their tables")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.merge:
        return merge(opts.merge, opts.out or os.path.join(common.RESULTS, "attribution.json"))
    if opts.quick:  # one seed, one task, two methods: under a minute
        opts.seeds, opts.methods = opts.seeds[:1], [m for m in opts.methods if m in ("standard", "fvm")]
        opts.tasks = opts.tasks[:1] if len(opts.tasks) == len(TASKS) else opts.tasks
    out = opts.out or os.path.join(common.RESULTS, "attribution_quick.json" if opts.quick else "attribution.json")
    doc: dict[str, Any] = {"title": "Attribution: DataInf's identification tasks", **common.provenance(__file__, argv),
                           "options": {**{k: v for k, v in vars(opts).items() if k != "out"},
                                       "embed": 32 if opts.quick else EMBED,
                                       "pretrain_epochs": 1 if opts.quick else PRETRAIN_EPOCHS,
                                       "finetune_epochs": 1 if opts.quick else FINETUNE_EPOCHS},
                           "peers": installed_peers(), "learned": {}, "raw": [], "notes": NOTES}
    start = time.perf_counter()
    for seed in opts.seeds:
        for task in opts.tasks:
            b = build(task, seed, opts.quick, opts.data_dir)
            doc["learned"].setdefault(task, []).append({"seed": seed, **b["learned"]})
            print(f"{task} seed {seed}: learned {b['learned']}", flush=True)
            for protocol in opts.protocols:
                methods = opts.methods if protocol == "datainf" else opts.instruction_methods
                if not opts.peers_only:
                    doc["raw"] += run_grid(task, seed, b, protocol, methods, opts.solvers)
                    doc["raw"].append(run_defaults(task, seed, b, protocol))
                if protocol == "datainf" and "kronfluence" in doc["peers"] and not opts.no_peers:
                    peer = run_kronfluence(task, seed, b, protocol)
                    doc["raw"] += [peer] if peer is not None else []
            doc["aggregate"] = aggregate(doc["raw"])
            doc["wall_seconds"] = time.perf_counter() - start
            doc["tables"] = tables(doc)
            common.write_results(common.clean(doc), out)  # after every model: a partial run keeps its rows
    return doc


if __name__ == "__main__":
    main()
