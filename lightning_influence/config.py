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

    The paper (ICML 2025) uses SGD, lr 0.01, momentum 0.9, weight decay 5e-4, cosine decay,
    batch 128, 1,000 steps, SAM radius 0.05. Our defaults change three of them: lr 0.03,
    300 steps, ρ 0.2, chosen on digits with 20 % flips (see ``benchmarks/TUNING.md``: +0.009
    AUROC and +0.031 AP there, at 30 % of the tuning cost).

    Attributes:
        steps: optimisation steps on the validation set.
        lr: initial learning rate (cosine-decayed to 0 over ``steps``).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: validation mini-batch size (capped at the validation set size).
        rho: SAM neighbourhood radius (``fvm`` only).
        adaptive: adaptive SAM (perturbation scaled by ``|θ|``).
        schedule: ``"cosine"`` or ``"constant"``.
        params: which parameters are tuned: ``"audited"`` (the audited blocks, default) or
            ``"trainable"`` (every parameter with ``requires_grad``).
        train_mode: run the copy in train mode while tuning (dropout, batch-norm updates).
            Off by default so that SAM's two passes see the same function.
    """

    steps: int = 300
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    rho: float = 0.2
    adaptive: bool = False
    schedule: Literal["cosine", "constant"] = "cosine"
    params: Literal["audited", "trainable"] = "audited"
    train_mode: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"tuning.steps must be >= 0, got {self.steps}")
        if not 0 < self.lr < float("inf"):  # also rejects NaN
            raise ValueError(f"tuning.lr must be a finite number > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"tuning.batch_size must be >= 1, got {self.batch_size}")
        if self.rho < 0:
            raise ValueError(f"tuning.rho must be >= 0, got {self.rho}")
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
