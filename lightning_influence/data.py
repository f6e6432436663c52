"""Sequential loaders over the user's data, so that sample id = dataset position."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    WeightedRandomSampler,
)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it moved to ``device`` (Lightning's own collection walk:
    tuples, mappings, dataclasses...)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


def dataset_of(data: Any, name: str) -> Dataset:
    """The map-style dataset behind ``data`` (a Dataset or a DataLoader over one). Raises a clear
    error for data the audit can't index."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"{name} must be a map-style dataset (with __len__ and __getitem__) or a DataLoader "
                        f"over one, so that every sample has an id (its position); got {type(dataset).__name__}. "
                        "Wrap an iterable dataset into a list or a map-style Dataset first.")
    return dataset


_EMPTY = {"train_data": "there is nothing to audit", "val_data": "influence is measured on validation samples"}


def dataset_size(data: Any, name: str) -> int:
    """The number of samples of ``data`` (see :func:`dataset_of`); the one check that it is not
    empty (``ValueError`` naming ``name``)."""
    n = len(dataset_of(data, name))
    if n == 0:
        raise ValueError(f"{name} is empty: {_EMPTY.get(name, 'there is nothing to read')}")
    return n


def collate_of(data: Any) -> Callable | None:
    """The loader's collate function, so batches look as they did in training."""
    return data.collate_fn if isinstance(data, DataLoader) else None


def sequential_loader(data: Any, batch_size: int, indices: Sequence[int] | None = None,
                      name: str = "data") -> DataLoader:
    """A loader that visits ``data`` (or the ``indices`` subset) in order, without dropping the
    last batch, whatever shuffling or sampler the original loader had."""
    dataset = dataset_of(data, name)
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    # an own generator: iterating a DataLoader draws a seed from it, which must not be the global RNG
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, collate_fn=collate_of(data),
                      generator=torch.Generator())


def shuffled_loader_factory(data: Any, batch_size: int, seed: int, name: str = "data") -> Callable[[int], DataLoader]:
    """``epoch -> loader``: reshuffled every epoch, deterministically from ``seed``."""
    dataset = dataset_of(data, name)
    collate = collate_of(data)

    def make(epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # any int seed
        return DataLoader(dataset, batch_size=min(batch_size, max(len(dataset), 1)), shuffle=True,
                          drop_last=False, collate_fn=collate, generator=generator)

    return make


def selected_ids(data: Any, name: str = "data") -> Tensor | None:
    """The dataset positions a DataLoader's sampler yields, sorted ``(k,)``, or ``None`` when it
    yields every sample (no loader, a sequential or shuffling sampler, a distributed one: the
    audit shards by itself). A sampler that selects a subset (``SubsetRandomSampler``, a custom
    sampler or batch sampler) is honoured: the audit scores the samples it yields, and ids stay
    dataset positions. One that yields a different set of samples on each pass (drawing with
    replacement) is refused with a clear error."""
    if not isinstance(data, DataLoader):
        return None
    n = len(dataset_of(data, name))
    batch_sampler = data.batch_sampler
    sampler = _users_sampler(batch_sampler.sampler if isinstance(batch_sampler, BatchSampler) else data.sampler)
    custom_batches = batch_sampler is not None and not isinstance(batch_sampler, BatchSampler)
    if not custom_batches:
        if sampler is None or isinstance(sampler, SequentialSampler):
            return None
        if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples >= n):
            return None  # every sample (with replacement: each one can be drawn)
        if isinstance(sampler, WeightedRandomSampler) and sampler.replacement:
            weights = torch.as_tensor(sampler.weights)
            ids = (weights > 0).nonzero().squeeze(1)
            return None if ids.numel() == n else ids
    def one_pass() -> Tensor:
        if custom_batches:
            drawn = [int(i) for batch in batch_sampler for i in batch]
        else:
            drawn = [int(i) for i in sampler]
        return torch.unique(torch.as_tensor(drawn, dtype=torch.long))

    first = one_pass()
    if not torch.equal(first, one_pass()):
        raise ValueError(
            f"{name}: the DataLoader's sampler ({type(sampler if not custom_batches else batch_sampler).__name__}) "
            "yields a different set of samples on each pass, so 'the training set' is not defined. Pass the "
            "Dataset itself (every sample is audited) or a Subset of the samples to audit; with the callback, "
            "InfluenceCallback(run_on_fit_end=False) and cb.run(trainer, train_data=that) after fit, or a sampler "
            "that yields the same samples on every pass")
    if first.numel() and (int(first[0]) < 0 or int(first[-1]) >= n):
        raise ValueError(f"{name}: the sampler yields positions outside the dataset [0, {n})")
    return None if first.numel() == n else first


def _users_sampler(sampler: Any) -> Any:
    """The user's own sampler behind a distributed wrapper (``None``: every sample)."""
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # Lightning's DistributedSamplerWrapper
    if inner is not None:
        return inner
    if isinstance(sampler, DistributedSampler):
        return None  # a plain distributed sampler covers the dataset across ranks
    return sampler


def subset_loader(data: Any, ids: Tensor) -> DataLoader:
    """A loader over the ``ids`` positions of the dataset behind ``data``, batching as ``data``
    does (same collate function); its sample ``j`` is dataset position ``ids[j]``."""
    return DataLoader(Subset(dataset_of(data, "data"), ids.tolist()), batch_size=max(1, data.batch_size or 1)
                      if isinstance(data, DataLoader) else 1, collate_fn=collate_of(data))
