"""Shared model / data / training code for the benchmarks and the demos.

Two audited models:

- digits: a small MLP ``64-64-10`` trained with Adam until it (nearly) fits the noisy
  training set (:func:`digits_mlp`, :func:`train_mlp`);
- text: all-MiniLM-L6-v2 as a sequence classifier with PEFT LoRA ``r=8`` on ``query``/``value``,
  fine-tuned with AdamW (:func:`minilm_lora`, :func:`train_text`). Batches are dicts
  ``{"input_ids", "attention_mask", "token_type_ids", "labels"}`` padded per batch by
  :class:`TextCollate`; wrap a dataset in :func:`text_loader` to hand it to ``audit()``.

Plus what every benchmark records: :func:`provenance` (:func:`machine_info`, the date, the
command), :func:`clean` JSON, and K-fold out-of-sample probabilities (:func:`cross_val_probs`)
for cleanlab's confident learning.

How the benchmarks import, one rule: each is a script run from the repository root as
``python benchmarks/<name>.py``, so Python puts ``benchmarks/`` on ``sys.path`` and
``import common`` needs no set-up; ``lightning_influence`` comes from the install
(``bash scripts/setup.sh``: ``pip install -e .``); the shared tasks (``examples/tasks.py``)
are on the path once this module is imported, by the one ``sys.path`` line below. No script
imports another: what two of them share lives here.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
GLUE_DIR = os.path.join(ROOT, "..", "shared", "data")  # GLUE's TSV folders (sst2/, cola/) beside the checkout

EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:  # the benchmarks' only path set-up: ``import tasks`` (examples/tasks.py)
    sys.path.insert(1, EXAMPLES)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- machine

def machine_info() -> dict[str, Any]:
    """Platform, CPU, accelerator and library versions, for results files."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def write_results(result: dict[str, Any], path: str) -> None:
    """Write a results document (``{"tables": [...], ...}``, the schema ``render.py`` reads)
    atomically to ``path`` and print its tables."""
    import json

    from lightning_influence._io import atomic_open

    with atomic_open(path, what="the benchmark results") as handle:
        json.dump(result, handle, indent=1, default=float)
    for table in result.get("tables", []):
        print(json.dumps(table, indent=1))


class RssSampler:
    """Samples this process's RSS every ``period`` s in a thread: the peak overall and per stage
    (the stage is whatever :meth:`stage` last set; the audit's progress reports it)."""

    def __init__(self, period: float = 0.002) -> None:
        import threading

        import psutil

        self.proc, self.period, self.label = psutil.Process(), period, "start"
        self.peaks: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.rss()
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), value)
            self._stop.wait(self.period)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def provenance(script: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What every results file records: ``machine`` (:func:`machine_info`), ``date``
    (:func:`now`) and ``command``, the script (pass ``__file__``) as the docs run it with
    ``argv`` (default: this process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python", f"benchmarks/{os.path.basename(script)}", *args])
    return {"machine": machine_info(), "date": now(), "command": command}


def clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats -> None, tensors -> lists, recursively."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return clean(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def metrics_of(scores: Tensor, noisy: Tensor) -> dict[str, float]:
    """ROC AUC, AP and recall at the noise rate of a ranking ``scores`` against ``noisy``."""
    from lightning_influence.metrics import detection_metrics

    m = detection_metrics(scores.double(), noisy)
    return {"auroc": m["auroc"], "ap": m["ap"], "recall": m["recall@noise_rate"]}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- digits MLP

def digits_mlp(seed: int, hidden: int = 64, num_classes: int = 10, d_in: int = 64) -> nn.Module:
    """``Linear(64, hidden) -> ReLU -> Linear(hidden, 10)``, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def train_mlp(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 1500, lr: float = 1e-2,
              batch_size: int | None = None, weight_decay: float = 0.0, seed: int = 0,
              device: torch.device = torch.device("cpu")) -> nn.Module:
    """Adam on mean cross entropy (full batch by default: fast on a CPU). With the defaults the
    64-64-10 MLP fits (nearly) all of the noisy digits training labels, i.e. it memorises the
    flipped ones as a large network would (train accuracy on the noisy labels ~1.0)."""
    model.to(device).train()
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    size = batch_size or len(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(size):
            idx = idx.to(device)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def mlp_probs(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    dev = next(model.parameters()).device
    return torch.softmax(model(x.to(dev)), -1).cpu()


# --------------------------------------------------------------------------- MiniLM + LoRA

def minilm_tokenizer():
    from transformers import AutoTokenizer

    from tasks import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def minilm_lora(seed: int, num_labels: int = 2, r: int = 8, alpha: int = 16, dropout: float = 0.1,
                target_modules: Sequence[str] = ("query", "value")) -> nn.Module:
    """all-MiniLM-L6-v2 as ``BertForSequenceClassification`` with PEFT LoRA (``r``, on
    ``query``/``value``). The classification head is trained too (PEFT's ``modules_to_save``)
    but only the LoRA matrices are audited (``params="auto"``)."""
    import logging

    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from tasks import minilm_path

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules))
    return get_peft_model(base, config)


class TextCollate:
    """Tokenises a list of ``{"text", "labels"}`` samples into a padded batch dict."""

    def __init__(self, tokenizer: Any, max_length: int = 64) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Tensor]:
        enc = self.tokenizer([s["text"] for s in samples], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        enc = dict(enc)
        enc["labels"] = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
        return enc


def text_loader(dataset: Dataset, tokenizer: Any, batch_size: int = 32, max_length: int = 64,
                shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader whose collate function tokenises; ``audit()`` reuses that collate."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=TextCollate(tokenizer, max_length),
                      generator=g if shuffle else None)


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def token_lengths(dataset: Dataset, tokenizer: Any, max_length: int = 64) -> list[int]:
    return [min(len(tokenizer(dataset[i]["text"])["input_ids"]), max_length) for i in range(len(dataset))]


def sort_by_length(split: Any, tokenizer: Any, max_length: int = 64) -> Any:
    """The same :class:`~tasks.NoisySplit` with the training and the
    validation samples reordered by token length (flags and clean labels follow), so that
    sequential passes (the audit's gradient pass) pad little. Sample ids are positions in the
    reordered set."""
    from tasks import NoisySplit, TextPairs

    def order(ds: Dataset) -> list[int]:
        lengths = token_lengths(ds, tokenizer, max_length)
        return sorted(range(len(lengths)), key=lambda i: (lengths[i], i))

    tr, va = order(split.train), order(split.val)
    texts = [split.train.texts[i] for i in tr]
    train = TextPairs(texts, split.train.labels[tr])
    val = TextPairs([split.val.texts[i] for i in va], split.val.labels[va])
    return NoisySplit(train, val, split.noisy[tr], split.clean_labels[tr], split.num_classes, texts)


def bucketed_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                     pool: int = 50) -> list[list[int]]:
    """Shuffled batches of similar-length samples: a random permutation, cut into pools of
    ``pool`` batches, each pool sorted by length and cut into batches, batch order shuffled."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    batches: list[list[int]] = []
    for s in range(0, len(perm), batch_size * pool):
        chunk = sorted(perm[s:s + batch_size * pool], key=lambda i: lengths[i])
        batches.extend(chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def train_text(model: nn.Module, dataset: Dataset, tokenizer: Any, *, epochs: int = 2, lr: float = 1e-3,
               batch_size: int = 32, max_length: int = 64, weight_decay: float = 0.01, seed: int = 0,
               device: torch.device = torch.device("cpu")) -> nn.Module:
    """AdamW on the trainable parameters (LoRA + head), linear decay to 0, ``epochs`` passes in
    length-bucketed shuffled batches."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    collate = TextCollate(tokenizer, max_length)
    lengths = token_lengths(dataset, tokenizer, max_length)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(dataset) // batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    torch.manual_seed(seed)  # dropout
    for _ in range(epochs):
        for idx in bucketed_batches(lengths, batch_size, g):
            out = model(**_to(collate([dataset[i] for i in idx]), device))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def text_probs(model: nn.Module, dataset: Dataset, tokenizer: Any, batch_size: int = 64,
               max_length: int = 64) -> Tensor:
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for batch in text_loader(dataset, tokenizer, batch_size, max_length):
        batch = _to(batch, dev)
        batch.pop("labels")
        out.append(torch.softmax(model(**batch).logits.float(), -1).cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- cleanlab

def cross_val_probs(n: int, labels: Tensor, folds: int, seed: int,
                    fit_predict: Callable[[np.ndarray, np.ndarray, int], Tensor]) -> tuple[np.ndarray, float]:
    """Out-of-sample predicted probabilities ``(n, C)`` from stratified K-fold
    cross-validation. ``fit_predict(train_idx, held_out_idx, fold)`` trains a fresh model on
    ``train_idx`` and returns probabilities for ``held_out_idx``. Returns ``(probs, seconds)``."""
    from sklearn.model_selection import StratifiedKFold

    start = time.perf_counter()
    y = labels.numpy()
    probs: np.ndarray | None = None
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (tr, ho) in enumerate(skf.split(np.zeros(n), y)):
        p = fit_predict(tr, ho, fold).numpy()
        if probs is None:
            probs = np.zeros((n, p.shape[1]))
        probs[ho] = p
    assert probs is not None
    return probs, time.perf_counter() - start


def cleanlab_scores(labels: Tensor, probs: np.ndarray) -> Tensor:
    """Confident learning as a ranking: ``1 - label quality`` (self-confidence), higher = more
    likely mislabeled; samples that ``find_label_issues`` flags are moved to the top (+1), so
    the ranking honours cleanlab's own issue set first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    y = labels.numpy()
    quality = get_label_quality_scores(y, probs)
    issues = find_label_issues(y, probs)
    return torch.tensor(1.0 - quality + issues.astype(np.float64), dtype=torch.float64)


def subset(dataset: Dataset, idx: Sequence[int]) -> Subset:
    return Subset(dataset, [int(i) for i in idx])
