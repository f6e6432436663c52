"""Small dataclasses that group the audit's options (in the spirit of Kronfluence's arguments).

``audit()`` and ``InfluenceCallback`` take :class:`TuningConfig` and :class:`CurvatureConfig`
directly, or plain dicts with the same keys; both check all their options through one
:class:`AuditOptions`.
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import InitVar, asdict, dataclass, fields, replace
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Type, TypeVar, Union

import torch
from torch import Tensor

from .metrics import check_noisy
from .solvers.base import SolverSpec, check_solver

METHODS = ("fvm", "vm", "standard")
FISHERS = ("empirical", "true")
NONFINITE = ("exclude", "raise")
RANK_BY = ("auto", "influence", "loss_tuned", "loss_trained")
GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: what ``per_validation=True`` uses when neither ``method`` nor ``solver`` is given (and, for the
#: damping, when neither ``curvature`` nor ``damping`` is): chosen from ``benchmarks/attribution.py``
#: (DataInf's identification tasks; README, *Attribution*): the trained weights, the two-sided
#: generalised Fisher (``kronecker``) from the training gradients at a low damping, unit-norm gradients
#: with the queries centred on the mean training gradient (``normalize="centered"``).
ATTRIBUTION_DEFAULTS: Dict[str, Any] = {"method": "standard", "solver": "kronecker", "damping": 1e-4,
                                        "normalize": "centered"}
#: what applies otherwise when ``method`` / ``solver`` are not given
METHOD_DEFAULT, SOLVER_DEFAULT = "fvm", "hyperinf"


@dataclass
class TuningConfig:
    """How a copy of the model is moved to a (flat) validation minimum for ``vm``/``fvm``.

    The budget is stated in **passes over the validation set** (``epochs``), not in steps, so
    the cost follows the validation set's size; tuning stops early once the loss stops
    falling. The default is scale-free: SGD with momentum and a learning rate probed around
    the Polyak step ``L/‖g‖²`` of the validation loss, under adaptive SAM (ASAM, whose radius
    ``rho`` is relative to ``|θ|``), so the same defaults work on an MLP's weights and on LoRA
    matrices (``benchmarks/TUNING.md``). ``optimizer="sgd"`` with a fixed ``lr``,
    ``adaptive=False`` is the paper's recipe (ICML 2025: SGD lr 0.01,
    momentum 0.9, weight decay 5e-4, cosine, batch 128, 1,000 steps, ρ 0.05).

    After tuning the audit checks that θ̃ is a validation minimum (full validation-set loss
    and accuracy at θ* and θ̃, a test of the gradient at θ̃ against its sampling noise, SAM
    sharpness; ``AuditResult.tuning``) and warns when it is not.

    Attributes:
        epochs: budget, in passes over the validation set (fractions allowed). ``"auto"``
            (default): the compute of one training epoch, ``n / (2m)`` passes for fvm (SAM
            takes two forward-backward passes per sample), ``n / m`` for vm, with ``n``
            weighted by a training sample's size over a validation sample's (token counts for
            padded text), within [0.5, 10]. The checks (the full-set loss at θ*, the gradient
            check and the lr probe) are counted inside it: the steps get the rest.
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

    epochs: Union[float, Literal["auto"]] = "auto"
    steps: Optional[int] = None
    optimizer: Literal["adam", "sgd"] = "sgd"
    lr: Union[float, Literal["auto"]] = "auto"
    lr_scale: Literal["relative", "absolute"] = "relative"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 8
    rho: float = 0.5
    adaptive: bool = True
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
        self.retries = int(self.retries)  # 2.0 -> 2: it counts loop iterations


@dataclass
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
    solver_options: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        if not 0 < self.damping < float("inf"):  # also rejects NaN
            raise ValueError(f"damping must be a finite number > 0, got {self.damping}")
        if self.damping_rule not in ("relative", "absolute"):
            raise ValueError(f"damping_rule must be 'relative' or 'absolute', got {self.damping_rule!r}")
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {self.fisher!r}")


@dataclass
class AuditOptions:
    """Every option of :func:`~lightning_influence.audit` (see there for each one's meaning),
    checked once, in ``__post_init__``: ``ValueError`` (``TypeError`` for a non-integer
    ``seed``) naming the option. ``audit()`` builds one from its keywords (or takes
    ``options=``); ``InfluenceCallback`` builds one at construction, before any training, and
    adds only its Lightning-specific options.

    Normalised on construction: ``method``, ``solver`` and ``normalize`` resolved (``None`` /
    ``"auto"``: the attribution defaults under ``per_validation``, see :meth:`_resolve_defaults`);
    ``tuning`` and ``curvature`` become their dataclasses, with
    ``damping`` (the shortcut for ``curvature.damping``) folded into ``curvature`` and then
    ``None``; ``attribution`` an :class:`~lightning_influence.attribution.AttributionConfig` or ``None``; ``noisy`` a bool tensor, ``clean_labels`` a long tensor, ``params`` a name or a
    list, ``device`` a ``torch.device``. With ``n`` (the number of training samples; not a
    field) the lengths of ``noisy`` and ``clean_labels`` are checked too; else
    :meth:`check_samples` checks them once it is known.
    """

    loss_fn: Optional[Callable] = None
    method: Optional[str] = None
    solver: Optional[SolverSpec] = None
    params: Union[str, List[str]] = "auto"
    noisy: Any = None
    top_k: int = 50
    seed: int = 0
    tuning: Union[None, TuningConfig, Mapping[str, Any]] = None
    curvature: Union[None, CurvatureConfig, Mapping[str, Any]] = None
    damping: Optional[float] = None
    batch_size: int = 32
    grad_dtype: Union[None, str, torch.dtype] = None
    device: Union[None, str, torch.device] = None
    clean_labels: Any = None
    per_validation: bool = False
    nonfinite: str = "exclude"
    max_memory: Optional[int] = None
    spill_dir: Optional[str] = None
    projection: Optional[int] = None
    preflight: bool = True
    rank_by: str = "auto"
    attribution: Any = None
    normalize: str = "auto"
    n: InitVar[Optional[int]] = None

    def __post_init__(self, n: Optional[int] = None) -> None:
        self._resolve_defaults()
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        check_solver(self.solver)
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        resolve_rank_by(self.rank_by, self.method)
        self.tuning = coerce(TuningConfig, self.tuning)
        self.curvature = coerce(CurvatureConfig, self.curvature)
        if self.damping is not None:  # the one place the shortcut meets curvature.damping
            self.curvature = replace(self.curvature, damping=self.damping)
            self.damping = None
        _positive_int(self.batch_size, "batch_size", "{name} must be >= 1 (an integer), got {value!r}")
        _positive_int(self.top_k, "top_k", "{name} must be a positive integer, got {value!r}")
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
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
        self.noisy = check_noisy(self.noisy, n)
        self.clean_labels = check_clean_labels(self.clean_labels, n)
        self.params = self.params if isinstance(self.params, str) else list(self.params)
        self.device = None if self.device is None else torch.device(self.device)
        from .attribution import coerce_attribution

        self.attribution = coerce_attribution(self.attribution)

    def _resolve_defaults(self) -> None:
        """``method``/``solver`` ``None`` and ``normalize="auto"`` resolved: with ``per_validation``
        and neither ``method`` nor ``solver`` given, :data:`ATTRIBUTION_DEFAULTS` (its damping
        too when neither ``curvature`` nor ``damping`` is given); otherwise fvm, hyperinf and no
        normalisation, as before. Idempotent: a resolved copy resolves to itself."""
        attribution = bool(self.per_validation) and self.method is None and self.solver is None
        if self.method is None:
            self.method = ATTRIBUTION_DEFAULTS["method"] if attribution else METHOD_DEFAULT
        if self.solver is None:
            self.solver = ATTRIBUTION_DEFAULTS["solver"] if attribution else SOLVER_DEFAULT
        if attribution and self.curvature is None and self.damping is None:
            self.damping = ATTRIBUTION_DEFAULTS["damping"]
        if self.normalize == "auto":
            self.normalize = ATTRIBUTION_DEFAULTS["normalize"] if attribution else "none"
        from .normalize import check_normalize

        check_normalize(self.normalize)

    def check_samples(self, n: int) -> None:
        """Check that ``noisy`` and ``clean_labels`` hold one value per training sample (``n``)."""
        check_noisy(self.noisy, n)
        check_clean_labels(self.clean_labels, n)

    @property
    def rank_by_resolved(self) -> str:
        """The ranking ``rank_by`` names for this ``method`` (``"auto"`` resolved)."""
        return resolve_rank_by(self.rank_by, self.method)

    @classmethod
    def from_keywords(cls, options: Optional["AuditOptions"], n: Optional[int] = None,
                      **keywords: Any) -> "AuditOptions":
        """A copy of ``options`` when given (every keyword must then be at its default: one
        source for each option), else the options the keywords give; checked for ``n``
        training samples."""
        if options is None:
            return cls(**keywords, n=n)
        if not isinstance(options, cls):
            raise TypeError(f"options must be an AuditOptions, got {type(options).__name__}")
        defaults = {f.name: f.default for f in fields(cls)}
        given = sorted(name for name, value in keywords.items() if not _is_default(value, defaults[name]))
        if given:
            raise ValueError(f"pass the options either as options= or as keywords, not both (also given: {given})")
        return replace(options, n=n)  # a copy: the caller's object stays theirs


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


def parse_grad_dtype(value: Union[None, str, torch.dtype], default: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """``grad_dtype`` as a torch dtype (``default`` for ``None``)."""
    if value is None:
        return default
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, str(value).replace("torch.", ""), None)
    if dtype not in GRAD_DTYPES:  # float8 & co. have no inf and ~1 significant digit: never a silent choice
        raise ValueError(f"grad_dtype must be one of 'float16', 'bfloat16', 'float32', 'float64', got {value!r}")
    return dtype


def check_clean_labels(clean_labels: Any, n: Optional[int] = None) -> Optional[Tensor]:
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


def coerce(cls: Type[C], value: Union[None, C, Mapping[str, Any]]) -> C:
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


def as_dict(config: Any) -> Dict[str, Any]:
    """A dataclass as a plain dict (for logging hyper-parameters)."""
    return asdict(config)
