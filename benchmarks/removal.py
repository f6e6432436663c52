"""Retrain after removal: does removing what a ranking flags make the retrained model better?

For each task and seed: train the digits MLP (the recipe of ``quality.py``) on a corrupted
training set, rank the training samples with every ranking (fvm, vm, standard influence;
the loss at θ̃ and at θ*; cleanlab; random), remove the top q % of the training set, retrain
from scratch with the same recipe and seed, and measure the validation accuracy and the
accuracy on a held-out clean test set (never used by any ranking). Mean ± std over seeds.

Tasks (digits, 300 clean validation / 400 clean test images, the rest training):

- ``sym20``: 20 % symmetric label flips;
- ``pair20``: 20 % class-dependent flips (each class to one fixed other class);
- ``marker10``: a harm that is not plain label noise: 10 % of the training images get a marker
  (the 4 corner pixels set to full intensity, a pattern absent from validation and test) and
  the label 0 whatever they show. The marker makes them easy to fit: their loss stays low.
- ``offdist10``: off-distribution but correctly labelled: 10 % of the training images rotated
  by a quarter turn (90°), each keeping its true label; validation and test are upright.
- ``dup10``: near-duplicates: 10 % of the training images replaced by noisy copies (pixel noise
  σ 0.05, clipped to [0, 1]) of 5 other training images, each copy labelled with its source's
  (true) label; the 5 sources stay as they are.

In the last three the planted samples are the ``harmful`` ground truth of the detection column
(share of them among the removed). Every task also has the ``oracle`` ranking: the planted
samples first (random order among them and among the rest), the ceiling of removal at each q.

And at CPU scale, text:

- ``sst2``: SST-2 with MiniLM-L6 + LoRA r=8 (the recipe of ``tuning_check.py``: AdamW lr 3e-3,
  batch 32, 2 epochs), 600 training sentences of ``train.tsv`` with 20 % flipped labels, 200
  clean validation and 300 clean test sentences of ``dev.tsv`` (disjoint); the rankings of
  ``--sst2-rankings`` (default fvm, loss at θ̃, loss at θ*, random).

Run: python benchmarks/removal.py [--quick] [--seeds 0 1 2] [--tasks sym20 pair20 marker10 offdist10 dup10 sst2]
     [--glue-dir ../shared/data]
Writes benchmarks/results/removal.json (rendered into docs/BENCHMARKS.md by render.py). The SST-2 table:
python benchmarks/removal.py --tasks sst2 --glue-dir ../shared/data --sst2-epochs 3 --q 5 10 20
--out benchmarks/results/removal_sst2.json (about 20 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import common
from lightning_influence import AuditOptions, prepare, score
from lightning_influence.metrics import nan_last_ranking
from tasks import TensorPairs, flip_labels

TASKS = {"sym20": "digits, 20 % symmetric flips", "pair20": "digits, 20 % class-dependent flips",
         "marker10": "digits, 10 % marker -> label 0 (not plain label noise)",
         "offdist10": "digits, 10 % rotated 90° with true labels (off-distribution)",
         "dup10": "digits, 10 % near-duplicates of 5 images with true labels",
         "sst2": "SST-2, 20 % flips (MiniLM + LoRA, 600 train sentences)"}
DIGITS_TASKS = ("sym20", "pair20", "marker10", "offdist10", "dup10")
RANKINGS = ("fvm", "vm", "standard", "loss@θ̃", "loss@θ*", "cleanlab", "random", "oracle")
CORNERS = [0, 7, 56, 63]
#: fvm's tuning figures recorded with each seed's no-removal row
TUNING_KEYS = ("val_loss_trained", "val_loss_tuned", "val_acc_trained", "val_acc_tuned", "steps", "lr", "at_minimum",
               "retries")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_task(task: str, seed: int, n_val: int = 300, n_test: int = 400) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    va, te, tr = perm[:n_val], perm[n_val:n_val + n_test], perm[n_val + n_test:]
    xtr, ytr = x[tr].clone(), y[tr].clone()
    if task == "sym20":
        ytr, flags = flip_labels(ytr, 0.2, 10, "symmetric", seed)
    elif task == "pair20":
        ytr, flags = flip_labels(ytr, 0.2, 10, "pairwise", seed)
    elif task == "marker10":
        g = torch.Generator().manual_seed(seed + 1)
        candidates = (ytr != 0).nonzero().squeeze(1)
        k = int(round(0.1 * len(ytr)))
        chosen = candidates[torch.randperm(len(candidates), generator=g)[:k]]
        flags = torch.zeros(len(ytr), dtype=torch.bool)
        flags[chosen] = True
        xtr[chosen.unsqueeze(1), torch.tensor(CORNERS)] = 1.0
        ytr[chosen] = 0
    elif task in ("offdist10", "dup10"):
        g = torch.Generator().manual_seed(seed + 1)
        order = torch.randperm(len(ytr), generator=g)
        k = int(round(0.1 * len(ytr)))
        chosen = order[:k]
        flags = torch.zeros(len(ytr), dtype=torch.bool)
        flags[chosen] = True
        if task == "offdist10":  # a quarter turn of the 8x8 image, the label unchanged
            xtr[chosen] = torch.rot90(xtr[chosen].view(-1, 8, 8), 1, (1, 2)).reshape(-1, 64)
        else:  # k noisy copies of 5 unflagged sources, round robin, with the sources' labels
            sources = order[k:k + 5]
            pick = sources[torch.arange(k) % len(sources)]
            xtr[chosen] = (xtr[pick] + 0.05 * torch.randn(k, xtr.shape[1], generator=g)).clamp(0.0, 1.0)
            ytr[chosen] = ytr[pick]
    else:
        raise ValueError(task)
    return dict(xtr=xtr, ytr=ytr, flags=flags, xva=x[va], yva=y[va], xte=x[te], yte=y[te])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((common.mlp_probs(model, x).argmax(-1) == y).float().mean())


def rankings(d: dict[str, Any], model: torch.nn.Module, seed: int, opts: argparse.Namespace,
             ) -> "tuple[dict[str, torch.Tensor], dict[str, float]]":
    """Every ranking's scores (higher = remove first), and fvm's tuning figures."""
    train, val = TensorPairs(d["xtr"], d["ytr"]), TensorPairs(d["xva"], d["yva"])
    out, tuning = method_scores(model, train, val, ("fvm", "vm", "standard"), params="trainable", seed=seed,
                           batch_size=128, tuning=opts.tuning)

    def fit_predict(tr: np.ndarray, ho: np.ndarray, fold: int) -> torch.Tensor:
        m = common.train_mlp(common.digits_mlp(seed * 100 + fold + 1), d["xtr"][tr], d["ytr"][tr],
                             epochs=opts.train_steps, lr=1e-2, seed=seed)
        return common.mlp_probs(m, d["xtr"][ho])

    probs, _ = common.cross_val_probs(len(d["ytr"]), d["ytr"], 5, seed, fit_predict)
    out["cleanlab"] = common.cleanlab_scores(d["ytr"], probs)
    out["random"] = torch.rand(len(d["ytr"]), generator=torch.Generator().manual_seed(seed + 12345),
                               dtype=torch.float64)
    out["oracle"] = oracle_scores(d["flags"], seed)
    return out, tuning


def oracle_scores(flags: torch.Tensor, seed: int) -> torch.Tensor:
    """The planted (corrupted) samples first, each group in a random order."""
    noise = torch.rand(len(flags), generator=torch.Generator().manual_seed(seed + 54321), dtype=torch.float64)
    return flags.double() + 0.5 * noise


def method_scores(model: torch.nn.Module, train: Any, val: Any, methods: Sequence[str],
                  **prepare_kw: Any) -> "tuple[dict[str, torch.Tensor], dict[str, float]]":
    """Each method's influence score (hyperinf), plus the losses at θ̃ and θ* when fvm is among
    them (``"loss@θ̃"``, ``"loss@θ*"``), and fvm's tuning figures (``{}`` without fvm)."""
    out: dict[str, torch.Tensor] = {}
    tuning: dict[str, float] = {}
    for method in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = AuditOptions(method=method, solver="hyperinf", rank_by="influence", **prepare_kw)
            prepared = prepare(model, train, val, options)
            try:
                result = score(prepared, options)
            finally:
                prepared.close()
        out[method] = result.influence
        if method == "fvm":
            out["loss@θ̃"], out["loss@θ*"], tuning = result.loss_tuned, result.loss_trained, result.tuning
            log(f"    fvm tuning: val loss {tuning.get('val_loss_trained', float('nan')):.3f} -> "
                f"{tuning.get('val_loss_tuned', float('nan')):.3f}" + (" (retried)" if tuning.get("retries") else ""))
    return out, tuning


def sst2_split(seed: int, opts: argparse.Namespace) -> dict[str, Any]:
    from tasks import TextPairs, noisy_glue

    tok = common.minilm_tokenizer()
    split = noisy_glue(os.path.join(opts.glue_dir, "sst2"), "sst2", n_train=opts.sst2_train,
                       n_val=opts.sst2_val + opts.sst2_test, rate=0.2, seed=seed)
    v = split.val  # a random draw of dev.tsv: the first sentences validate, the rest test
    test = TextPairs(v.texts[opts.sst2_val:], v.labels[opts.sst2_val:])
    split.val = TextPairs(v.texts[:opts.sst2_val], v.labels[:opts.sst2_val])
    split = common.sort_by_length(split, tok, 64)
    return dict(tok=tok, train=split.train, val=split.val, test=test, flags=split.noisy)


def text_accuracy(model: torch.nn.Module, data: Any, tok: Any) -> float:
    return float((common.text_probs(model, data, tok).argmax(-1) == data.labels).float().mean())


def run_sst2(seed: int, opts: argparse.Namespace) -> list[dict[str, Any]]:
    d = sst2_split(seed, opts)
    tok, train, flags = d["tok"], d["train"], d["flags"]
    n = len(train)
    t0 = time.perf_counter()

    def fit(data: Any, model_seed: int) -> torch.nn.Module:
        return common.train_text(common.minilm_lora(model_seed), data, tok, epochs=opts.sst2_epochs, lr=3e-3,
                                 seed=seed, batch_size=32, max_length=64)

    def row(name: str, q: float, model: torch.nn.Module, harmful: float) -> dict[str, Any]:
        return dict(task="sst2", seed=seed, ranking=name, q=q, removed_harmful=harmful,
                    val=text_accuracy(model, d["val"], tok), test=text_accuracy(model, d["test"], tok))

    model = fit(train, seed)
    rows = [row("none", 0, model, 0.0)]
    wanted = opts.sst2_rankings
    methods = [m for m in ("fvm", "vm", "standard")
               if m in wanted or (m == "fvm" and {"loss@θ̃", "loss@θ*"} & set(wanted))]
    scores, fvm_tuning = method_scores(model, common.text_loader(train, tok, 32, 64),
                                       common.text_loader(d["val"], tok, 32, 64), methods, params="auto", seed=seed,
                                       batch_size=32, tuning=opts.tuning)
    if "fvm" in methods:
        rows[0].update({f"fvm_{k}": fvm_tuning.get(k, float("nan")) for k in TUNING_KEYS})
    if "cleanlab" in wanted:
        def fit_predict(tr: np.ndarray, ho: np.ndarray, fold: int) -> torch.Tensor:
            m = fit(common.subset(train, tr), seed * 100 + fold + 1)
            return common.text_probs(m, common.subset(train, ho), tok)

        probs, _ = common.cross_val_probs(n, train.labels, 5, seed, fit_predict)
        scores["cleanlab"] = common.cleanlab_scores(train.labels, probs)
    scores["random"] = torch.rand(n, generator=torch.Generator().manual_seed(seed + 12345), dtype=torch.float64)
    scores["oracle"] = oracle_scores(flags, seed)
    for name in wanted:
        order = nan_last_ranking(scores[name])
        for q in opts.q:
            k = int(round(q / 100 * n))
            keep = torch.ones(n, dtype=torch.bool)
            keep[order[:k]] = False
            retrained = fit(common.subset(train, keep.nonzero().squeeze(1).tolist()), seed)
            rows.append(row(name, q, retrained, float(flags[order[:k]].float().mean()) if k else 0.0))
        log(f"    {name}: done ({time.perf_counter() - t0:.0f}s)")
    log(f"  sst2 seed {seed}: {time.perf_counter() - t0:.0f}s")
    return rows


def run(task: str, seed: int, opts: argparse.Namespace) -> list[dict[str, Any]]:
    if task == "sst2":
        return run_sst2(seed, opts)
    d = make_task(task, seed)
    n = len(d["ytr"])
    t0 = time.perf_counter()
    model = common.train_mlp(common.digits_mlp(seed), d["xtr"], d["ytr"], epochs=opts.train_steps, lr=1e-2, seed=seed)
    rows = [dict(task=task, seed=seed, ranking="none", q=0, removed_harmful=0.0,
                 val=accuracy(model, d["xva"], d["yva"]), test=accuracy(model, d["xte"], d["yte"]))]
    scores, fvm_tuning = rankings(d, model, seed, opts)
    rows[0].update({f"fvm_{k}": fvm_tuning.get(k, float("nan")) for k in TUNING_KEYS})
    for name, s in scores.items():
        order = nan_last_ranking(s)
        for q in opts.q:
            k = int(round(q / 100 * n))
            keep = torch.ones(n, dtype=torch.bool)
            keep[order[:k]] = False
            retrained = common.train_mlp(common.digits_mlp(seed), d["xtr"][keep], d["ytr"][keep],
                                         epochs=opts.train_steps, lr=1e-2, seed=seed)
            rows.append(dict(task=task, seed=seed, ranking=name, q=q,
                             removed_harmful=float(d["flags"][order[:k]].float().mean()) if k else 0.0,
                             val=accuracy(retrained, d["xva"], d["yva"]), test=accuracy(retrained, d["xte"], d["yte"])))
    log(f"  {task} seed {seed}: {time.perf_counter() - t0:.0f}s")
    return rows


def stat(values: Sequence[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def tables(raw: list[dict[str, Any]], opts: argparse.Namespace, header: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for task in opts.tasks:
        rows = [r for r in raw if r["task"] == task]
        names = [name for name in RANKINGS if any(r["ranking"] == name for r in rows)]
        base = [r["test"] for r in rows if r["ranking"] == "none"]
        q_harm = opts.q[-2] if len(opts.q) > 1 else opts.q[0]
        cols = ["ranking"] + [f"test acc, q={q} %" for q in opts.q] + [f"harmful among removed, q={q_harm} %"]
        table_rows = [["no removal"] + [stat(base)] * len(opts.q) + ["–"]]
        best: dict[int, str] = {}
        for q in opts.q:
            means = {name: np.mean([r["test"] for r in rows if r["ranking"] == name and r["q"] == q])
                     for name in names if name != "oracle"}  # the oracle is the ceiling, not a contender
            best[q] = max(means, key=means.get)
        qh = opts.q[-2] if len(opts.q) > 1 else opts.q[0]
        for name in names:
            cells = []
            for q in opts.q:
                cell = stat([r["test"] for r in rows if r["ranking"] == name and r["q"] == q])
                cells.append(f"**{cell}**" if best[q] == name else cell)
            harm = stat([r["removed_harmful"] for r in rows if r["ranking"] == name and r["q"] == qh])
            table_rows.append([name] + cells + [harm])
        vcols = ["ranking"] + [f"val acc, q={q} %" for q in opts.q]
        vrows = [["no removal"] + [stat([r["val"] for r in rows if r["ranking"] == "none"])] * len(opts.q)]
        for name in names:
            vrows.append([name] + [stat([r["val"] for r in rows if r["ranking"] == name and r["q"] == q])
                                   for q in opts.q])
        recipe = (f"MiniLM-L6 + LoRA r=8 q/v, AdamW lr 3e-3, batch 32, {opts.sst2_epochs} epochs; {opts.sst2_train} "
                  f"train / {opts.sst2_val} val / {opts.sst2_test} test sentences" if task == "sst2" else
                  f"MLP 64-64-10, full-batch Adam lr 0.01, {opts.train_steps} steps")
        notes = [f"seeds {opts.seeds}; mean ± std over seeds (ddof=1); the best test accuracy per q in bold"
                 + (" (the oracle left out)" if "oracle" in names else ""),
                 "q = share of the training set removed (top of each ranking), then a retrain from scratch with the "
                 f"same recipe and seed ({recipe})",
                 "harmful among removed: the share of the removed samples that were corrupted",
                 "fvm/vm/standard: influence scores (hyperinf) with the library's default tuning "
                 f"{json.dumps(opts.tuning or {})}; "
                 "loss@θ̃: the loss at fvm's tuned weights; cleanlab: 5-fold confident learning"
                 + ("; oracle: the planted samples first (the ceiling)"
                    if any(r["ranking"] == "oracle" for r in rows) else "")]
        out.append(dict(title=f"Retrain after removal: {TASKS[task]}, clean test accuracy", columns=cols,
                        rows=table_rows, notes=notes, **header))
        out.append(dict(title=f"Retrain after removal: {TASKS[task]}, validation accuracy", columns=vcols,
                        rows=vrows, notes=notes[:2], **header))
    tuned = [(task, [r for r in raw if r["task"] == task and r["ranking"] == "none" and "fvm_val_loss_tuned" in r])
             for task in opts.tasks]
    tuned = [(task, rows) for task, rows in tuned if rows]
    if tuned:
        trows = []
        for task, rows in tuned:
            fell = sum(r["fvm_val_loss_tuned"] < r["fvm_val_loss_trained"] for r in rows)
            trows.append([task] + [stat([r[f"fvm_{k}"] for r in rows]) for k in
                                   ("val_loss_trained", "val_loss_tuned", "val_acc_trained", "val_acc_tuned")]
                         + [f"{fell}/{len(rows)}", f"{sum(r['fvm_at_minimum'] == 1 for r in rows)}/{len(rows)}"])
        out.append(dict(title="Retrain after removal: fvm's validation tuning (θ* → θ̃) on each task",
                        columns=["task", "val loss at θ*", "val loss at θ̃", "val acc at θ*", "val acc at θ̃",
                                 "seeds where the loss fell", "seeds at a minimum (audit check)"],
                        rows=trows, notes=[f"seeds {opts.seeds}; mean ± std over seeds (ddof=1); the full validation "
                                           "set in eval mode, at the model trained on the whole (corrupted) training "
                                           "set; θ̃ is what fvm and loss@θ̃ rank at (vm tunes its own)"], **header))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 task, 2 removal levels, short training (tests)")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(DIGITS_TASKS))
    ap.add_argument("--glue-dir", default=common.GLUE_DIR)
    ap.add_argument("--sst2-train", type=int, default=600)
    ap.add_argument("--sst2-val", type=int, default=200)
    ap.add_argument("--sst2-test", type=int, default=300)
    ap.add_argument("--sst2-epochs", type=int, default=2)
    ap.add_argument("--sst2-rankings", nargs="+", choices=list(RANKINGS),
                    default=["fvm", "loss@θ̃", "loss@θ*", "random"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--q", nargs="+", type=float, default=[2, 5, 10, 20])
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--tuning", type=json.loads, default=None, help="TuningConfig overrides (JSON)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default benchmarks/results/removal.json (--quick: a temporary file)")
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.tasks, opts.seeds, opts.q, opts.train_steps = opts.tasks[:1], opts.seeds[:1], [5, 10], 200
        import tempfile

        opts.out = opts.out or os.path.join(tempfile.gettempdir(), "removal_quick.json")  # never rendered into the docs
    opts.out = opts.out or os.path.join(common.RESULTS, "removal.json")
    torch.set_num_threads(opts.threads)
    header = common.provenance(__file__, argv)
    raw: list[dict[str, Any]] = []
    for task in opts.tasks:
        for seed in opts.seeds:
            raw.extend(run(task, seed, opts))
    doc = dict(tables=tables(raw, opts, header), raw=raw, **header)
    common.write_results(doc, opts.out)
    return doc


if __name__ == "__main__":
    main()
