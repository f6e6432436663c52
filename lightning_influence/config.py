"""Small dataclasses that group the audit's options (in the spirit of Kronfluence's arguments).

``audit()`` and ``InfluenceCallback`` take these directly, or plain dicts with the same keys.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Literal, Mapping, Optional, Type, TypeVar, Union

METHODS = ("fvm", "vm", "standard")
FISHERS = ("empirical", "true")


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
    and accuracy at θ* and θ̃, gradient norm, SAM sharpness; ``AuditResult.tuning``) and warns
    when it is not.

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
