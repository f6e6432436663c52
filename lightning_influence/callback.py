"""``InfluenceCallback``: thin glue over :func:`~lightning_influence.audit`. ``__init__`` checks
every option, ``setup("fit")`` the data and the model (:mod:`~lightning_influence.fit_checks`),
``on_train_end`` audits on every rank and rank zero reports (:mod:`~lightning_influence.reporting.trainer`).
The core is namespace-free (:class:`InfluenceCallbackMixin`): here on ``lightning.pytorch``, in
:mod:`lightning_influence.pl` on ``pytorch_lightning``.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .audit import audit
from .config import AuditOptions, CurvatureConfig, TuningConfig
from .exceptions import InfluenceCallbackError
from .fit_checks import check_callback_options, check_fit, run_preflight
from .handoff import Handoff
from .modes import isolated_rng
from .progress import EpochTimer, NullProgress, trainer_progress
from .reporting.trainer import report_to_trainer, scores_file, scores_folder, warn_failure
from .result import AuditResult
from .solvers import InverseSolver, solver_name
from .trainer_data import find_loader, precision_inputs

if TYPE_CHECKING:  # pragma: no cover - a hint only: the pytorch_lightning namespace's Trainer works the same
    import lightning.pytorch as pl


class InfluenceCallbackMixin:
    """Score every training sample's influence (higher = more harmful, e.g. mislabeled) when
    training ends, and report it to every logger of the trainer.

    The audit options (``method``, ``solver``, ... ``normalize``; ``device`` defaults to the
    trainer's) are those of :func:`~lightning_influence.audit`, documented in
    :class:`~lightning_influence.AuditOptions`: checked here, before any training, and kept in
    :attr:`options`.

    ``setup()`` checks before the first training step (``on_fit_start`` when the module builds
    its data or layers in its own setup) that there is training and validation data, indexable,
    that ``noisy`` has one flag per sample and ``params`` selects something; with ``preflight``
    it runs :func:`~lightning_influence.preflight.check` on the first training samples (the loss
    equals the model's own or ``training_step``'s, the per-sample gradients equal autograd, the
    store fits in memory); the report is :attr:`preflight_report`. The audited data are the
    trainer's training set and first validation set, read in order (sample id = dataset position).

    Args:
        every_n_epochs: also audit at the end of every N-th training epoch (``None``: never).
        run_on_fit_end: audit when training ends (default). With both off, only :meth:`run`.
        on_error: ``"warn"``: a failed audit is a warning and training results are kept;
            ``"raise"``: re-raise it.
        describe: ``sample_id -> str`` text for the top-k tables. Default: a tokenizer found on
            the module, datamodule or collate function (``tokenizer``/``processing_class``)
            decodes ``input_ids``, else a ``text``/``sentence`` field; cut to 120 characters.
        render: ``sample_id -> image`` (PIL, NumPy or tensor ``(H, W)``, ``(H, W, C)``,
            ``(C, H, W)``) for the gallery of the top-k samples. Default: batches that collate
            to images are drawn as they are; ``False``: no gallery.
        describe_query, render_query: the same for the attribution's queries.
        scores_filename: the per-sample scores file in ``dirpath`` (``None``: none); audits at an
            epoch end add ``-epoch{E}`` before the suffix.
        dirpath: the scores file's folder (default ``trainer.log_dir``, else ``default_root_dir``).
        verbose: print the one-screen summary (default: when the trainer shows a progress bar).
        options: the audit options as one :class:`~lightning_influence.AuditOptions`; keywords
            given beside it replace its values.

    Attributes:
        options: the audit's frozen :class:`~lightning_influence.AuditOptions`.
        result: the latest :class:`~lightning_influence.AuditResult` (``None`` before), on every
            rank (under ``ddp_spawn`` also in the launching process); ``scores_path``: its file;
            ``last_error``: the latest failed audit's exception under ``on_error="warn"``.

    Checkpointed state (under :attr:`state_key`): ``ran``, ``epoch``, ``global_step``, ``audits``,
    ``metrics``; weights audited at the same global step are not audited again. The audit changes
    nothing the user owns. Under DDP every rank audits and ends with the full result; rank zero
    alone logs, writes files and shows progress. ``fast_dev_run`` skips it.
    """

    _namespace = "lightning.pytorch"

    def __init__(
        self,
        # the audit's options (AuditOptions)
        method: Literal["fvm", "vm", "standard"] | None = None, solver: None | str | InverseSolver = None,
        params: str | list[str] = "auto", noisy: Sequence[bool] | None = None, top_k: int = 50,
        seed: int = 0, tuning: TuningConfig | None = None, curvature: CurvatureConfig | None = None,
        damping: float | None = None, batch_size: int = 32, grad_dtype: str | None = None,
        clean_labels: Sequence[int] | None = None, per_validation: bool = False,
        nonfinite: Literal["exclude", "raise"] = "exclude", max_memory: int | None = None,
        spill_dir: str | None = None, projection: int | None = None, loss_fn: Callable | None = None,
        device: str | torch.device | None = None, preflight: bool = True, rank_by: str = "auto",
        attribution: Any = None, normalize: str = "auto",
        # the callback's own options
        every_n_epochs: int | None = None, run_on_fit_end: bool = True,
        on_error: Literal["warn", "raise"] = "warn", describe: Callable[[int], str] | None = None,
        render: None | bool | Callable[[int], Any] = None, describe_query: Callable[[int], str] | None = None,
        render_query: None | bool | Callable[[int], Any] = None,
        scores_filename: str | None = "influence_scores.csv", dirpath: str | None = None,
        verbose: bool | None = None, options: AuditOptions | None = None,
    ) -> None:
        super().__init__()
        self.options = AuditOptions.from_keywords(
            options, loss_fn=loss_fn, method=method, solver=solver, params=params, noisy=noisy, top_k=top_k, seed=seed,
            tuning=tuning, curvature=curvature, damping=damping, batch_size=batch_size, grad_dtype=grad_dtype,
            device=device, clean_labels=clean_labels, per_validation=per_validation, nonfinite=nonfinite,
            max_memory=max_memory, spill_dir=spill_dir, projection=projection, preflight=bool(preflight),
            rank_by=rank_by, attribution=attribution, normalize=normalize)
        check_callback_options(every_n_epochs=every_n_epochs, on_error=on_error, describe=describe, render=render,
                               describe_query=describe_query, render_query=render_query,
                               scores_filename=scores_filename)
        self.preflight_report: Any | None = None
        self._timer = EpochTimer()  # the training epoch's compute, the yardstick of the tuning's cost
        self.every_n_epochs, self.run_on_fit_end, self.on_error = every_n_epochs, run_on_fit_end, on_error
        self.describe, self.render = describe, render
        self.describe_query, self.render_query = describe_query, render_query
        self.scores_filename, self.dirpath = scores_filename, None if dirpath is None else os.fspath(dirpath)
        self.verbose = verbose
        self.scores_path: str | None = None
        self.last_error: BaseException | None = None
        self._result: AuditResult | None = None
        self._state: dict[str, Any] = {"ran": False, "epoch": None, "global_step": None, "audits": 0}
        self._data: dict[str, Any] = {}
        self._deferred: list[str] = []
        self._warned_val = False
        # ddp_spawn/fork: the hooks run in worker processes; rank zero hands the result back here
        self._handoff = Handoff()

    @property
    def result(self) -> AuditResult | None:
        """The latest audit's :class:`~lightning_influence.AuditResult` (``None`` before any)."""
        self._collect_handoff()
        return self._result

    @property
    def ran(self) -> bool:
        """Whether an audit has completed (also in an earlier run this one resumed from)."""
        self._collect_handoff()
        return bool(self._state["ran"])

    @property
    def state_key(self) -> str:
        """Names the method and solver, and the ``dirpath`` when one is given, so that several
        callbacks (e.g. two tuning settings, each with its own ``dirpath``) can share a Trainer."""
        keys = dict(method=self.options.method, solver=solver_name(self.options.solver))
        return self._generate_state_key(**keys, **({} if self.dirpath is None else {"dirpath": self.dirpath}))

    def state_dict(self) -> dict[str, Any]:
        self._collect_handoff()
        return dict(self._state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state.update({k: state_dict[k] for k in ("ran", "epoch", "global_step", "audits", "metrics")
                            if k in state_dict})

    def run(self, trainer: "pl.Trainer", pl_module: nn.Module | None = None, *, train_data: Any = None,
            val_data: Any = None) -> AuditResult:
        """Audit now and report (every rank computes, rank zero logs and writes the scores file);
        raises on failure. ``train_data``/``val_data`` (Datasets or DataLoaders) replace the trainer's."""
        return self._run(trainer, pl_module, train_data, val_data, epoch_tag=False)

    def _run(self, trainer: "pl.Trainer", pl_module: nn.Module | None, train_data: Any, val_data: Any,
             epoch_tag: bool) -> AuditResult:
        module = pl_module if pl_module is not None else trainer.lightning_module
        if module is None:
            raise InfluenceCallbackError("InfluenceCallback.run needs a module: pass pl_module")
        train, val = (given if given is not None else self._loader(trainer, module, kind, at_run=True)
                      for given, kind in ((train_data, "train"), (val_data, "val")))
        if train is None or val is None:
            missing = "training" if train is None else "validation"
            raise InfluenceCallbackError(f"InfluenceCallback: the trainer has no {missing} data to audit; "
                                         "pass train_data=/val_data= to run()")
        device, converted, context = precision_inputs(trainer, (train, val))
        is_zero = bool(getattr(trainer, "is_global_zero", True))
        with isolated_rng(), torch.inference_mode(False), torch.enable_grad(), context:
            confirmed = self.preflight_report.loss_fn if self.preflight_report is not None else None  # float targets
            result = audit(module, *converted, options=self.options, loss_fn=self.options.loss_fn or confirmed,
                           device=device if self.options.device is None else self.options.device,
                           progress=trainer_progress(trainer) if is_zero else NullProgress())
        self._timer.note_tuning_cost(result)
        self._result = result
        epoch, step = getattr(trainer, "current_epoch", None), getattr(trainer, "global_step", None)
        self._state.update(ran=True, epoch=epoch, global_step=step, audits=int(self._state.get("audits", 0)) + 1,
                           metrics={k: float(v) for k, v in result.metrics.items()
                                    if isinstance(v, (int, float))})
        self._report(trainer, result, step, epoch_tag, train=train, module=module, val=val)
        return result

    def setup(self, trainer: "pl.Trainer", pl_module: Any, stage: str) -> None:
        if stage != "fit" or not (self.run_on_fit_end or self.every_n_epochs):
            return
        self._data, self._deferred = {}, []
        self._check(trainer, pl_module, in_setup=True)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        if self._deferred:  # the module builds its loaders or layers in its own setup/configure_model
            self._check(trainer, pl_module, in_setup=False)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._timer.epoch_start()

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._timer.batch_start()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._timer.batch_end()

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        self._timer.epoch_end()  # a complete epoch's compute (the audit may run right after this)
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._automatic_run(trainer, pl_module, epoch_tag=True)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:  # by on_fit_end the model is on the CPU
        if self.run_on_fit_end:
            self._automatic_run(trainer, pl_module, epoch_tag=False)

    def _automatic_run(self, trainer: "pl.Trainer", pl_module: Any, epoch_tag: bool) -> None:
        """An audit from a hook: failures follow ``on_error``."""
        if getattr(trainer, "fast_dev_run", False):
            self._log().info("InfluenceCallback: skipped under fast_dev_run")
            return
        try:
            if self._state.get("ran") and self._state.get("global_step") == trainer.global_step:
                # these exact weights were audited already (at the last epoch's end, or before a resume)
                if not epoch_tag and self._result is not None:  # the final file still appears
                    folder = scores_folder(trainer, self.dirpath, self.scores_filename)
                    if getattr(trainer, "is_global_zero", True):
                        self.scores_path = scores_file(trainer, self._result, folder, self.scores_filename, False)
                return
            self._run(trainer, pl_module, None, None, epoch_tag)
            self.last_error = None
        except Exception as err:  # noqa: BLE001 - the policy decides
            self.last_error = err
            if self.on_error == "raise":
                raise
            warn_failure(trainer, err)

    def _check(self, trainer: "pl.Trainer", module: Any, in_setup: bool) -> None:
        """The fail-fast checks (:mod:`~lightning_influence.fit_checks`); with ``in_setup`` what the
        module only builds in its own setup is left for ``on_fit_start`` (still before training)."""
        due = check_fit(trainer, module, self.options, self._data, self._deferred, in_setup,
                        lambda kind: self._loader(trainer, module, kind, at_run=False))
        if due:
            self.preflight_report = run_preflight(trainer, module, self.options, self._data, converted=not in_setup)
            if getattr(trainer, "is_global_zero", True):
                self._log().info(f"InfluenceCallback: {self.preflight_report.summary()}")

    def _loader(self, trainer: "pl.Trainer", module: Any, kind: str, at_run: bool) -> Any:
        """The one training (or first validation) DataLoader of the fit, or ``None``."""
        return find_loader(trainer, module, kind, cached=self._data.get(kind), at_run=at_run,
                           warn_many=self._warn_many_val)

    def _warn_many_val(self, message: str) -> None:
        if not self._warned_val:  # once per callback
            self._warned_val = True
            warnings.warn(message, UserWarning, stacklevel=4)

    def _log(self) -> logging.Logger:  # a child of the namespace's logger: INFO on the console, like Lightning's
        return logging.getLogger(f"{self._namespace}.callbacks.influence")

    def _report(self, trainer: "pl.Trainer", result: AuditResult, step: int | None, epoch_tag: bool,
                train: Any = None, module: Any = None, val: Any = None) -> None:
        """Rank zero: every logger, the scores file and the summary (the folder: on every rank)."""
        folder = scores_folder(trainer, self.dirpath, self.scores_filename)  # a collective under DDP
        if not getattr(trainer, "is_global_zero", True):
            return
        if self._handoff.is_worker():  # ddp_spawn: the launching process reads it back
            self._handoff.leave(result, self._state)
        attribution = result.attribution
        from_queries = attribution is not None and attribution.source == "queries"
        queries = self.options.attribution.data if from_queries else val
        self.scores_path = report_to_trainer(
            trainer, result, module=module, data=(train, queries), step=step, top_k=self.options.top_k,
            hooks=((self.describe, self.render), (self.describe_query, self.render_query)), folder=folder,
            filename=self.scores_filename, epoch_tag=epoch_tag, verbose=self.verbose, log=self._log().info)

    def _collect_handoff(self) -> None:
        """In the launching process of ``ddp_spawn``: take the result that rank zero left."""
        collected = self._handoff.collect() if getattr(self, "_handoff", None) is not None else None
        if collected is not None:
            self._result, state = collected
            self._state.update(state)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": {}}  # loaders travel with the trainer, not with the callback


from lightning.pytorch.callbacks import Callback as _Callback  # noqa: E402  (the core above is namespace-free)


class InfluenceCallback(InfluenceCallbackMixin, _Callback):
    __doc__ = InfluenceCallbackMixin.__doc__
    _namespace = "lightning.pytorch"


__all__ = ["InfluenceCallback", "InfluenceCallbackMixin", "InfluenceCallbackError"]
