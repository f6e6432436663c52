"""A small audit on real data: an MLP on scikit-learn's digits with 20 % flipped labels.

Run: python examples/audit_digits.py
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_influence import audit
from lightning_influence.datasets import noisy_digits


def main() -> None:
    torch.manual_seed(0)
    split = noisy_digits(rate=0.2, seed=0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = split.train.x, split.train.y
    for _ in range(60):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    result = audit(model, split.train, split.val, method="fvm", noisy=split.noisy,
                   clean_labels=split.clean_labels, tuning={"steps": 300})
    print("top-10 most harmful:", result.ranking[:10].tolist())
    print({k: round(v, 4) for k, v in result.metrics.items()})
    print("seconds per stage:", {k: round(v, 3) for k, v in result.stage_seconds.items()})
    result.save("digits_scores.csv")
    print("scores written to digits_scores.csv")


if __name__ == "__main__":
    main()
