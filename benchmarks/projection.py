"""Projection accuracy: Spearman correlation of projected against unprojected scores.

The audited blocks are full attention weights (query and value, 384 x 384, of the last two
layers of all-MiniLM-L6-v2, fine-tuned with LoRA on noisy SST-2): blocks too big to keep per
sample at scale, which is what projection is for. Each side of each block is projected to k
dimensions (LoGra-style, from the activations and output gradients), for several k.

Run: python benchmarks/projection.py [--quick] [--glue-dir ../shared/data]
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

import common
from common import minilm_lora, minilm_tokenizer, provenance, text_loader, train_text, write_results
from lightning_influence import TuningConfig, audit
from lightning_influence.data import shuffled_loader_factory
from lightning_influence.params import select_blocks
from lightning_influence.tuning import tune
from tasks import noisy_glue

PATTERNS = ["*.layer.4.attention.self.query.base_layer.weight", "*.layer.4.attention.self.value.base_layer.weight",
            "*.layer.5.attention.self.query.base_layer.weight", "*.layer.5.attention.self.value.base_layer.weight"]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", default=common.GLUE_DIR)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--out", default=None,
                        help="default benchmarks/results/projection.json (--quick: a temporary file)")
    parser.add_argument("--quick", action="store_true", help="64/24 sentences, k=16 only, a temporary --out (tests)")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_val, args.dims = 64, 24, [16]
        import tempfile

        args.out = args.out or os.path.join(tempfile.gettempdir(), "projection_quick.json")  # never rendered
    args.out = args.out or os.path.join(common.RESULTS, "projection.json")
    torch.manual_seed(0)
    split = noisy_glue(os.path.join(args.glue_dir, "sst2"), "sst2", args.n_train, args.n_val, rate=0.2, seed=0)
    tokenizer = minilm_tokenizer()
    model = train_text(minilm_lora(0), split.train, tokenizer, epochs=1, max_length=48)
    train = text_loader(split.train, tokenizer, 32, 48)
    val = text_loader(split.val, tokenizer, 32, 48)
    # Tune once to the flat validation minimum (what audit(method="fvm") does first), then audit the
    # tuned weights with every projection size: the comparison isolates the projection.
    tuned = copy.deepcopy(model)
    tune_steps = 20 if not args.quick else 4
    blocks = select_blocks(tuned, PATTERNS)
    tune(tuned, [b.param for b in blocks], shuffled_loader_factory(val, 32, 0), TuningConfig(steps=tune_steps),
         sharpness_aware=True)
    model = tuned
    # rank_by="influence": the scores compared are the fvm influence scores the projection changes (the
    # default ranking, the loss at θ̃, does not depend on the projection)
    shared = dict(method="fvm", params=PATTERNS, noisy=split.noisy, tuning={"steps": 0}, rank_by="influence")
    start = time.perf_counter()
    full = audit(model, train, val, **shared)
    full_time = time.perf_counter() - start
    per_sample = full.config["audited_parameters"]
    rows = [["none", per_sample, "1.000", f"{full.metrics['auroc']:.3f}", f"{full_time:.1f}"]]
    raw = {"none": {"auroc": full.metrics["auroc"], "seconds": full_time}}
    for k in args.dims:
        start = time.perf_counter()
        sketched = audit(model, train, val, projection=k, **shared)
        seconds = time.perf_counter() - start
        rho = spearman(full.scores, sketched.scores)
        stored = 4 * k * k
        rows.append([k, stored, f"{rho:.3f}", f"{sketched.metrics['auroc']:.3f}", f"{seconds:.1f}"])
        raw[str(k)] = {"spearman": rho, "auroc": sketched.metrics["auroc"], "seconds": seconds}
        print(rows[-1], flush=True)
    result = {"tables": [{
        "title": "Gradient projection: rank agreement with unprojected scores (fvm + hyperinf)",
        **provenance(__file__),
        "columns": ["k per side", "numbers stored per sample", "Spearman vs unprojected", "AUROC", "audit s"],
        "rows": rows,
        "notes": [f"fvm: SAM-tuned {tune_steps} steps on the validation set once, then scored with each projection; "
                  f"MiniLM + LoRA r=8 fine-tuned 1 epoch on {args.n_train} SST-2 sentences (20 % flipped), "
                  f"{args.n_val} clean validation sentences; audited: full query/value weights of layers 4-5 "
                  "(4 blocks of 384 x 384)"],
    }], "raw": raw}
    write_results(result, args.out)


if __name__ == "__main__":
    main()
