"""The audit's options, in frozen dataclasses (in the spirit of Kronfluence's arguments).

:class:`AuditOptions` holds every option of :func:`~lightning_influence.audit` and is the one
place each is documented and checked. It is built once (by ``audit()`` from its keywords, or by
``InfluenceCallback`` at construction, before any training) and passed whole to the stages
(``prepare``, ``score``, the pre-flight check). ``tuning`` and ``curvature`` are
:class:`TuningConfig` and :class:`CurvatureConfig` (plain dicts with the same keys are accepted
and converted). Frozen: change an option with ``dataclasses.replace``, which checks it again.
"""
from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Mapping
from dataclasses import InitVar, asdict, dataclass, fields, replace
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from .attribution import coerce_attribution
from .metrics import check_k, check_noisy
from .normalize import check_normalize
from .solvers.base import SolverSpec, check_solver
from .solvers.damping import check_damping
from .store import check_spill_dir

METHODS = ("fvm", "vm", "standard")
FISHERS = ("empirical", "true")
NONFINITE = ("exclude", "raise")
RANK_BY = ("auto", "influence", "loss_tuned", "loss_trained")
GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: what ``per_validation=True`` uses when neither ``method`` nor ``solver`` is given (and, for the
#: damping, when neither ``curvature`` nor ``damping`` is): chosen from ``benchmarks/attribution.py``
#: (DataInf's identification tasks; docs/ATTRIBUTION.md): the trained weights, the two-sided
#: generalised Fisher (``kronecker``) from the training gradients at a low damping, unit-norm gradients
#: with the queries centred on the mean training gradient (``normalize="centered"``), and for a LoRA
#: model the gradients of its ``B`` matrices only (``params="auto_lora_B"``, when ``params`` is left at
#: ``"auto"``): ``A`` starts random and moves little, so ``∂L/∂B = δ (A x)ᵀ`` is the output gradient
#: against a random projection of the input, a sketch of the full weight's gradient, while ``∂L/∂A``
#: sees it only through the few directions ``B`` has learned (benchmarks/attribution_candidates.py); a
#: model without LoRA: its weights, not its biases or norm scales (benchmarks/attribution_plain.py).
ATTRIBUTION_DEFAULTS: dict[str, Any] = {"method": "standard", "solver": "kronecker", "damping": 1e-4,
                                        "normalize": "centered", "params": "auto_lora_B"}
#: what applies otherwise when ``method`` / ``solver`` are not given
METHOD_DEFAULT, SOLVER_DEFAULT = "fvm", "hyperinf"


@dataclass(frozen=True)
class TuningConfig:
    """How a copy of the model is moved to a (flat) validation minimum for ``vm``/``fvm``.

    The budget is stated in **passes over the validation set** (``epochs``), not in steps, so
    the cost follows the validation set's size; tuning stops early once the loss stops
    falling. The default is scale-free: SGD with momentum and a learning rate probed around
    the Polyak step ``L/‖g‖²`` of the validation loss, under adaptive SAM (ASAM, whose radius
    ``rho`` is relative to ``|θ|``) taken in one pass per step (Momentum-SAM), so the same
    defaults work on an MLP's weights and on LoRA matrices (``docs/TUNING.md``).
    ``optimizer="sgd"`` with a fixed ``lr``, ``adaptive=False``, ``sam="two_pass"`` is the
    paper's recipe (ICML 2025: SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine, batch 128,
    1,000 steps, ρ 0.05).

    After tuning the audit checks that θ̃ is a validation minimum (full validation-set loss
    and accuracy at θ* and θ̃, a test of the gradient at θ̃ against its sampling noise, SAM
    sharpness; ``AuditResult.tuning``) and warns when it is not.

    Attributes:
        epochs: budget, in passes over the validation set (fractions allowed). ``"auto"``
            (default): the compute of ``budget`` training epochs, ``budget x n / m`` passes
            (``budget x n / (2m)`` for two-pass SAM, two forward-backward passes per sample), with
            ``n`` weighted by a training sample's size over a validation sample's (token counts
            for padded text), within [0.5, 10]. The checks (the full-set loss at θ*, the
            gradient check and the lr probe) are counted inside it: the steps get the rest.
        budget: ``epochs="auto"`` only: the tuning's compute, its checks included, in training
            epochs (forward-backward passes over the ``n`` training samples; default 0.5: as
            many one-pass SAM steps as two-pass SAM took in one epoch). Smaller is cheaper, but
            too short a tuning no longer finds a long-trained model's flipped labels
            (``docs/TUNING.md``).
        steps: a fixed number of optimisation steps instead of ``epochs`` (``0``: no tuning).
        optimizer: ``"sgd"`` (default, with ``momentum``) or ``"adam"``: the base optimiser
            (under SAM for ``fvm``).
        lr: initial learning rate, cosine-decayed to 0 over the budget. With
            ``lr_scale="relative"`` (default, Adam only) it is a fraction of each tensor's RMS.
            ``"auto"`` (default): the best single step of a short probe of the validation loss
            along the gradient of 32 validation samples (the gradient check's; a few forward
            passes of them; see ``tuning.probe_lr``), times ``probe_factor x (1 - β)`` for SGD.
        lr_scale: ``"relative"`` or ``"absolute"`` (the learning rate as given; always so for SGD).
        momentum: SGD momentum (``optimizer="sgd"``), capped so that its horizon
            ``1/(1-β)`` is at most a tenth of the planned steps (``result.tuning["momentum"]``).
        weight_decay: weight decay of the base optimiser.
        batch_size: validation mini-batch size (capped at the validation set size).
        rho: SAM neighbourhood radius (``fvm`` only; relative to ``|θ|`` when ``adaptive``).
        adaptive: adaptive SAM (ASAM: perturbation scaled by ``|θ|``), scale-free.
        sam: ``fvm``'s step: ``"two_pass"`` (SAM: ε along the batch's own gradient, then the
            gradient at θ + ε: two forward-backward passes) or ``"momentum"`` (one pass: ε along
            minus the optimiser's momentum, Momentum-SAM; ``sharpness`` is then NaN).
        tol: early stopping: stop after a pass whose mean validation loss fell by less than
            this fraction of the previous pass's (``0``: never stop early).
        probe_factor: ``lr="auto"``: the effective step (``lr / (1 - momentum)`` for SGD) is
            this fraction of the probe's best single step.
        bucket: group validation samples of similar size (padded text) into the same
            mini-batch, which pads less (same-size samples: a plain shuffle either way).
        schedule: ``"cosine"`` or ``"constant"``.
        params: which parameters are tuned: ``"audited"`` (the audited blocks, default) or
            ``"trainable"`` (every parameter with ``requires_grad``).
        train_mode: run the copy in train mode while tuning (dropout, batch-norm updates).
            Off by default so that SAM's two passes see the same function.
        retries: ``lr="auto"`` only: when the full validation-set loss at θ̃ rose above its
            value at θ* (the probed step overshot), tuning restarts from θ* at a quarter of
            the learning rate, up to this many times (``0``: never). Each retry costs one more
            budget and one more pass of validation gradients, and runs only after a rise;
            ``result.tuning["retries"]`` says how many ran.
    """

    epochs: float | Literal["auto"] = "auto"
    budget: float = 0.5
    steps: int | None = None
    optimizer: Literal["adam", "sgd"] = "sgd"
    lr: float | Literal["auto"] = "auto"
    lr_scale: Literal["relative", "absolute"] = "relative"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 8
    rho: float = 0.5
    adaptive: bool = True
    sam: Literal["two_pass", "momentum"] = "momentum"
    tol: float = 0.01
    probe_factor: float = 1.0
    bucket: bool = True
    schedule: Literal["cosine", "constant"] = "cosine"
    params: Literal["audited", "trainable"] = "audited"
    train_mode: bool = False
    retries: int = 2

    def __post_init__(self) -> None:
        if self.steps is not None and (isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 0):
            raise ValueError(f"tuning.steps must be None or an integer >= 0, got {self.steps}")
        if self.epochs != "auto" and (isinstance(self.epochs, str) or not 0 <= self.epochs < float("inf")):
            raise ValueError(f"tuning.epochs must be a finite number >= 0, got {self.epochs}")
        if isinstance(self.budget, (bool, str)) or not 0 < self.budget < float("inf"):  # also rejects NaN
            raise ValueError(f"tuning.budget must be a finite number > 0 (training epochs), got {self.budget!r}")
        if self.lr == "auto":
            if self.optimizer == "adam" and self.lr_scale != "relative":
                raise ValueError("tuning.lr='auto' with optimizer='adam' needs lr_scale='relative'; give a number")
        elif isinstance(self.lr, str) or not 0 < self.lr < float("inf"):  # also rejects NaN
            raise ValueError(f"tuning.lr must be a finite number > 0 (or 'auto'), got {self.lr!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"tuning.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.lr_scale not in ("relative", "absolute"):
            raise ValueError(f"tuning.lr_scale must be 'relative' or 'absolute', got {self.lr_scale!r}")
        if self.batch_size < 1:
            raise ValueError(f"tuning.batch_size must be >= 1, got {self.batch_size}")
        if self.rho < 0:
            raise ValueError(f"tuning.rho must be >= 0, got {self.rho}")
        if self.sam not in ("two_pass", "momentum"):
            raise ValueError(f"tuning.sam must be 'two_pass' or 'momentum', got {self.sam!r}")
        if not 0 < self.probe_factor < float("inf"):
            raise ValueError(f"tuning.probe_factor must be a finite number > 0, got {self.probe_factor}")
        if not 0 <= self.tol < 1:
            raise ValueError(f"tuning.tol must be in [0, 1), got {self.tol}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"tuning.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.params not in ("audited", "trainable"):
            raise ValueError(f"tuning.params must be 'audited' or 'trainable', got {self.params!r}")
        if isinstance(self.retries, bool) or int(self.retries) != self.retries or self.retries < 0:
            raise ValueError(f"tuning.retries must be an integer >= 0, got {self.retries!r}")
        object.__setattr__(self, "retries", int(self.retries))  # 2.0 -> 2: it counts loop iterations


@dataclass(frozen=True)
class CurvatureConfig:
    """Which curvature is inverted and how it is damped.

    Attributes:
        damping: damping factor. With ``damping_rule="relative"`` (DataInf's rule, default)
            each block uses ``λ_l = damping · mean(g_l²)`` over its curvature gradients;
            with ``"absolute"``, ``λ_l = damping``.
        damping_rule: ``"relative"`` or ``"absolute"``.
        fisher: ``"empirical"`` (gradients at the given labels) or ``"true"`` (labels sampled
            from the model's own predictions; classification with the default loss only).
        solver_options: keyword arguments for the solver's constructor (e.g. ``tol``).
    """

    damping: float = 0.1
    damping_rule: Literal["relative", "absolute"] = "relative"
    fisher: Literal["empirical", "true"] = "empirical"
    solver_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_damping(self.damping)
        if self.damping_rule not in ("relative", "absolute"):
            raise ValueError(f"damping_rule must be 'relative' or 'absolute', got {self.damping_rule!r}")
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {self.fisher!r}")


@dataclass(frozen=True)
class AuditOptions:
    """Every option of :func:`~lightning_influence.audit` and ``InfluenceCallback``: the one
    place each is documented and checked (``ValueError`` naming the option, ``TypeError`` for a
    non-integer ``seed``), in ``__post_init__``. Built once per audit (by ``audit()`` from its
    keywords, or by the callback at construction) and passed whole to ``prepare``, ``score`` and
    the pre-flight check. Frozen: ``dataclasses.replace`` makes a checked copy.

    Normalised on construction: ``method``, ``solver`` and ``normalize`` resolved (``None`` /
    ``"auto"``: see each); ``tuning`` and ``curvature`` become their dataclasses, with ``damping``
    folded into ``curvature`` and then ``None``; ``attribution`` an
    :class:`~lightning_influence.attribution.AttributionConfig` or ``None``; ``noisy`` a bool
    tensor, ``clean_labels`` a long tensor, ``params`` a name or a list, ``device`` a
    ``torch.device``. With ``n`` (the number of training samples; not a field) the lengths of
    ``noisy`` and ``clean_labels`` are checked too (else :meth:`check_samples` does, later).

    Attributes:
        loss_fn: ``(model, batch) -> (B,)`` per-sample losses; default: see ``losses.py``.
        method: ``"fvm"`` (SAM-tuned flat validation minimum), ``"vm"`` (SGD-tuned) or
            ``"standard"`` (Koh & Liang at the trained weights). ``None`` (default): ``"fvm"``, or
            with ``per_validation=True`` and no ``solver`` either, the attribution defaults
            (:data:`~lightning_influence.config.ATTRIBUTION_DEFAULTS`: standard, kronecker,
            damping 1e-4 unless ``curvature``/``damping`` is given, ``normalize="centered"``, a
            LoRA model's ``B`` matrices unless ``params`` is given).
        solver: ``"hyperinf"``, ``"datainf"``, ``"lissa"``, ``"exact"``, ``"identity"``,
            ``"kronecker"``, or an ``InverseSolver`` instance/class. ``None`` (default):
            ``"hyperinf"``, or the attribution defaults (see ``method``).
        params: ``"auto"``, ``"lora"``, ``"lora_B"``, ``"auto_lora_B"``, ``"trainable"`` or
            parameter-name glob patterns (:func:`~lightning_influence.params.select_blocks`); under
            the attribution defaults ``"auto"`` becomes ``"auto_lora_B"`` (a LoRA model's ``B``
            matrices).
        noisy: optional ``(n,)`` bool ground-truth flags; enables ``result.metrics``.
        top_k: k for precision/recall at k.
        seed: seeds the tuning order and the true-Fisher label draws (the global RNG is untouched).
        tuning: :class:`TuningConfig` (or dict) for ``vm``/``fvm``.
        curvature: :class:`CurvatureConfig` (or dict): damping, damping rule, Fisher type, solver options.
        damping: shortcut for ``curvature.damping``.
        batch_size: batch size of the gradient passes.
        grad_dtype: storage dtype of the per-sample gradients (default float32, or float64 for a
            float64 model).
        device: where to compute (default: the model's device).
        clean_labels: optional ``(n,)`` true labels, for the relabel accuracy.
        per_validation: also compute the ``(m, n)`` per-validation-point score matrix.
        normalize: gradient normalisation of the per-validation scores: ``"unit"`` (unit-norm
            gradients), ``"centered"`` (queries centred on the mean training gradient, then unit
            norms; :mod:`~lightning_influence.normalize`), ``"none"``, or ``"auto"`` (default):
            ``"centered"`` under the attribution defaults, else ``"none"``.
        nonfinite: ``"exclude"`` samples with non-finite loss/gradient (with a warning), or ``"raise"``.
        max_memory: bytes of gradients kept in RAM; past it they spill to disk (vm/fvm keep no
            training store unless per_validation or attribution reads it).
        spill_dir: where spilled gradients go (a temporary directory by default).
        projection: project each side of big Linear blocks to this many dimensions with a
            Gaussian sketch (LoGra-style; the full per-sample gradient is never formed).
        rank_by: what ``result.scores`` and ``result.ranking`` rank by (most harmful first):
            ``"auto"`` (default: ``"loss_tuned"`` for vm/fvm, ``"influence"`` for standard),
            ``"influence"`` (the method's influence score), ``"loss_tuned"`` (each sample's
            loss at θ̃) or ``"loss_trained"`` (at θ*). The influence score is always in
            ``result.influence``, and with ``noisy`` the detection metrics of every ranking
            are in ``result.metrics_by``. Why the loss at θ̃ is the default:
            docs/BENCHMARKS.md, *Which ranking to use*.
        attribution: explain predictions: ``True``, a dict or an
            :class:`~lightning_influence.AttributionConfig` (which queries: by default the
            validation samples the trained model gets wrong; ``k`` per side). For each query,
            the ``k`` most helpful and most harmful training samples, computed streaming (no
            ``(m, n)`` matrix): ``result.attribution``, written beside the scores file by ``save()``.
        preflight: first run :func:`~lightning_influence.preflight.check` on a few training
            samples (the loss matches the model's own, the gradients match autograd, the store
            fits in memory); ``result.preflight`` holds its report.
    """

    loss_fn: Callable | None = None
    method: str | None = None
    solver: SolverSpec | None = None
    params: str | list[str] = "auto"
    noisy: Any = None
    top_k: int = 50
    seed: int = 0
    tuning: None | TuningConfig | Mapping[str, Any] = None
    curvature: None | CurvatureConfig | Mapping[str, Any] = None
    damping: float | None = None
    batch_size: int = 32
    grad_dtype: None | str | torch.dtype = None
    device: None | str | torch.device = None
    clean_labels: Any = None
    per_validation: bool = False
    nonfinite: str = "exclude"
    max_memory: int | None = None
    spill_dir: str | None = None
    projection: int | None = None
    preflight: bool = True
    rank_by: str = "auto"
    attribution: Any = None
    normalize: str = "auto"
    n: InitVar[int | None] = None

    def __post_init__(self, n: int | None = None) -> None:
        self._resolve_defaults()
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        check_solver(self.solver)
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        resolve_rank_by(self.rank_by, self.method)
        curvature = coerce(CurvatureConfig, self.curvature)
        if self.damping is not None:  # the one place the shortcut meets curvature.damping
            curvature = replace(curvature, damping=self.damping)
        _set(self, tuning=coerce(TuningConfig, self.tuning), curvature=curvature, damping=None)
        _positive_int(self.batch_size, "batch_size", "{name} must be >= 1 (an integer), got {value!r}")
        check_k(self.top_k, "top_k")
        if self.projection is not None:
            _positive_int(self.projection, "projection", "{name} must be None or a positive integer, got {value!r}")
        if self.max_memory is not None and (isinstance(self.max_memory, bool) or not isinstance(
                self.max_memory, numbers.Real) or not self.max_memory >= 0):
            raise ValueError(f"max_memory must be None or >= 0 bytes, got {self.max_memory!r}")
        try:
            operator.index(self.seed)
        except TypeError:
            raise TypeError(f"seed must be an integer, got {self.seed!r}") from None
        parse_grad_dtype(self.grad_dtype, torch.float32)
        check_spill_dir(self.spill_dir)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
        _set(self, noisy=check_noisy(self.noisy, n), clean_labels=check_clean_labels(self.clean_labels, n),
             params=self.params if isinstance(self.params, str) else list(self.params),
             device=None if self.device is None else torch.device(self.device),
             attribution=coerce_attribution(self.attribution))

    def _resolve_defaults(self) -> None:
        """``method``/``solver`` ``None`` and ``normalize="auto"`` resolved: with ``per_validation``
        and neither ``method`` nor ``solver`` given, :data:`ATTRIBUTION_DEFAULTS` (its damping
        too when neither ``curvature`` nor ``damping`` is given, its ``params`` when ``params`` is
        ``"auto"``); otherwise fvm, hyperinf and no
        normalisation, as before. Idempotent: a resolved copy resolves to itself."""
        attribution = bool(self.per_validation) and self.method is None and self.solver is None
        defaults = ATTRIBUTION_DEFAULTS if attribution else {"method": METHOD_DEFAULT, "solver": SOLVER_DEFAULT,
                                                             "normalize": "none"}
        _set(self, method=defaults["method"] if self.method is None else self.method,
             solver=defaults["solver"] if self.solver is None else self.solver,
             normalize=defaults["normalize"] if self.normalize == "auto" else self.normalize)
        if attribution and self.curvature is None and self.damping is None:
            _set(self, damping=ATTRIBUTION_DEFAULTS["damping"])
        if attribution and self.params == "auto":
            _set(self, params=ATTRIBUTION_DEFAULTS["params"])
        check_normalize(self.normalize)

    @property
    def grad_dtype_resolved(self) -> torch.dtype | None:
        """``grad_dtype`` as a torch dtype, ``None`` when not given (the stages pick their default)."""
        return parse_grad_dtype(self.grad_dtype, None)

    def check_samples(self, n: int) -> None:
        """Check that ``noisy`` and ``clean_labels`` hold one value per training sample (``n``)."""
        check_noisy(self.noisy, n)
        check_clean_labels(self.clean_labels, n)

    @property
    def rank_by_resolved(self) -> str:
        """The ranking ``rank_by`` names for this ``method`` (``"auto"`` resolved)."""
        return resolve_rank_by(self.rank_by, self.method)

    @classmethod
    def from_keywords(cls, options: "AuditOptions" | None, n: int | None = None,
                      **keywords: Any) -> "AuditOptions":
        """The options the keywords give, or, with ``options``, a copy of it in which the keywords
        that are not at their default replace its values; checked for ``n`` training samples."""
        if options is None:
            return cls(**keywords, n=n)
        if not isinstance(options, cls):
            raise TypeError(f"options must be an AuditOptions, got {type(options).__name__}")
        defaults = {f.name: f.default for f in fields(cls)}
        given = {name: value for name, value in keywords.items() if not _is_default(value, defaults[name])}
        return replace(options, **given, n=n)  # a copy: the caller's object stays theirs


def resolve_rank_by(rank_by: str, method: str) -> str:
    """The ranking ``rank_by`` names for ``method``: ``"auto"`` is ``"loss_tuned"`` (the loss at
    θ̃) for vm/fvm and ``"influence"`` for standard (which has no θ̃)."""
    if rank_by not in RANK_BY:
        raise ValueError(f"unknown rank_by {rank_by!r}; choose one of {RANK_BY}")
    if rank_by == "auto":
        return "loss_tuned" if method in ("vm", "fvm") else "influence"
    if rank_by == "loss_tuned" and method not in ("vm", "fvm"):
        raise ValueError("rank_by='loss_tuned' needs method='vm' or 'fvm' (standard has no tuned weights θ̃)")
    return rank_by


def parse_grad_dtype(value: None | str | torch.dtype, default: torch.dtype | None) -> torch.dtype | None:
    """``grad_dtype`` as a torch dtype (``default`` for ``None``)."""
    if value is None:
        return default
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, str(value).replace("torch.", ""), None)
    if dtype not in GRAD_DTYPES:  # float8 & co. have no inf and ~1 significant digit: never a silent choice
        raise ValueError(f"grad_dtype must be one of 'float16', 'bfloat16', 'float32', 'float64', got {value!r}")
    return dtype


def check_clean_labels(clean_labels: Any, n: int | None = None) -> Tensor | None:
    """``clean_labels`` as a long tensor of integer labels, one per training sample (``n`` of
    them when known), or ``None``. Floats are an error, not truncated."""
    if clean_labels is None:
        return None
    clean = torch.as_tensor(clean_labels)
    if (clean.dim() != 1 or (n is not None and clean.shape[0] != n) or clean.is_floating_point()
            or clean.is_complex()):
        count = f" ({n})" if n is not None else ""
        raise ValueError(f"clean_labels must be one integer label per training sample{count}, got shape "
                         f"{tuple(clean.shape)} and dtype {clean.dtype}")
    return clean.long()


def _set(obj: Any, **values: Any) -> None:
    """Set fields of a frozen dataclass while it normalises itself in ``__post_init__``."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def _positive_int(value: Any, name: str, message: str) -> None:
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(message.format(name=name, value=value))


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (isinstance(default, (str, bool, int, float)) and type(value) is type(default)
                                and value == default)


C = TypeVar("C")


def coerce(cls: type[C], value: None | C | Mapping[str, Any]) -> C:
    """Turn ``None``, an instance or a mapping into an instance of the dataclass ``cls``,
    with a clear error for unknown keys."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or a dict, got {type(value).__name__}")


def as_dict(config: Any) -> dict[str, Any]:
    """A dataclass as a plain dict (for logging hyper-parameters)."""
    return asdict(config)
