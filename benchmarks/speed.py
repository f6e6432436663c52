"""Speed and memory of the audit, as ratios measured in one process.

1. per-sample gradient throughput against a plain training step (forward + backward, same
   batch size): the physical limit is about 1x;
2. each solver's time on the same (synthetic, LoRA-shaped) gradients, scaling with n and with
   the block size;
3. the end-to-end audit against one training epoch over the same data;
4. peak memory against the size of the stored gradients.

Models: the digits MLP (all parameters audited) and all-MiniLM-L6-v2 + LoRA r=8 on
query/value on SST-2 sentences.

Run: python benchmarks/speed.py [--quick] [--glue-dir ../shared/data]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from common import RssSampler, digits_mlp, minilm_lora, minilm_tokenizer, text_loader, train_mlp, write_results
from common import machine_info as machine
from common import now as today
from lightning_influence import audit, make_solver
from lightning_influence.gradients import gradient_mode, per_sample_gradients
from lightning_influence.losses import default_loss
from lightning_influence.params import select_blocks
from tasks import noisy_digits, noisy_glue

GIB = 2**30


def best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Fastest of ``repeat`` timed calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def throughput(model: nn.Module, batches: list[Any]) -> dict[str, float]:
    """Samples/s of a training step (forward + backward of the mean loss over the trainable
    parameters) and of per-sample gradients of the audited blocks, on the same batches."""
    blocks = select_blocks(model, "auto")
    n = sum(default_loss(model, b).losses.shape[0] for b in batches[:1]) * len(batches)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> None:
        model.eval()  # same mode as the gradient pass: no dropout, a like-for-like comparison
        for batch in batches:
            loss = default_loss(model, batch).losses.mean()
            torch.autograd.grad(loss, trainable)

    def per_sample() -> None:
        with gradient_mode(model, blocks):
            for batch in batches:
                per_sample_gradients(model, blocks, batch)

    t_train, t_grad = best_of(train_step), best_of(per_sample)
    return {"train_samples_per_s": n / t_train, "grad_samples_per_s": n / t_grad, "ratio": t_train / t_grad}


def solver_times(ns: list[int], dims: list[int], rank: int = 8, m_curv: int = 500) -> list[dict[str, Any]]:
    """Seconds to fit each solver on ``m_curv`` curvature gradients and apply it to ``n``
    training gradients of one ``(rank, d)`` block (the fvm pattern), float32."""
    out = []
    for d in dims:
        for n in ns:
            g = torch.Generator().manual_seed(n + d)
            curv = torch.randn(m_curv, rank, d, generator=g)
            train = torch.randn(n, rank, d, generator=g)
            lam = 0.1 * float(curv.pow(2).mean())
            for name in ("identity", "datainf", "hyperinf", "exact", "lissa"):
                solver = make_solver(name, **({"max_iter": 200} if name == "lissa" else {}))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    start = time.perf_counter()
                    solver.fit(curv, lam)
                    fit = time.perf_counter() - start
                    start = time.perf_counter()
                    for chunk in train.split(1024):
                        (chunk * solver.apply(chunk)).sum((1, 2))
                    apply = time.perf_counter() - start
                out.append({"solver": name, "n": n, "d": d, "fit_s": fit, "apply_s": apply})
                print(out[-1], flush=True)
    return out


def epoch_vs_audit(model: nn.Module, train: Any, val: Any, train_batches: list[Any],
                   batch_size: int, with_estimate: bool = False, lr: float = 1e-4) -> dict[str, Any]:
    """One training epoch (forward, backward, AdamW step at ``lr``) vs the end-to-end fvm audit,
    at the library's defaults (one-pass SAM, a tuning budget of half a training epoch of compute,
    its checks included), of the model that epoch trained: what the callback audits at the end of ``fit``."""
    import copy

    trained = copy.deepcopy(model)
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    trained.train()
    start = time.perf_counter()
    for batch in train_batches:
        loss = default_loss(trained, batch).losses.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    epoch = time.perf_counter() - start
    sampler = RssSampler()  # the audit's own peak, sampled from its starting RSS (ru_maxrss would be
    before = sampler.rss()  # hidden under the training epoch's high-water mark)
    start = time.perf_counter()
    with sampler:
        result = audit(trained, train, val, method="fvm", batch_size=batch_size)
    total = time.perf_counter() - start
    peak = max(sampler.peaks.values(), default=before)
    per_sample = result.config["audited_parameters"] * 4  # float32 storage
    # the validation store, and the training store where one is kept (vm/fvm score as they gather)
    stored = per_sample * ((0 if result.config.get("scored_as_gathered") else len(result))
                           + len(val.dataset if hasattr(val, "dataset") else val))
    tuning = result.stage_seconds.get("tuning", 0.0)
    estimate = {}
    if with_estimate and result.preflight is not None:
        pf = result.preflight
        estimate = {"estimate_store_bytes": pf.store_bytes, "estimate_val_bytes": pf.val_bytes,
                    "estimate_solve_bytes": pf.solve_bytes,
                    "estimate_total_bytes": getattr(pf, "peak_bytes", None)
                    or pf.store_bytes + pf.val_bytes + pf.solve_bytes}
    return {**estimate, "epoch_s": epoch, "audit_s": total, "tuning_s": tuning, "audit_minus_tuning_s": total - tuning,
            "audit_over_epoch": total / epoch,
            "ratio_without_tuning": (total - tuning) / epoch, "tuning_over_epoch": tuning / epoch,
            "tuning_steps": result.tuning.get("steps", 0.0), "tuning_passes": result.tuning.get("epochs", 0.0),
            "tuning_at_minimum": result.tuning.get("at_minimum", float("nan")), "stages": result.stage_seconds,
            "tuning": dict(result.tuning),
            "stored_gradient_bytes": stored, "peak_rss_growth_bytes": max(peak - before, 0)}


class PackedTokens(torch.utils.data.Dataset):
    """Causal-LM samples of ``length`` tokens packed from a list of texts (no padding):
    ``{"input_ids", "attention_mask", "labels"}`` with ``labels = input_ids`` (the model shifts)."""

    def __init__(self, texts: list[str], tokenizer: Any, length: int, count: int, vocab: int) -> None:
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) >= length * count:
                break
        while len(ids) < length * count:  # repeat the text when it is short
            ids = ids + ids
        self.ids = (torch.tensor(ids[:length * count]) % vocab).view(count, length)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.ids[i]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}


def gpt2_small_lora(seed: int, r: int = 8) -> nn.Module:
    """GPT-2 small (124M parameters, built from its default config: no hub) with PEFT LoRA ``r``
    on ``c_attn``, ``c_proj`` (attention and MLP) and ``c_fc``: 96 blocks."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config())
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True)
    return get_peft_model(model, config)


def gpt2_rung(glue_dir: str, n: int, m: int, length: int, batch_size: int) -> dict[str, Any]:
    """The 124M rung: GPT-2 small + LoRA on attention and MLP, ``n`` training and ``m``
    validation sequences of ``length`` tokens (SST-2 sentences packed, tokenised by MiniLM's
    tokenizer), the library's defaults (fvm + hyperinf, tuning ``epochs="auto"``): one AdamW
    epoch against the audit, per stage; per-sample gradient throughput against a training step;
    peak RSS growth against the pre-flight check's estimate."""
    from torch.utils.data import DataLoader

    from tasks import read_glue_tsv

    texts, _ = read_glue_tsv(os.path.join(glue_dir, "sst2", "train.tsv"), "sst2")
    tokenizer = minilm_tokenizer()
    model = gpt2_small_lora(0)
    vocab = model.config.vocab_size
    train = PackedTokens(texts, tokenizer, length, n, vocab)
    val = PackedTokens(texts[::-1], tokenizer, length, m, vocab)
    train_loader = DataLoader(train, batch_size=batch_size)
    val_loader = DataLoader(val, batch_size=batch_size)
    batches = list(train_loader)
    out: dict[str, Any] = {"n": n, "m": m, "length": length, "batch_size": batch_size,
                           "parameters": sum(p.numel() for p in model.parameters())}
    out["throughput"] = throughput(model, batches[: max(2, len(batches) // 8)])
    out["epoch"] = epoch_vs_audit(model, train_loader, val_loader, batches, batch_size, with_estimate=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--glue-dir", default=os.path.join(here, "..", "..", "shared", "data"))
    parser.add_argument("--n-text", type=int, default=512)
    parser.add_argument("--solver-ns", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--solver-dims", type=int, nargs="+", default=[64, 384, 1024])
    parser.add_argument("--out", default=os.path.join(here, "results", "speed.json"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--gpt2", action="store_true",
                        help="run only the 124M rung (GPT-2 small + LoRA), written to results/speed_gpt2.json")
    parser.add_argument("--gpt2-n", type=int, default=1000, help="the rung's training sequences")
    parser.add_argument("--gpt2-m", type=int, default=100, help="the rung's validation sequences")
    parser.add_argument("--gpt2-len", type=int, default=128, help="the rung's tokens per sequence")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpt2:
        if args.quick:
            args.gpt2_n, args.gpt2_m, args.gpt2_len = 16, 8, 32
        gpt2_main(args, os.path.join(here, "results", "speed_gpt2.json") if args.out == parser.get_default("out")
                  else args.out)
        return
    if args.quick:
        args.n_text, args.solver_ns, args.solver_dims = 64, [200, 400], [32]
    torch.manual_seed(0)
    tables, raw = [], {}

    # --- digits MLP
    split = noisy_digits(0.2, seed=0)
    mlp = train_mlp(digits_mlp(0), split.train.x, split.train.y, epochs=50 if args.quick else 300)
    x, y = split.train.x, split.train.y
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(y) - 127, 128)]
    raw["digits_throughput"] = throughput(mlp, batches)
    raw["digits_epoch"] = epoch_vs_audit(mlp, split.train, split.val, batches, 128)

    # --- MiniLM + LoRA on SST-2
    text = noisy_glue(os.path.join(args.glue_dir, "sst2"), "sst2", args.n_text, max(32, args.n_text // 8), 0.2)
    tokenizer = minilm_tokenizer()
    lm = minilm_lora(0)
    train_loader = text_loader(text.train, tokenizer, 32, 64)
    val_loader = text_loader(text.val, tokenizer, 32, 64)
    text_batches = list(train_loader)
    raw["minilm_throughput"] = throughput(lm, text_batches[: max(2, len(text_batches) // 4)])
    raw["minilm_epoch"] = epoch_vs_audit(lm, train_loader, val_loader, text_batches, 32, lr=3e-3)

    rows = []
    for key, label in (("digits", "digits MLP (all 4,810 parameters audited), batch 128"),
                       ("minilm", "MiniLM + LoRA r=8 q/v (24 blocks), SST-2, batch 32")):
        t, e = raw[f"{key}_throughput"], raw[f"{key}_epoch"]
        rows.append([label, f"{t['train_samples_per_s']:.0f}", f"{t['grad_samples_per_s']:.0f}", f"{t['ratio']:.2f}",
                     f"{e['epoch_s']:.1f}", f"{e['audit_minus_tuning_s']:.1f}", f"{e['ratio_without_tuning']:.2f}",
                     f"{e['tuning_s']:.1f}", f"{e['tuning_over_epoch']:.2f}", f"{e['audit_over_epoch']:.2f}",
                     f"{e['stored_gradient_bytes'] / 2**20:.1f}",
                     f"{e['peak_rss_growth_bytes'] / 2**20:.0f}"])
    tables.append({
        "title": "Audit speed against training", "machine": machine(), "date": today(),
        "command": " ".join(["python benchmarks/speed.py"] + sys.argv[1:]),
        "columns": ["model", "train step samples/s", "per-sample grads samples/s", "grad / train",
                    "1 epoch s", "audit s (w/o tuning)", "audit w/o tuning / epoch", "tuning s", "tuning / epoch",
                    "audit with tuning / epoch", "stored grads MiB",
                    "peak RSS growth MiB"],
        "rows": rows,
        "notes": ["train step = forward + backward of the mean loss (no optimizer), same batches; "
                  "grad / train = per-sample gradient throughput over training throughput (goal >= 0.7)",
                  "the audit: end-to-end fvm at the library's defaults of the model the timed AdamW epoch "
                  "trained (MiniLM: from fresh LoRA and head at lr 3e-3, the recipe of tuning_check.py and "
                  "quality.py); tuning = its validation tuning (one-pass SAM, epochs='auto': a budget of half a "
                  "training epoch of compute, its checks included); audit with tuning / epoch: the whole audit "
                  "over that epoch (goal <= 1.5)",
                  f"torch threads: {torch.get_num_threads()}",
                  "the digits MLP is so small (4,810 parameters, ~4 ms per epoch) that fixed per-call "
                  "overheads (hooks, the model copy, loader set-up) dominate its ratios; MiniLM is the "
                  "representative row"],
    })
    solver_rows = solver_times(args.solver_ns, args.solver_dims)
    raw["solvers"] = solver_rows
    tables.append({
        "title": "Solver time on the same gradients (fit on 500 curvature samples + apply to n), one (8, d) block",
        "machine": machine(), "date": today(),
        "command": " ".join(["python benchmarks/speed.py"] + sys.argv[1:]),
        "columns": ["solver", "d"] + [f"n={n} s" for n in args.solver_ns],
        "rows": [[s, d] + [f"{r['fit_s'] + r['apply_s']:.3f}" for r in solver_rows if r["solver"] == s and r["d"] == d]
                 for d in args.solver_dims for s in ("identity", "datainf", "hyperinf", "exact", "lissa")],
        "notes": ["lissa capped at 200 iterations here (it needs O(condition number) iterations to converge)"],
    })
    result = {"tables": tables, "raw": raw}
    write_results(result, args.out)


def gpt2_main(args: argparse.Namespace, out: str) -> None:
    """The 124M rung alone, in its own process (its peak RSS is not mixed with other runs')."""
    raw = gpt2_rung(args.glue_dir, args.gpt2_n, args.gpt2_m, args.gpt2_len, batch_size=8)
    t, e = raw["throughput"], raw["epoch"]
    stages = e["stages"]
    row = [f"GPT-2 small ({raw['parameters'] / 1e6:.0f}M) + LoRA r=8 c_attn/c_proj/c_fc (96 blocks), "
           f"{raw['n']}/{raw['m']} x {raw['length']} tokens, batch 8",
           f"{t['train_samples_per_s']:.2f}", f"{t['grad_samples_per_s']:.2f}", f"{t['ratio']:.2f}",
           f"{e['epoch_s']:.1f}", f"{e['audit_s']:.1f}", f"{e['audit_over_epoch']:.2f}",
           f"{e['peak_rss_growth_bytes'] / 2**20:.0f}", f"{e.get('estimate_total_bytes', 0) / 2**20:.0f}"]
    table = {
        "title": "The 124M rung: audit with its tuning against one training epoch",
        "machine": machine(), "date": today(), "command": " ".join(["python benchmarks/speed.py"] + sys.argv[1:]),
        "columns": ["model", "train step samples/s", "per-sample grads samples/s", "grad / train", "1 epoch s",
                    "audit s (with tuning)", "audit / epoch", "peak RSS growth MiB (sampled)", "check's estimate MiB"],
        "rows": [row],
        "notes": ["stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()),
                  f"torch threads: {torch.get_num_threads()}"],
    }
    write_results({"tables": [table], "raw": raw}, out)


if __name__ == "__main__":
    main()
