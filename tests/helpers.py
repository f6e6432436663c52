"""Small, real models and data shared by the tests (CPU, seconds): import them from here
(``from helpers import mlp``); pytest puts ``tests/`` on the path (``pythonpath`` in
pyproject.toml). Fixtures stay in ``conftest.py``; Hugging Face models built from configs are
in ``hf_models.py``; the bundled noisy tasks (digits, GLUE) in ``examples/tasks.py``.
"""
from __future__ import annotations

import torch
from torch import nn

from tasks import TensorPairs


def mlp(d_in: int = 8, hidden: int = 16, classes: int = 3, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def tiny_bert_lora(dtype=torch.float64, r: int = 4, seed: int = 0):
    """A 2-layer BERT built from a small config, with PEFT LoRA on query/value."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    base = BertForSequenceClassification(config)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules=["query", "value"],
                                            lora_dropout=0.1, task_type="SEQ_CLS"))
    # LoRA B starts at zero; give it values so every gradient is non-trivial
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return model.to(dtype)


class TokenDataset(torch.utils.data.Dataset):
    """Variable-length token sequences with a label each; collate pads them."""

    def __init__(self, n: int = 12, vocab: int = 60, classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(3, 11, (n,), generator=g)
        self.tokens = [torch.randint(1, vocab, (int(k),), generator=g) for k in self.lengths]
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"input_ids": self.tokens[i], "labels": self.labels[i]}


def pad_collate(items):
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it["input_ids"])] = it["input_ids"]
        mask[i, : len(it["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([it["labels"] for it in items])}


def gaussian_blobs(n_train: int, n_val: int, dim: int, seed: int = 0):
    """A 3-class Gaussian-blob problem in ``dim`` dimensions: (train, val) TensorPairs in float64."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, dim, generator=g, dtype=torch.float64) * 2

    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return TensorPairs(centers[y] + torch.randn(n, dim, generator=g, dtype=torch.float64), y)

    return make(n_train), make(n_val)


def digits_mlp(split, epochs: int = 60, seed: int = 0) -> nn.Module:
    """A 64-64-10 MLP trained with Adam (batches of 64) until it fits the noisy digits labels
    of ``split`` (a :class:`tasks.NoisySplit`)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = split.train.x, split.train.y
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def run_gloo_ranks(target, world: int = 2, timeout: float = 180.0) -> dict:
    """Run ``target(rank, world, port, queue)`` in ``world`` spawned processes on a free local
    port; each puts ``(rank, *outcome)`` on the queue. A rank still alive after ``timeout``
    seconds is killed and fails the test (it hung in a collective). Returns ``{rank: outcome}``,
    the outcome a 1-tuple unwrapped to its value."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung in a collective"
    items = [queue.get(timeout=5) for _ in range(world)]
    return {item[0]: item[1] if len(item) == 2 else item[1:] for item in items}
