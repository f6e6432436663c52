"""The fit's training and validation DataLoaders, found on a Lightning trainer.

Used by the callback only. Where Lightning has a public attribute it is read
(``trainer.train_dataloader`` once the fit loop has loaded it, ``trainer.datamodule``, the
``*_dataloader`` hooks); before the fit loop has loaded anything (in ``setup()``) only its
data source (``fit_loop._data_source``, private) says where the loaders will come from, and
whether they come from the LightningModule's own hooks (which may only work after its setup).
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from .data import dataset_of
from .exceptions import InfluenceCallbackError

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

_COMBINED_LOADER_MODULES = ("lightning.pytorch.utilities.combined_loader",
                            "pytorch_lightning.utilities.combined_loader")


def data_source(trainer: "pl.Trainer", kind: str) -> Any:
    """The fit loop's (``kind="train"``) or validation loop's data source, or ``None``."""
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None:
        return None
    loop = fit_loop if kind == "train" else getattr(getattr(fit_loop, "epoch_loop", None), "val_loop", None)
    return getattr(loop, "_data_source", None)


def source_is_module(trainer: "pl.Trainer", kind: str) -> bool:
    """Whether the ``kind`` loaders come from the LightningModule's own ``*_dataloader`` hook."""
    source = data_source(trainer, kind)
    return (source is not None and isinstance(getattr(source, "instance", None), nn.Module)
            and bool(source.is_defined()))


def is_combined_loader(obj: Any) -> bool:
    """A Lightning ``CombinedLoader`` (of either namespace; a class whose module was never
    imported can have no instance, so nothing is imported here)."""
    for name in _COMBINED_LOADER_MODULES:
        module = sys.modules.get(name)
        if module is not None and isinstance(obj, module.CombinedLoader):
            return True
    return False


def find_loader(trainer: "pl.Trainer", module: Any, kind: str, cached: Any | None = None,
                at_run: bool = False, warn_many: Callable[[str], None] | None = None) -> Any:
    """The one training (or first validation) DataLoader of the fit, or ``None``.

    ``at_run``: the audit is about to run (the fit loop has loaded its loaders): the trainer's
    ``train_dataloader``, else ``cached`` (what ``setup()`` found), else the data source."""
    found = None
    if at_run:
        if kind == "train":
            found = getattr(trainer, "train_dataloader", None)
        if found is None:
            found = cached
    if found is None:
        source = data_source(trainer, kind)
        if source is not None:
            if getattr(source, "instance", None) is None or not source.is_defined():
                return None
            found = source.dataloader()
        else:  # no data source (another Lightning version): the public hooks
            for owner in (getattr(trainer, "datamodule", None), module):
                hook = getattr(owner, f"{kind}_dataloader", None)
                if hook is not None:
                    try:
                        found = hook()
                        break
                    except Exception:  # noqa: BLE001 - not defined there ("must be implemented")
                        continue
    return single_loader(found, kind, warn_many)


def single_loader(loaders: Any, kind: str, warn_many: Callable[[str], None] | None = None) -> Any:
    """The one loader in ``loaders`` (a loader, a list/dict of them, a ``CombinedLoader``):
    several training loaders are an error; of several validation loaders the first is used,
    and ``warn_many(message)`` is told."""
    if loaders is None:
        return None
    if is_combined_loader(loaders):
        loaders = loaders.iterables
    if isinstance(loaders, Mapping):
        items = list(loaders.values())
    elif isinstance(loaders, (list, tuple)):
        items = list(loaders)
    else:
        return loaders
    if not items:
        return None
    if len(items) > 1:
        if kind == "train":
            raise InfluenceCallbackError(
                f"InfluenceCallback audits one training DataLoader; the trainer has {len(items)}. "
                "Call run(trainer, module, train_data=...) with the one to audit")
        message = (f"InfluenceCallback: the trainer has {len(items)} validation loaders; the audit "
                   "measures influence on the first one")
        if warn_many is not None:
            warn_many(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=2)
    return single_loader(items[0], kind, warn_many)


def converts_module(trainer: "pl.Trainer") -> bool:
    """Whether the trainer's precision plugin changes the module's dtype when the strategy sets
    up (``"64-true"``, ``"16-true"``, quantisation...): it overrides ``convert_module``."""
    precision = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    if precision is None:
        return False
    from lightning.pytorch.plugins.precision import Precision

    return type(precision).convert_module is not Precision.convert_module


def training_step_loss(module: Any) -> Callable[[Any], Tensor | None] | None:
    """``batch -> the loss training_step returns`` for the pre-flight comparison, or ``None``
    (manual optimisation: its training_step steps the optimiser itself). The step runs on a
    shallow copy of the module (the parameters are shared, the module's own attributes such as
    step counters are not), in eval mode without gradients, with ``log``/``log_dict`` silenced;
    a step that still fails outside the fit loop is skipped (no comparison)."""
    step = getattr(module, "training_step", None)
    if step is None or not getattr(module, "automatic_optimization", True):
        return None

    def reference(batch: Any) -> Tensor | None:
        import copy

        sandbox = copy.copy(module)
        sandbox.__dict__["log"] = sandbox.__dict__["log_dict"] = lambda *args, **kwargs: None
        try:
            with torch.no_grad():
                out = type(module).training_step(sandbox, batch, 0)
        except Exception:  # noqa: BLE001 - a step that needs the fit loop can't be a reference
            return None
        if isinstance(out, Mapping):
            out = out.get("loss")
        return out if isinstance(out, Tensor) and out.numel() == 1 else None

    return reference


class _ConvertingCollate:
    """The loader's collate function followed by the precision plugin's ``convert_input``."""

    def __init__(self, collate: Callable, convert: Callable) -> None:
        self.collate, self.convert = collate, convert

    def __call__(self, items: Any) -> Any:
        return self.convert(self.collate(items))


def converting_loader(data: Any, convert: Callable) -> DataLoader:
    """A loader over the dataset behind ``data`` (ids unchanged: the audit builds its own
    sequential loaders from its dataset and collate function) whose batches are converted."""
    collate = data.collate_fn if isinstance(data, DataLoader) else default_collate
    dataset = dataset_of(data, "data")
    if isinstance(data, DataLoader) and data.batch_sampler is not None:  # keep what the sampler selects
        return DataLoader(dataset, batch_sampler=data.batch_sampler, collate_fn=_ConvertingCollate(collate, convert))
    sampler = data.sampler if isinstance(data, DataLoader) else None
    return DataLoader(dataset, sampler=sampler, collate_fn=_ConvertingCollate(collate, convert))


# Strategies whose parameters are sharded or partitioned across ranks: a deep copy of one rank's
# module would audit a shard of each weight. Supporting them needs the strategy's own way of
# gathering the full (LoRA) parameters; until then setup() refuses them before training starts.
_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")


def precision_inputs(trainer: "pl.Trainer",
                     loaders: tuple[Any, ...]) -> tuple[torch.device | None, tuple[Any, ...], Any]:
    """The trainer's device, the ``loaders`` as ``training_step`` sees their batches (the
    precision plugin's ``convert_input``, e.g. float64 under ``"64-true"``) and the plugin's
    forward context (autocast under mixed precision), for an audit of the trained module."""
    strategy = getattr(trainer, "strategy", None)
    precision = getattr(strategy, "precision_plugin", None)
    device = getattr(strategy, "root_device", None)
    if precision is None:
        return device, loaders, nullcontext()
    return device, tuple(converting_loader(x, precision.convert_input) for x in loaders), precision.forward_context()


def check_strategy(trainer: "pl.Trainer") -> None:
    """Refuse a sharded strategy (FSDP, DeepSpeed, ...) before training: see ``_SHARDED_STRATEGIES``."""
    strategy = getattr(trainer, "strategy", None)
    names = {cls.__name__ for cls in type(strategy).__mro__} if strategy is not None else set()
    sharded = names.intersection(_SHARDED_STRATEGIES)
    if sharded:
        raise InfluenceCallbackError(
            f"InfluenceCallback does not support {sorted(sharded)[0]} yet: its parameters are sharded across "
            "ranks. Use a DDP strategy (strategy='ddp' or 'ddp_spawn'), or run audit() on the gathered model "
            "after training")
