"""Attribution on plain (non-LoRA) models: is an exact duplicate of a validation query its most
helpful training sample?

Three small float64 models, trained per seed with plain torch Adam (400 steps, lr 3e-3, batch 64):

- ``blobs``: 600 Gaussian blobs (12 features, 4 centres, std 6, standardised; 400 train / 200
  validation), MLP ``12-32-32-4`` with tanh;
- ``digits MLP``: sklearn digits (1,200 train / 597 validation), MLP ``64-64-64-10`` with ReLU;
- ``digits CNN``: the same digits as 8x8 images, ``Conv2d(1, 8, 3) -> ReLU -> Linear(288, 10)``.

Per seed the queries are the validation samples the model gets right with the lowest probability
on their class (5 by default). For each query ``q`` ONE exact copy ``(x_q, y_q)`` is appended to
the training set (id ``n``, the last), and ``audit(model, train + copy, val, per_validation=True,
attribution={"queries": [q], "k": 10}, **config)`` scores it under five configurations:

- ``defaults``: the attribution defaults (standard, kronecker, damping 1e-4, ``normalize="centered"``,
  ``params="auto_lora_B"``, which on a model without LoRA is its weights: matrices and convolution
  kernels, no biases);
- ``previous defaults (every trainable parameter)``: the same with ``params="trainable"``;
- ``normalize none``: the defaults with ``normalize="none"``;
- ``exact, no normalisation``: ``method="standard", solver="exact", normalize="none"``;
- ``gradient dot product``: ``method="standard", solver="identity", normalize="none"``.

The duplicate's rank is its place among the ``n + 1`` training samples by "most helpful" for ``q``
(ascending ``result.per_validation[q]``; ties counted in its favour), cross-checked against the
library's own ``result.attribution.helpful_ids``. Two protocols: the model as trained (the copy
was never trained on: the main protocol), and after 50 fine-tuning steps on a copy of the model
(Adam, lr 1e-3, batches of 63 random training samples plus the duplicate). Each table cell is
``rank-1 count / top-5 count / median rank (worst)`` over the queries of every seed.

Run: python benchmarks/attribution_plain.py [--quick] [--threads 1] [--seeds 0 1 2] [--queries 5]
Writes benchmarks/results/attribution_plain_<date>.json (``--out`` to change it); ``--quick``
(blobs, one seed, 2 queries: seconds) is the smoke test.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import common

TASKS = {"blobs": "blobs", "digits_mlp": "digits MLP", "digits_cnn": "digits CNN"}
#: column name -> audit() keywords (beside per_validation=True and the attribution query)
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "previous defaults (every trainable parameter)": {"params": "trainable"},
    "normalize none": {"normalize": "none"},
    "exact, no normalisation": {"method": "standard", "solver": "exact", "normalize": "none"},
    "gradient dot product": {"method": "standard", "solver": "identity", "normalize": "none"},
}
PROTOCOLS = {0: "no fine-tuning", 50: "after 50 fine-tuning steps"}
DTYPE = torch.float64


def make_task(task: str, seed: int) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """``(model, x_train, y_train, x_val, y_val)``, the model untrained (initialised from ``seed``)."""
    rng = np.random.RandomState(seed)
    if task == "blobs":
        from sklearn.datasets import make_blobs

        x, y = make_blobs(n_samples=600, n_features=12, centers=4, cluster_std=6.0, random_state=seed)
        x = (x - x.mean(0)) / x.std(0)
        perm = rng.permutation(len(x))
        x, y = x[perm], y[perm]
        xtr, ytr, xva, yva = x[:400], y[:400], x[400:], y[400:]
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
        shape: tuple[int, ...] = (12,)
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.data / 16.0, digits.target
        perm = rng.permutation(len(x))
        x, y = x[perm], y[perm]
        xtr, ytr, xva, yva = x[:1200], y[:1200], x[1200:], y[1200:]
        torch.manual_seed(seed)
        if task == "digits_mlp":
            model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
            shape = (64,)
        elif task == "digits_cnn":
            model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
            shape = (1, 8, 8)
        else:
            raise ValueError(f"unknown task {task!r}")

    def tensor(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=DTYPE)

    return (model.to(DTYPE), tensor(xtr).reshape(-1, *shape), torch.tensor(ytr).long(),
            tensor(xva).reshape(-1, *shape), torch.tensor(yva).long())


def train(model: nn.Module, x: Tensor, y: Tensor, seed: int, steps: int = 400, lr: float = 3e-3,
          batch_size: int = 64) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def fine_tune(model: nn.Module, train_set: TensorDataset, steps: int, seed: int) -> nn.Module:
    """A copy of ``model`` after ``steps`` Adam steps (lr 1e-3) on batches of 63 random training
    samples plus the duplicate (the last sample)."""
    m = copy.deepcopy(model).train()
    x, y = train_set.tensors
    n = len(y) - 1
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.cat([torch.randint(0, n, (63,), generator=g), torch.tensor([n])])
        opt.zero_grad()
        nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.step()
    return m.eval()


@torch.no_grad()
def probs(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).softmax(-1)


def score_query(model: nn.Module, train_set: TensorDataset, val_set: TensorDataset, q: int,
                config: dict[str, Any]) -> dict[str, Any]:
    """The duplicate's rank for query ``q`` under one configuration."""
    from lightning_influence import audit

    n = len(train_set) - 1
    t0 = time.perf_counter()
    res = audit(model, train_set, val_set, per_validation=True, attribution={"queries": [q], "k": 10}, **config)
    seconds = time.perf_counter() - t0
    s = res.per_validation[q].double()
    dup = s[n].item()
    rank = 1 + int((s < dup).sum())  # ties counted in the duplicate's favour (and reported)
    helpful = [int(i) for i in res.attribution.helpful_ids[0].tolist()]
    order = torch.argsort(s)[:len(helpful)].tolist()
    return {"rank": rank, "ties": int((s == dup).sum()) - 1, "top1": helpful[0],
            "rank_in_helpful_ids": helpful.index(n) + 1 if n in helpful else None,
            "helpful_ids_consistent": set(helpful) == set(order)
            and ((helpful.index(n) + 1 == rank) if n in helpful else rank > len(helpful)),
            "method": res.method, "solver": res.solver, "normalize": res.config.get("normalize"),
            "params": str(res.config.get("params")), "damping": (res.config.get("curvature") or {}).get("damping"),
            "seconds": seconds}


def cell(ranks: Sequence[int]) -> str:
    """``rank-1 count / top-5 count / median rank (worst)``."""
    return (f"{sum(r == 1 for r in ranks)} / {sum(r <= 5 for r in ranks)} / "
            f"{statistics.median(ranks):g} ({max(ranks)})")


def table(doc: dict[str, Any]) -> dict[str, Any]:
    raw, opts = doc["raw"], doc["options"]
    rows = []
    for task in opts["tasks"]:
        for steps in opts["finetune"]:
            sel = [r for r in raw if r["task"] == task and r["finetune_steps"] == steps]
            if not sel:
                continue
            queries = len({(r["seed"], r["query"]) for r in sel})
            rows.append([TASKS[task], PROTOCOLS.get(steps, f"after {steps} fine-tuning steps"), queries]
                        + [cell([r["rank"] for r in sel if r["column"] == c]) if any(r["column"] == c for r in sel)
                           else None for c in CONFIGS])
    learned = "; ".join(f"{TASKS[t]}: train {min(v['train_acc'] for v in s):.3f}-{max(v['train_acc'] for v in s):.3f}, "
                        f"validation {min(v['val_acc'] for v in s):.3f}-{max(v['val_acc'] for v in s):.3f}"
                        for t, s in doc["learned"].items())
    selected = {c: "; ".join(f"{t}: {names}" for t, names in v.items()) for c, v in doc["selected"].items()}
    inconsistent = sum(not r["helpful_ids_consistent"] for r in raw)
    ties = sum(r["ties"] > 0 for r in raw)
    notes = [
        "each cell: how many queries rank their duplicate first / in the top 5, and the median (worst) rank "
        "among the n + 1 training samples (n = 400 blobs, 1,200 digits), by most helpful (most negative "
        "per_validation score); ties counted in the duplicate's favour",
        f"queries per seed: the {opts['queries']} validation samples the model gets right with the lowest "
        f"probability on their class; seeds {opts['seeds']}; float64 models trained with torch Adam "
        "(400 steps, lr 3e-3, batch 64)",
        "no fine-tuning: the duplicate was never trained on (the main protocol); after 50 steps: a copy of "
        "the model fine-tuned with Adam (lr 1e-3) on batches of 63 random training samples plus the duplicate",
        "defaults: audit(per_validation=True, attribution=...) alone: standard, kronecker, damping 1e-4, "
        "normalize='centered', params='auto_lora_B', which on a model without LoRA selects the weights "
        f"({selected['defaults']}); previous defaults: params='trainable' "
        f"({selected['previous defaults (every trainable parameter)']}); exact and gradient dot "
        "product: method='standard' given, so the plain defaults apply to the rest (every trainable "
        "parameter, damping 0.1 relative, the library's default)",
        f"learned (min-max over seeds): {learned}",
        f"library's helpful_ids disagreeing with the per_validation order: {inconsistent} of {len(raw)} audits; "
        f"audits with a tie at the duplicate's score: {ties}",
        f"wall time {doc['wall_seconds']:.0f} s on {doc['options']['threads']} thread(s)",
    ]
    return {"title": "Attribution on plain models: the duplicate of a query ranked most helpful",
            "machine": doc["machine"], "date": doc["date"], "command": doc["command"],
            "columns": ["task", "protocol", "queries", *CONFIGS], "rows": rows, "notes": notes}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--queries", type=int, default=5, help="queries per seed")
    ap.add_argument("--finetune", nargs="+", type=int, default=[0, 50],
                    help="protocols: fine-tuning steps after adding the duplicate (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="blobs, one seed, 2 queries (seconds)")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.quick:
        opts.tasks, opts.seeds, opts.queries = opts.tasks[:1], opts.seeds[:1], min(opts.queries, 2)
    from lightning_influence.params import select_blocks

    start = time.perf_counter()
    doc: dict[str, Any] = {"title": "Attribution on plain models: duplicate recovery",
                           **common.provenance(__file__, argv),
                           "options": {k: v for k, v in vars(opts).items() if k != "out"}, "learned": {},
                           "selected": {}, "raw": []}
    out = opts.out or os.path.join(common.RESULTS, f"attribution_plain_{doc['date'][:10]}.json")
    for task in opts.tasks:
        for seed in opts.seeds:
            model, xtr, ytr, xva, yva = make_task(task, seed)
            train(model, xtr, ytr, seed)
            ptr, pva = probs(model, xtr), probs(model, xva)
            p_true = pva[torch.arange(len(yva)), yva]
            correct = torch.where(pva.argmax(-1) == yva)[0]
            queries = correct[torch.argsort(p_true[correct])][:opts.queries].tolist()
            learned = {"seed": seed, "train_acc": (ptr.argmax(-1) == ytr).double().mean().item(),
                       "val_acc": (pva.argmax(-1) == yva).double().mean().item(), "queries": queries,
                       "p_true": [p_true[q].item() for q in queries], "n_train": len(ytr), "n_val": len(yva)}
            doc["learned"].setdefault(task, []).append(learned)
            for column, spec in (("defaults", "auto_lora_B"),
                                 ("previous defaults (every trainable parameter)", "trainable")):
                names = ", ".join(b.name for b in select_blocks(model, spec))
                doc["selected"].setdefault(column, {})[TASKS[task]] = names
            print(f"{task} seed {seed}: train acc {learned['train_acc']:.3f}, val acc {learned['val_acc']:.3f}, "
                  f"queries {queries}", flush=True)
            val_set = TensorDataset(xva, yva)
            for q in queries:
                train_set = TensorDataset(torch.cat([xtr, xva[q:q + 1]]), torch.cat([ytr, yva[q:q + 1]]))
                for steps in opts.finetune:
                    m = fine_tune(model, train_set, steps, 1000 + q) if steps else model
                    p_after = probs(m, xva[q:q + 1])[0, yva[q]].item()
                    for column, config in CONFIGS.items():
                        r = score_query(m, train_set, val_set, q, config)
                        doc["raw"].append({"task": task, "seed": seed, "query": q, "finetune_steps": steps,
                                           "column": column, "p_true": p_true[q].item(),
                                           "p_true_after": p_after, **r})
                        print(f"  q{q} ft{steps} {column}: rank {r['rank']} ({r['seconds']:.2f} s)", flush=True)
            doc["wall_seconds"] = time.perf_counter() - start
            doc["tables"] = [table(doc)]
            common.write_results(common.clean(doc), out)  # after every model: a partial run keeps its rows
    return doc


if __name__ == "__main__":
    main()
