"""The tuning budget and the validation batches it is spent on.

How many passes over the validation set tuning runs (:func:`budget_epochs`, weighted by a
training sample's size beside a validation sample's: :func:`relative_sample_cost`), how many
steps that is (:func:`planned_steps`, and :func:`steps_after_checks` once the checks at θ* are
paid for), and the loaders the steps draw their mini-batches from
(:func:`bucketed_loader_factory`, :func:`endless_batches`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, default_collate

from ..config import TuningConfig
from ..data import collate_of, dataset_of, shuffled_loader_factory

#: the most passes over the validation set that ``epochs="auto"`` plans
MAX_AUTO_EPOCHS = 10.0
#: the fewest passes over the validation set that ``epochs="auto"`` plans
MIN_AUTO_EPOCHS = 0.5
#: a forward pass's cost beside a forward-backward pass's, for counting the checks in the budget
#: (1/3 for full weight gradients; about 1/2 (measured) for MiniLM + LoRA, whose frozen weights need none)
FORWARD_COST = 0.5
#: ``epochs="auto"``: the checks are counted inside the budget, but at least this share of the
#: budget is left to the tuning steps
MIN_STEP_SHARE = 0.25


def budget_epochs(config: TuningConfig, train_size: float | None, val_size: int, sharpness_aware: bool) -> float:
    """Passes over the validation set: ``config.epochs``, or for ``"auto"`` the compute of
    ``b = config.budget`` training epochs (``b x n`` forward-backward passes; two-pass SAM takes
    two per sample) over the ``m`` validation samples: ``b x n / m`` for vm and one-pass fvm
    (``sam="momentum"``, the default), ``b x n / (2m)`` for two-pass fvm,
    within ``[MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS]``. ``train_size`` may be cost-weighted
    (:func:`relative_sample_cost`)."""
    if config.epochs != "auto":
        return float(config.epochs)
    if not train_size or not val_size:
        return 1.0
    passes = config.budget * train_size / (forward_backward_per_sample(config, sharpness_aware) * val_size)
    return min(MAX_AUTO_EPOCHS, max(MIN_AUTO_EPOCHS, passes))


def forward_backward_per_sample(config: TuningConfig, sharpness_aware: bool) -> float:
    """Forward-backward passes a tuning step spends per sample: 2 for two-pass SAM, else 1."""
    return 2.0 if sharpness_aware and config.sam == "two_pass" else 1.0


def relative_sample_cost(train_data: Any, val_data: Any, seed: int = 0, samples: int = 256) -> float:
    """How much one training sample costs beside one validation sample: the ratio of their mean
    sizes (the largest tensor of a sample collated alone, e.g. its token count), over up to
    ``samples`` random samples of each. 1 for same-size samples (images, features) or when the
    sizes can't be measured. A validation set of full sentences audited against a training set
    of short phrases (SST-2) costs more per sample, and ``epochs="auto"`` plans fewer passes."""
    try:
        means = []
        for data, name in ((train_data, "train_data"), (val_data, "val_data")):
            dataset = dataset_of(data, name)
            join = collate_of(data) or default_collate
            n = len(dataset)
            g = torch.Generator().manual_seed(seed)
            ids = torch.randperm(n, generator=g)[:samples].tolist() if n > samples else range(n)
            sizes = [_sample_size(join([dataset[i]])) for i in ids]
            means.append(sum(sizes) / max(len(sizes), 1))
        return means[0] / means[1] if means[0] > 0 and means[1] > 0 else 1.0
    except Exception:  # an exotic collate: fall back to equal costs
        return 1.0


def planned_steps(config: TuningConfig, batches_per_pass: int, epochs: float | None = None) -> int:
    """The step budget: ``config.steps`` if set, else ``ceil(epochs x batches per pass)``
    (``epochs``: :func:`budget_epochs`, default ``config.epochs``)."""
    if config.steps is not None:
        return int(config.steps)
    epochs = float(config.epochs if epochs is None else epochs)
    if epochs == 0:
        return 0
    return max(1, math.ceil(epochs * max(int(batches_per_pass), 1)))


def steps_after_checks(config: TuningConfig, total: int, per_pass: int, epochs: float, spent: float, val_size: int,
                       train_size: float | None, sharpness_aware: bool) -> tuple[int, float | None]:
    """``epochs="auto"``: the checks (θ* figures, the probe: ``spent`` forward-backward passes of
    one sample) are part of the budget's compute, so the steps get the rest, at least
    ``MIN_STEP_SHARE`` of the ``epochs`` budget. Returns ``(steps, the checks' share of one
    training epoch)``; otherwise ``(total, None)`` unchanged."""
    if config.epochs == "auto" and config.steps is None and train_size and val_size:
        per_sample = forward_backward_per_sample(config, sharpness_aware)
        left = max(MIN_STEP_SHARE * epochs, epochs - spent / (per_sample * val_size))
        return planned_steps(config, per_pass, left), spent / float(train_size)
    return total, None


def _sample_size(batch: Any) -> int:
    """The number of elements of the largest tensor in ``batch`` (0 without one)."""
    return max([int(t.numel()) for t in tree_leaves(batch) if isinstance(t, torch.Tensor)] or [0])


def bucketed_loader_factory(data: Any, batch_size: int, seed: int, name: str = "val_data",
                            pool: int = 50) -> Callable[[int], DataLoader]:
    """``epoch -> loader`` over ``data``, reshuffled every epoch from ``seed``; when samples differ
    in size (padded text), batches group similar sizes (a random permutation cut into pools of
    ``pool`` batches, each sorted by size, batch order shuffled), so tuning pads about as little
    as a length-bucketed training loop. Same-size samples: a plain shuffle."""
    dataset = dataset_of(data, name)
    collate = collate_of(data)
    n = len(dataset)
    if n == 0 or n > 200_000 or pool < 1:
        return shuffled_loader_factory(data, batch_size, seed, name)
    join = collate or default_collate
    sizes = [_sample_size(join([dataset[i]])) for i in range(n)]
    if len(set(sizes)) <= 1:
        return shuffled_loader_factory(data, batch_size, seed, name)
    size = min(batch_size, n)

    def make(epoch: int) -> DataLoader:
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
        perm = torch.randperm(n, generator=g).tolist()
        batches: list[list[int]] = []
        for s in range(0, n, size * pool):
            chunk = sorted(perm[s:s + size * pool], key=lambda i: sizes[i])
            batches.extend(chunk[k:k + size] for k in range(0, len(chunk), size))
        order = torch.randperm(len(batches), generator=g).tolist()
        return DataLoader(dataset, batch_sampler=[batches[i] for i in order], collate_fn=collate)

    return make


def endless_batches(loader_factory: Callable[[int], DataLoader]) -> Iterator[Any]:
    """The batches of ``loader_factory(0)``, then of ``loader_factory(1)``, ... without end.
    Raises ``ValueError`` when a pass yields no batch."""
    epoch = 0
    while True:
        empty = True
        for batch in loader_factory(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError("the validation data is empty; vm/fvm need validation samples")
        epoch += 1


def validation_size(loader_factory: Callable[[int], DataLoader]) -> int:
    """The number of samples of the loaders' dataset (0 when it has no length)."""
    try:
        return len(loader_factory(0).dataset)  # type: ignore[arg-type]
    except TypeError:
        return 0


def batches_per_pass(loader_factory: Callable[[int], DataLoader]) -> int:
    """The number of mini-batches of one pass (1 for a loader without a length: a "pass" is a step)."""
    try:
        return len(loader_factory(0))
    except TypeError:  # a loader without a length: one step per "pass"
        return 1
