"""``InfluenceCallback``: audit the training data automatically when ``Trainer.fit`` ends.

The callback is thin glue over :func:`~lightning_influence.audit`:

- ``__init__`` checks the options (like ``ModelCheckpoint``);
- ``setup("fit")`` checks what depends on the data and the model, before the first
  training step: validation data exists, the training set is indexable, ``noisy`` has one
  flag per training sample, ``params`` selects something to audit;
- ``on_train_end`` (the model is still on the trainer's device there; by ``on_fit_end``
  Lightning has moved it to the CPU) runs the audit on every rank, under the precision
  plugin's forward context, with the global RNG isolated so training is not disturbed;
  rank zero then reports to every logger, writes the scores file and prints a summary.
  ``every_n_epochs`` also audits at the end of every N-th training epoch, and
  ``run(trainer, module)`` audits by hand.

The implementation is namespace-free (:class:`InfluenceCallbackMixin`); this module's
:class:`InfluenceCallback` is a ``lightning.pytorch.Callback``, and
``lightning_influence.pl.InfluenceCallback`` the same on ``pytorch_lightning.Callback``.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Literal, Optional, Sequence, Union

import torch
from torch import nn

from .audit import audit, preflight_check
from .config import AuditOptions, CurvatureConfig, TuningConfig
from .data import collate_of, dataset_of
from .distributed import RemoteStageError
from .exceptions import InfluenceCallbackError
from .params import select_blocks
from .handoff import Handoff
from .progress import NullProgress, trainer_progress
from .result import AuditResult
from .solvers import InverseSolver, solver_name
from .modes import isolated_rng
from .trainer_data import check_strategy, converting_loader, converts_module, find_loader, source_is_module, training_step_loss

if TYPE_CHECKING:  # pragma: no cover - a hint only: the pytorch_lightning namespace's Trainer works the same
    import lightning.pytorch as pl

ON_ERROR = ("warn", "raise")
_OPTION_NAMES = frozenset(f.name for f in fields(AuditOptions))




class InfluenceCallbackMixin:
    """Score every training sample's influence (higher = more harmful, e.g. mislabeled) when
    training ends, and report it to the trainer's loggers.

    The audit options are those of :func:`~lightning_influence.audit` (see there):
    ``method``, ``solver``, ``params``, ``noisy``, ``top_k``, ``seed``, ``tuning``,
    ``curvature``, ``damping``, ``batch_size``, ``grad_dtype``, ``clean_labels``,
    ``per_validation``, ``nonfinite``, ``max_memory``, ``spill_dir``, ``projection``, ``loss_fn``,
    ``device`` (default: the trainer's device), ``preflight``, ``rank_by`` (what the top-k
    tables and ``result.ranking`` rank by; default the loss at θ̃) and ``attribution`` (explain
    the validation samples the model gets wrong: per query, its most helpful and most harmful
    training samples, in every logger and in ``<scores file stem>_attribution.csv``). The callback times its
    training batches, so the summary and the loggers report the validation tuning's cost in
    training epochs (``influence/tuning/cost_in_training_epochs``).

    With ``preflight`` (default) the callback runs :func:`~lightning_influence.preflight.check`
    in ``setup()`` (or ``on_fit_start`` when the module builds its data or layers in its own
    setup), before the first training step: the per-sample loss runs on the user's first
    training samples and equals the model's own loss (a Hugging Face ``.loss``, else the
    module's ``training_step`` on each sample alone), every audited block's per-sample
    gradient equals autograd, and the gradient store fits in memory. Any failure is raised
    there, not after training. Its report is :attr:`preflight_report`.

    The audited data are the trainer's own training and validation sets (from the datamodule
    or the loaders passed to ``fit``); the callback builds sequential loaders over the
    underlying datasets (reusing their ``collate_fn``), so sample id = dataset position
    whatever shuffling or sampler training used. Only the first validation loader is used.

    Args:
        every_n_epochs: also audit at the end of every N-th training epoch (``None``: never).
        run_on_fit_end: audit when training ends (default). With both off, only :meth:`run`.
        on_error: ``"warn"``: a failure inside the audit (or its reporting) is a warning with
            its cause and training results are kept; ``"raise"``: re-raise it.
        describe: ``sample_id -> str`` readable text (the sentence, the file name) for the
            top-k tables. Without it, text data describe themselves: a tokenizer found as the
            ``tokenizer`` / ``processing_class`` attribute of the LightningModule, the datamodule
            or the training loader's collate function decodes each sample's ``input_ids``
            (else a ``text``/``sentence`` string field of the sample is shown), cut to 120 characters.
        render: ``sample_id -> image`` (a PIL image, a NumPy array or a tensor ``(H, W)``,
            ``(H, W, C)`` or ``(C, H, W)``) for the gallery of the top-k samples (TensorBoard
            image ``influence/gallery``, a ``wandb.Image`` per W&B table row, MLflow and CSV
            ``gallery.png``), e.g. for flat or custom inputs. Without it, training batches that
            collate to images (a ``(B, C, H, W)``, ``(B, H, W, C)`` or ``(B, H, W)`` tensor) are
            drawn as they are; ``False``: no gallery.
        describe_query, render_query: the same as ``describe``/``render`` for the attribution's
            queries (validation samples, or those of ``attribution.data``), by their position
            there; by default built from that data like the training data's.
        scores_filename: the full per-sample scores file written into ``dirpath``
            (``None``: none). Audits at an epoch end add ``-epoch{E}`` before the suffix.
        dirpath: where the scores file goes (default ``trainer.log_dir``, the first logger's
            folder, else ``default_root_dir``).
        verbose: print the one-screen summary at the end (default: when the trainer shows
            a progress bar).

        options: the audit options above as one :class:`~lightning_influence.AuditOptions`
            (then leave their keywords at their defaults).

    Attributes:
        options: the audit's options (an :class:`~lightning_influence.AuditOptions`, checked
            at construction and again in ``setup()``); each one also reads and sets as an
            attribute (``cb.method``, ``cb.tuning.steps``).
        result: the latest :class:`~lightning_influence.AuditResult` (``None`` before), on
            every rank; under ``ddp_spawn`` also in the launching process.
        scores_path: the path of the latest scores file (rank zero).
        last_error: the exception of the latest failed audit under ``on_error="warn"``.

    Checkpointed state (``state_dict``, under :attr:`state_key`, which names the method,
    solver and ``dirpath``): ``ran``, ``epoch`` (``trainer.current_epoch`` when the audit ran: the epoch's
    index at an epoch end, the number of epochs done at the end of fit), ``global_step``,
    ``audits`` (how many ran) and ``metrics``. Weights already audited at the same global
    step (the last epoch's end, or before a resume) are not audited again. Note that
    ``ModelCheckpoint`` saves before ``on_train_epoch_end`` when it monitors validation
    metrics, so only checkpoints written later (e.g. ``save_on_train_epoch_end=True``) hold
    an epoch-end audit; no checkpoint ever holds the end-of-fit audit, which runs after the
    last one is written and changes nothing the user owns.

    Under DDP every rank runs the audit (sharded by the audit's own collectives; every rank
    ends with the full result); only rank zero logs, writes files and shows progress.
    Under ``fast_dev_run`` the automatic audits are skipped.
    """

    _namespace = "lightning.pytorch"

    def __init__(
        self,
        method: Optional[Literal["fvm", "vm", "standard"]] = None,
        solver: Union[None, str, InverseSolver] = None,
        params: Union[str, List[str]] = "auto",
        noisy: Optional[Sequence[bool]] = None,
        top_k: int = 50,
        seed: int = 0,
        tuning: Optional[TuningConfig] = None,
        curvature: Optional[CurvatureConfig] = None,
        damping: Optional[float] = None,
        batch_size: int = 32,
        grad_dtype: Optional[str] = None,
        clean_labels: Optional[Sequence[int]] = None,
        per_validation: bool = False,
        nonfinite: Literal["exclude", "raise"] = "exclude",
        max_memory: Optional[int] = None,
        spill_dir: Optional[str] = None,
        projection: Optional[int] = None,
        loss_fn: Optional[Callable] = None,
        device: Optional[Union[str, torch.device]] = None,
        preflight: bool = True,
        rank_by: str = "auto",
        attribution: Any = None,
        normalize: str = "auto",
        every_n_epochs: Optional[int] = None,
        run_on_fit_end: bool = True,
        on_error: Literal["warn", "raise"] = "warn",
        describe: Optional[Callable[[int], str]] = None,
        render: Union[None, bool, Callable[[int], Any]] = None,
        describe_query: Optional[Callable[[int], str]] = None,
        render_query: Union[None, bool, Callable[[int], Any]] = None,
        scores_filename: Optional[str] = "influence_scores.csv",
        dirpath: Optional[str] = None,
        verbose: Optional[bool] = None,
        options: Optional[AuditOptions] = None,
    ) -> None:
        super().__init__()
        # the audit's own options: checked by the AuditOptions audit() uses, before any training
        self.options = AuditOptions.from_keywords(
            options, loss_fn=loss_fn, method=method, solver=solver, params=params, noisy=noisy, top_k=top_k, seed=seed,
            tuning=tuning, curvature=curvature, damping=damping, batch_size=batch_size, grad_dtype=grad_dtype,
            device=device, clean_labels=clean_labels, per_validation=per_validation, nonfinite=nonfinite,
            max_memory=max_memory, spill_dir=spill_dir, projection=projection, preflight=bool(preflight),
            rank_by=rank_by, attribution=attribution, normalize=normalize)
        if every_n_epochs is not None and (isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int)
                                           or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be None or a positive integer, got {every_n_epochs!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if describe is not None and not callable(describe):
            raise TypeError(f"describe must be callable, got {type(describe).__name__}")
        if render is not None and render is not False and not callable(render):
            raise TypeError(f"render must be None, False or a callable sample_id -> image, "
                            f"got {type(render).__name__}")
        for name, hook in (("describe_query", describe_query), ("render_query", render_query)):
            if hook is not None and hook is not False and not callable(hook):
                raise TypeError(f"{name} must be None, False or a callable sample_id -> ..., got {type(hook).__name__}")
        if scores_filename is not None and (not scores_filename or os.path.basename(scores_filename) != scores_filename):
            raise ValueError(f"scores_filename must be a plain file name (use dirpath for the folder), "
                             f"got {scores_filename!r}")
        self.preflight_report: Optional[Any] = None
        self._batch_start: Optional[float] = None
        self._epoch_compute = 0.0  # seconds inside training_step batches, this epoch
        self._last_epoch_compute: Optional[float] = None
        self.every_n_epochs = every_n_epochs
        self.run_on_fit_end = run_on_fit_end
        self.on_error = on_error
        self.describe = describe
        self.render = render
        self.describe_query = describe_query
        self.render_query = render_query
        self.scores_filename = scores_filename
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.verbose = verbose

        self.scores_path: Optional[str] = None
        self.last_error: Optional[BaseException] = None
        self._result: Optional[AuditResult] = None
        self._state: Dict[str, Any] = {"ran": False, "epoch": None, "global_step": None, "audits": 0}
        self._data: Dict[str, Any] = {}
        self._deferred: List[str] = []
        self._warned_val = False
        # ddp_spawn/fork: the hooks run in worker processes; rank zero hands the result back here
        self._handoff = Handoff()

    # ------------------------------------------------------------------ public API

    def __getattr__(self, name: str) -> Any:
        # the audit's options read as attributes (cb.method, cb.tuning.steps): they live in self.options
        options = self.__dict__.get("options")
        if name in _OPTION_NAMES and options is not None:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # set into self.options; setup() checks them all again (AuditOptions), before training
        if name in _OPTION_NAMES and "options" in self.__dict__:
            setattr(self.options, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def result(self) -> Optional[AuditResult]:
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
        keys: Dict[str, Any] = dict(method=self.method, solver=solver_name(self.solver))  # type: ignore[attr-defined]
        if self.dirpath is not None:
            keys["dirpath"] = self.dirpath
        return self._generate_state_key(**keys)

    def state_dict(self) -> Dict[str, Any]:
        self._collect_handoff()
        return dict(self._state)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._state.update({k: state_dict[k] for k in ("ran", "epoch", "global_step", "audits", "metrics")
                            if k in state_dict})

    def run(self, trainer: "pl.Trainer", pl_module: Optional[nn.Module] = None, *, train_data: Any = None,
            val_data: Any = None) -> AuditResult:
        """Audit now and report: every rank computes the result, rank zero logs it and writes
        the scores file. Raises on failure (``on_error`` applies to the automatic runs only).

        ``train_data``/``val_data`` (Datasets or DataLoaders) replace the trainer's own."""
        return self._run(trainer, pl_module, train_data, val_data, epoch_tag=False)

    def _run(self, trainer: "pl.Trainer", pl_module: Optional[nn.Module], train_data: Any, val_data: Any,
             epoch_tag: bool) -> AuditResult:
        module = pl_module if pl_module is not None else trainer.lightning_module
        if module is None:
            raise InfluenceCallbackError("InfluenceCallback.run needs a module: pass pl_module")
        train = train_data if train_data is not None else self._loader(trainer, module, "train", at_run=True)
        val = val_data if val_data is not None else self._loader(trainer, module, "val", at_run=True)
        if train is None:
            raise InfluenceCallbackError("InfluenceCallback: the trainer has no training data to audit; "
                                         "pass train_data= to run()")
        if val is None:
            raise InfluenceCallbackError("InfluenceCallback: the trainer has no validation data; influence is "
                                         "measured on validation samples. Pass val_data= to run()")
        strategy = getattr(trainer, "strategy", None)
        device = self.device if self.device is not None else getattr(strategy, "root_device", None)
        precision = getattr(strategy, "precision_plugin", None)
        raw_train, raw_val = train, val  # the gallery and the decoded text show the samples as the data gives them
        if precision is not None:  # batches as training_step sees them (e.g. float64 under "64-true")
            train, val = converting_loader(train, precision.convert_input), converting_loader(val, precision.convert_input)
        context = precision.forward_context() if precision is not None else nullcontext()
        is_zero = bool(getattr(trainer, "is_global_zero", True))
        with isolated_rng(), torch.inference_mode(False), torch.enable_grad(), context:
            confirmed = self.preflight_report.loss_fn if self.preflight_report is not None else None  # float targets
            options = replace(self.options, device=device, loss_fn=self.options.loss_fn or confirmed)
            result = audit(module, train, val, options=options,
                           progress=trainer_progress(trainer) if is_zero else NullProgress())
        epoch_seconds = self._last_epoch_compute or (self._epoch_compute or None)
        if epoch_seconds and result.tuning:  # the tuning's cost beside one training epoch
            result.tuning["train_epoch_seconds"] = epoch_seconds
            result.tuning["epochs_of_training"] = result.stage_seconds.get("tuning", 0.0) / epoch_seconds
        self._result = result
        epoch = getattr(trainer, "current_epoch", None)
        step = getattr(trainer, "global_step", None)
        self._state.update(ran=True, epoch=epoch, global_step=step, audits=int(self._state.get("audits", 0)) + 1,
                           metrics={k: float(v) for k, v in result.metrics.items()
                                    if isinstance(v, (int, float))})
        self._report(trainer, result, step, epoch_tag, train=raw_train, module=module, val=raw_val)
        return result

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: "pl.Trainer", pl_module: Any, stage: str) -> None:
        if stage != "fit" or not self._automatic:
            return
        self._data = {}
        self._deferred = []
        self._check(trainer, pl_module, in_setup=True)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        if self._deferred:  # the module builds its loaders or layers in its own setup/configure_model
            self._check(trainer, pl_module, in_setup=False)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        if self._epoch_compute:
            self._last_epoch_compute = self._epoch_compute
        self._epoch_compute = 0.0

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_start is not None:
            self._epoch_compute += time.perf_counter() - self._batch_start
            self._batch_start = None

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        if self._epoch_compute:  # a complete epoch's compute (the audit may run right after this)
            self._last_epoch_compute = self._epoch_compute
        if not self.every_n_epochs or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._automatic_run(trainer, pl_module, epoch_tag=True)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        # Not on_fit_end: by then the strategy's teardown has moved the model to the CPU.
        if self.run_on_fit_end:
            self._automatic_run(trainer, pl_module, epoch_tag=False)

    # ------------------------------------------------------------------ internals

    @property
    def _automatic(self) -> bool:
        return bool(self.run_on_fit_end or self.every_n_epochs)

    def _automatic_run(self, trainer: "pl.Trainer", pl_module: Any, epoch_tag: bool) -> None:
        """An audit from a hook: failures follow ``on_error``."""
        if getattr(trainer, "fast_dev_run", False):
            self._log().info("InfluenceCallback: skipped under fast_dev_run")
            return
        try:
            if self._state.get("ran") and self._state.get("global_step") == trainer.global_step:
                # these exact weights were audited already (at the last epoch's end, or before a resume)
                if not epoch_tag and self._result is not None:
                    self._write_scores(trainer, self._result, epoch_tag=False)  # the final file still appears
                return
            self._run(trainer, pl_module, None, None, epoch_tag)
            self.last_error = None
        except Exception as err:  # noqa: BLE001 - the policy decides
            self.last_error = err
            if self.on_error == "raise":
                raise
            if isinstance(err, RemoteStageError):
                if trainer.is_global_zero:
                    warnings.warn(f"InfluenceCallback: the audit failed on another rank ({err}); the training "
                                  "run and its checkpoints are unaffected", RuntimeWarning, stacklevel=2)
            else:
                rank = "" if trainer.world_size == 1 else f" on rank {trainer.global_rank}"
                warnings.warn(f"InfluenceCallback: the audit failed{rank} with {type(err).__name__}: {err}. "
                              "The training run and its checkpoints are unaffected; pass on_error='raise' "
                              "to see the traceback", RuntimeWarning, stacklevel=2)

    def _check(self, trainer: "pl.Trainer", module: Any, in_setup: bool) -> None:
        """The fail-fast checks; with ``in_setup`` what the module only builds in its own setup
        is left for ``on_fit_start`` (still before the first training step)."""
        self.options = replace(self.options)  # the options' one check again: attributes may have changed
        check_strategy(trainer)
        datasets = {}
        for kind in ("train", "val"):
            if kind in self._data and not in_setup:
                loader = self._data[kind]
            elif in_setup and source_is_module(trainer, kind):
                # the LightningModule's own *_dataloader hooks: call them only after its setup()
                # (which runs after the callbacks'), in on_fit_start, still before any training step
                self._deferred.append(kind)
                continue
            else:
                loader = self._loader(trainer, module, kind, at_run=False)
            if loader is None:
                if kind == "train":
                    raise InfluenceCallbackError("InfluenceCallback: the trainer has no training data to audit")
                raise InfluenceCallbackError(
                    "InfluenceCallback: no validation data. Influence is measured on validation samples: "
                    "give the trainer a val_dataloader (datamodule, LightningModule, or fit(val_dataloaders=...))")
            name = "the training data" if kind == "train" else "the validation data"
            datasets[kind] = _prefixed(dataset_of, loader, name)
            if len(datasets[kind]) == 0:
                raise InfluenceCallbackError(f"InfluenceCallback: {name} is empty")
            self._data[kind] = loader
        if "train" in datasets:
            n = len(datasets["train"])
            _prefixed(self.options.check_samples, n)
        if not any(True for _ in module.parameters()) and in_setup:
            self._deferred.append("params")  # layers built in setup()/configure_model()
        else:
            _prefixed(select_blocks, module, self.params)
        if "train" in self._data and "val" in self._data and "params" not in self._deferred:
            self._note_trimmed_training(trainer, len(dataset_of(self._data["train"], "train_data")))
            if self.preflight and in_setup and converts_module(trainer):
                self._deferred.append("preflight")  # check the module as it will train: after strategy.setup()
            elif self.preflight:
                self._run_preflight(trainer, module, converted=not in_setup)

    def _run_preflight(self, trainer: "pl.Trainer", module: Any, converted: bool) -> None:
        """The pre-flight check on the trainer's own first training samples (see the class doc).
        ``converted``: the precision plugin has converted the module (from ``on_fit_start`` on;
        in ``setup()`` it has not, so the batches are not converted either)."""
        strategy = getattr(trainer, "strategy", None)
        precision = getattr(strategy, "precision_plugin", None)
        context = precision.forward_context() if precision is not None else nullcontext()
        error: Optional[BaseException] = None
        try:
            with isolated_rng(), torch.inference_mode(False), context:
                report = _prefixed(
                    preflight_check, module, self._data["train"], self._data["val"], self.options,
                    reference_loss=training_step_loss(module),
                    convert=precision.convert_input if precision is not None and converted else None)
        except Exception as err:  # noqa: BLE001 - re-raised below, once every rank knows
            error = err
        # under DDP every rank decides together: one rank failing alone would leave the others
        # waiting for it in the first gradient all-reduce
        reduce = getattr(strategy, "reduce_boolean_decision", None)
        all_ok = reduce(error is None, all=True) if reduce is not None and trainer.world_size > 1 else error is None
        if error is not None:
            raise error
        if not all_ok:
            raise InfluenceCallbackError("InfluenceCallback: the pre-flight check failed on another rank (see its error)")
        self.preflight_report = report
        if getattr(trainer, "is_global_zero", True):
            self._log().info(f"InfluenceCallback: {report.summary()}")

    def _note_trimmed_training(self, trainer: "pl.Trainer", n: int) -> None:
        """Say so when Lightning trains on fewer batches than the audit will score."""
        for flag in ("limit_train_batches", "overfit_batches"):
            value = getattr(trainer, flag, None)
            trimmed = value not in (None, 1.0, 0.0) if flag == "limit_train_batches" else bool(value)
            if trimmed and isinstance(value, (int, float)):
                warnings.warn(f"InfluenceCallback: {flag}={value}: training sees only part of the training data each "
                              f"epoch, but the audit scores all {n} samples the training loader yields (pass "
                              "run(trainer, train_data=...) to audit another set)", UserWarning, stacklevel=3)

    def _loader(self, trainer: "pl.Trainer", module: Any, kind: str, at_run: bool) -> Any:
        """The one training (or first validation) DataLoader of the fit, or ``None``."""
        return find_loader(trainer, module, kind, cached=self._data.get(kind), at_run=at_run,
                           warn_many=self._warn_many_val)

    def _warn_many_val(self, message: str) -> None:
        if not self._warned_val:
            self._warned_val = True
            warnings.warn(message, UserWarning, stacklevel=4)

    def _log(self) -> logging.Logger:
        # a child of the namespace's logger, which prints INFO to the console like Lightning's own
        return logging.getLogger(f"{self._namespace}.callbacks.influence")

    def _report(self, trainer: "pl.Trainer", result: AuditResult, step: Optional[int], epoch_tag: bool,
                train: Any = None, module: Any = None, val: Any = None) -> None:
        folder = self._scores_folder(trainer)  # every rank asks: a collective under DDP
        if not getattr(trainer, "is_global_zero", True):
            return
        from .reporting import report, summary_text

        if self._handoff.is_worker():
            self._handoff.leave(result, self._state)
        describe, render = self._sample_hooks(trainer, module, train)
        describe_query, render_query = None, None
        if result.attribution is not None:  # the queries: validation samples, or the attribution's own set
            queries = self.attribution.data if result.attribution.source == "queries" else val
            describe_query, render_query = self._sample_hooks(trainer, module, queries,
                                                              (self.describe_query, self.render_query))
        report(result, list(getattr(trainer, "loggers", [])), top_k=self.top_k, describe=describe, step=step,
               render=render, describe_query=describe_query, render_query=render_query)
        self._write_scores(trainer, result, epoch_tag, folder)
        verbose = self.verbose if self.verbose is not None else getattr(trainer, "progress_bar_callback", None) \
            is not None
        if verbose:
            text = summary_text(result, top=10, describe=describe, describe_query=describe_query)
            if self.scores_path:
                text += f"\n\nAll scores: {self.scores_path}"
            self._log().info(text)

    def _sample_hooks(self, trainer: "pl.Trainer", module: Any, train: Any, hooks: Optional[tuple] = None) -> Any:
        """``(describe, render)`` for the reports: the user's hooks (``hooks``, default the
        training data's ``(self.describe, self.render)``), else built from the data ``train``
        (decoded text through a tokenizer, pictures of image batches), else ``None``."""
        from .reporting import dataset_renderer, find_tokenizer, text_describer

        describe, render = hooks if hooks is not None else (self.describe, self.render)
        if train is not None and (describe is None or render is None):
            try:
                dataset, collate = dataset_of(train, "train_data"), collate_of(train)
                if render is None:
                    render = dataset_renderer(dataset, collate)
                if describe is None:
                    tokenizer = find_tokenizer(module, getattr(trainer, "datamodule", None), collate)
                    describe = text_describer(dataset, collate, tokenizer)
            except Exception as err:  # noqa: BLE001 - the tables go out without them
                warnings.warn(f"InfluenceCallback: could not read the training samples for the report "
                              f"({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
        return describe, (render if callable(render) else None)

    def _scores_folder(self, trainer: "pl.Trainer") -> Optional[str]:
        """``dirpath``, else ``trainer.log_dir`` (call on every rank: it is a collective under DDP)."""
        if self.dirpath is not None or not self.scores_filename:
            return self.dirpath
        try:
            folder = trainer.log_dir
        except Exception:  # noqa: BLE001 - e.g. a trainer that was never fit
            folder = None
        return folder or getattr(trainer, "default_root_dir", None) or os.getcwd()

    def _write_scores(self, trainer: "pl.Trainer", result: AuditResult, epoch_tag: bool, folder: Optional[str] = None) -> None:
        """Rank zero writes the full per-sample scores file (atomically)."""
        if not self.scores_filename:
            return
        folder = folder if folder is not None else self._scores_folder(trainer)
        if not getattr(trainer, "is_global_zero", True):
            return
        from .reporting import write_scores_file

        filename = self.scores_filename
        if epoch_tag:
            stem, suffix = os.path.splitext(filename)
            filename = f"{stem}-epoch{trainer.current_epoch}{suffix}"
        self.scores_path = write_scores_file(result, folder, filename)

    def _collect_handoff(self) -> None:
        """In the launching process of ``ddp_spawn``: take the result that rank zero left."""
        handoff = getattr(self, "_handoff", None)
        collected = handoff.collect() if handoff is not None else None
        if collected is not None:
            self._result, state = collected
            self._state.update(state)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = {}  # loaders travel with the trainer, not with the callback
        return state


# ---------------------------------------------------------------------- helpers


def _prefixed(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a ``ValueError``/``TypeError`` gets the callback's name in front."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise type(err)(f"InfluenceCallback: {err}") from err


from lightning.pytorch.callbacks import Callback as _Callback  # noqa: E402  (the core above is namespace-free)


class InfluenceCallback(InfluenceCallbackMixin, _Callback):
    __doc__ = InfluenceCallbackMixin.__doc__
    _namespace = "lightning.pytorch"


__all__ = ["InfluenceCallback", "InfluenceCallbackMixin", "InfluenceCallbackError"]
