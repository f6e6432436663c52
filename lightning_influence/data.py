"""Sequential loaders over the user's data, so that sample id = dataset position."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset


def dataset_of(data: Any, name: str) -> Dataset:
    """The map-style dataset behind ``data`` (a Dataset or a DataLoader over one). Raises a clear
    error for data the audit can't index."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"{name} must be a map-style dataset (with __len__ and __getitem__) or a DataLoader "
                        f"over one, so that every sample has an id (its position); got {type(dataset).__name__}. "
                        "Wrap an iterable dataset into a list or a map-style Dataset first.")
    return dataset


def collate_of(data: Any) -> Optional[Callable]:
    """The loader's collate function, so batches look as they did in training."""
    return data.collate_fn if isinstance(data, DataLoader) else None


def sequential_loader(data: Any, batch_size: int, indices: Optional[Sequence[int]] = None,
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
