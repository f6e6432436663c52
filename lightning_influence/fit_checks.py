"""The checks ``InfluenceCallback`` runs before the first training step (in ``setup()``, or in
``on_fit_start`` for what the module only builds in its own setup): the strategy, the data, the
audited parameters and the pre-flight check. A failure is raised there, not after training.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from .config import AuditOptions
from .data import dataset_size
from .exceptions import InfluenceCallbackError
from .modes import isolated_rng
from .params import select_blocks
from .preflight import PreflightReport, check
from .trainer_data import check_strategy, converts_module, source_is_module, training_step_loss

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl


def prefixed(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a ``ValueError``/``TypeError`` gets the callback's name in front."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise type(err)(f"InfluenceCallback: {err}") from err


ON_ERROR = ("warn", "raise")


def check_callback_options(*, every_n_epochs: int | None, on_error: str, describe: Any, render: Any,
                           describe_query: Any, render_query: Any, scores_filename: str | None) -> None:
    """The callback's own options (the audit's are :class:`AuditOptions`'), at construction."""
    if every_n_epochs is not None and (isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int)
                                       or every_n_epochs < 1):
        raise ValueError(f"every_n_epochs must be None or a positive integer, got {every_n_epochs!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if describe is not None and not callable(describe):
        raise TypeError(f"describe must be callable, got {type(describe).__name__}")
    if render is not None and render is not False and not callable(render):
        raise TypeError(f"render must be None, False or a callable sample_id -> image, got {type(render).__name__}")
    for name, hook in (("describe_query", describe_query), ("render_query", render_query)):
        if hook is not None and hook is not False and not callable(hook):
            raise TypeError(f"{name} must be None, False or a callable sample_id -> ..., got {type(hook).__name__}")
    if scores_filename is not None and (not scores_filename or os.path.basename(scores_filename) != scores_filename):
        raise ValueError(f"scores_filename must be a plain file name (use dirpath for the folder), "
                         f"got {scores_filename!r}")


def check_fit(trainer: "pl.Trainer", module: Any, options: AuditOptions, data: dict[str, Any], deferred: list[str],
              in_setup: bool, loader: Callable[[str], Any]) -> bool:
    """Check the strategy, the training and validation data (found by ``loader(kind)``, kept in
    ``data``) and the audited parameters. With ``in_setup``, what the module only builds in its
    own setup (its loaders, its layers, the precision plugin's conversion) is appended to
    ``deferred`` for ``on_fit_start``. Returns whether the pre-flight check is due now."""
    check_strategy(trainer)
    for kind in ("train", "val"):
        if kind in data and not in_setup:
            found = data[kind]
        elif in_setup and source_is_module(trainer, kind):
            # the LightningModule's own *_dataloader hooks: call them only after its setup()
            # (which runs after the callbacks'), in on_fit_start, still before any training step
            deferred.append(kind)
            continue
        else:
            found = loader(kind)
        if found is None:
            if kind == "train":
                raise InfluenceCallbackError("InfluenceCallback: the trainer has no training data to audit")
            raise InfluenceCallbackError(
                "InfluenceCallback: no validation data. Influence is measured on validation samples: "
                "give the trainer a val_dataloader (datamodule, LightningModule, or fit(val_dataloaders=...))")
        size = prefixed(dataset_size, found, "train_data" if kind == "train" else "val_data")
        if kind == "train":
            prefixed(options.check_samples, size)
        data[kind] = found
    if not any(True for _ in module.parameters()) and in_setup:
        deferred.append("params")  # layers built in setup()/configure_model()
    else:
        prefixed(select_blocks, module, options.params)
    if "train" not in data or "val" not in data or "params" in deferred:
        return False
    note_trimmed_training(trainer, dataset_size(data["train"], "train_data"), dataset_size(data["val"], "val_data"))
    if options.preflight and in_setup and converts_module(trainer):
        deferred.append("preflight")  # check the module as it will train: after strategy.setup()
        return False
    return options.preflight


def run_preflight(trainer: "pl.Trainer", module: Any, options: AuditOptions, data: dict[str, Any],
                  converted: bool) -> PreflightReport:
    """The pre-flight check on the trainer's own first training samples, under the precision
    plugin's forward context. ``converted``: the plugin has converted the module (from
    ``on_fit_start`` on; in ``setup()`` it has not, so the batches are not converted either).
    Under DDP every rank decides together: one rank failing alone would leave the others waiting
    for it in the first gradient all-reduce."""
    strategy = getattr(trainer, "strategy", None)
    precision = getattr(strategy, "precision_plugin", None)
    context = precision.forward_context() if precision is not None else nullcontext()
    error: BaseException | None = None
    report: PreflightReport | None = None
    try:
        with isolated_rng(), torch.inference_mode(False), context:
            report = prefixed(check, module, data["train"], data["val"], options,
                              reference_loss=training_step_loss(module),
                              convert=precision.convert_input if precision is not None and converted else None)
    except Exception as err:  # noqa: BLE001 - re-raised below, once every rank knows
        error = err
    reduce = getattr(strategy, "reduce_boolean_decision", None)
    all_ok = reduce(error is None, all=True) if reduce is not None and trainer.world_size > 1 else error is None
    if error is not None:
        raise error
    if not all_ok:
        raise InfluenceCallbackError("InfluenceCallback: the pre-flight check failed on another rank (see its error)")
    assert report is not None
    return report


def note_trimmed_training(trainer: "pl.Trainer", n: int, m: int) -> None:
    """Say so when Lightning trains (or validates) on fewer batches than the audit will use."""
    for flag in ("limit_train_batches", "overfit_batches"):
        value = getattr(trainer, flag, None)
        trimmed = value not in (None, 1.0, 0.0) if flag == "limit_train_batches" else bool(value)
        if trimmed and isinstance(value, (int, float)):
            warnings.warn(f"InfluenceCallback: {flag}={value}: training sees only part of the training data each "
                          f"epoch, but the audit scores all {n} samples the training loader yields (pass "
                          "run(trainer, train_data=...) to audit another set)", UserWarning, stacklevel=4)
    value = getattr(trainer, "limit_val_batches", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1.0:
        seen = "validation is off" if value == 0 else "validation sees only part of the validation data"
        warnings.warn(f"InfluenceCallback: limit_val_batches={value}: {seen}, but the audit tunes on and measures "
                      f"influence against all {m} samples the validation loader yields (pass run(trainer, "
                      "val_data=...) for another set)", UserWarning, stacklevel=4)
