"""The tuning report: what one tuning run measured, typed, and the flat dict it is published as.

:class:`TuningReport` gathers the figures at θ* (:class:`ThetaStarFigures`), the learning-rate
probe's curve, the budget, the step loop's figures (:class:`StepFigures`), the attempts a retry
undid (:class:`Attempt`) and the full validation-set figures at θ̃ (:class:`FinalFigures`).
:meth:`TuningReport.as_dict` gives the flat ``Dict[str, float]`` that ``AuditResult.tuning``
holds (keys such as ``val_loss_trained``, ``probe_loss@0.1``, ``lr_attempt_0``,
``val_loss_tuned``), in the order the audit has always listed them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


class _Figures:
    """Figures that flatten to ``{name: value}`` in field order (the keys of ``result.tuning``)."""

    def as_dict(self) -> dict[str, float]:
        """The fields as ``{name: value}``, in field order."""
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class ThetaStarFigures(_Figures):
    """The validation figures at θ* (before the first step): the full-set loss and accuracy, the
    norm of the full-set mean gradient of the audited parameters (the yardstick for θ̃; estimated
    from ``grad_check_samples`` samples, or exact over the full set) and that sample count."""

    val_loss_trained: float
    val_acc_trained: float
    grad_norm_start: float
    grad_check_samples: float


@dataclass(frozen=True)
class StepFigures(_Figures):
    """What the step loop ran and saw: ``steps`` and ``epochs`` (passes) run, ``stopped_early``
    (1/0), the mean mini-batch loss over the first and the last pass and of the first batch,
    ``sharpness`` (fvm: SAM's perturbed-minus-clean loss over the last pass; NaN for vm),
    ``sharpness_aware`` (1/0) and ``steps_s`` (seconds)."""

    steps: float
    epochs: float
    stopped_early: float
    val_loss_start: float
    val_loss_end: float
    val_loss_first_batch: float
    sharpness: float
    sharpness_aware: float
    steps_s: float


@dataclass(frozen=True)
class Attempt:
    """A tuning attempt that a retry undid: its learning rate and its full-set loss at θ̃."""

    lr: float
    val_loss_tuned: float


@dataclass(frozen=True)
class FinalFigures(_Figures):
    """The full validation-set figures at θ̃ and the verdict (:func:`~.checks.minimum_check`):
    loss, accuracy, mean-gradient norm, its ratio to ``grad_norm_start``, the gradient noise
    test's ratio and ``z``, and ``at_minimum`` (1/0, NaN without a step)."""

    val_loss_tuned: float
    val_acc_tuned: float
    grad_norm_tuned: float
    grad_ratio: float
    grad_noise_ratio: float
    grad_z: float
    at_minimum: float


@dataclass(frozen=True)
class TuningReport:
    """One tuning run, as :func:`~.steps.tune` and :func:`~.run.tune_and_check` fill it in.

    ``theta_star`` / ``probe_curve`` (``{η: probe loss}``, ``"0"`` the loss at θ) are ``None``
    when not measured; ``loop=None`` is a zero budget (no step ran; ``probe_s``/``momentum``/``lr``
    are then ``None`` too). A retry measures neither θ* nor a probe: it carries the first attempt's
    (``inherited``, with ``check_s``/``probe_s``/``check_epochs`` and listed after its own step
    figures, as the audit always listed them) and the ``attempts`` undid before it."""

    check_s: float
    budget_epochs: float
    batches_per_pass: float
    #: ``epochs="auto"``: the budget in training epochs (``TuningConfig.budget``)
    budget_training_epochs: float | None = None
    planned_steps: float = 0.0
    planned_epochs: float = 0.0
    theta_star: ThetaStarFigures | None = None
    probe_curve: dict[str, float] | None = None
    probe_s: float | None = None
    check_epochs: float | None = None
    momentum: float | None = None
    lr: float | None = None
    loop: StepFigures | None = None
    inherited: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    train_sample_cost: float | None = None
    retries: float | None = None
    final: FinalFigures | None = None

    def retry_of(self, first: TuningReport, attempts: list[Attempt]) -> TuningReport:
        """This retry's report with the first attempt's θ* figures, probe and their cost, and the
        ``attempts`` undone so far."""
        return replace(self, theta_star=first.theta_star, probe_curve=first.probe_curve, check_s=first.check_s,
                       probe_s=first.probe_s if first.probe_s is not None else self.probe_s,
                       check_epochs=first.check_epochs if first.check_epochs is not None else self.check_epochs,
                       inherited=True, attempts=list(attempts))

    def _theta_star(self) -> dict[str, float]:
        return self.theta_star.as_dict() if self.theta_star is not None else {}

    def _probe(self) -> dict[str, float]:
        return {f"probe_loss@{k}": v for k, v in (self.probe_curve or {}).items()}

    def as_dict(self) -> dict[str, float]:
        """The flat figures of ``AuditResult.tuning``, keys and order as the audit lists them."""
        out: dict[str, float] = {}
        if self.loop is None:  # a zero budget
            out["steps"] = 0.0
        if not self.inherited:
            out.update(self._theta_star())
        out["check_s"] = self.check_s
        out.update(budget_epochs=self.budget_epochs, batches_per_pass=self.batches_per_pass)
        out.update(_given(budget_training_epochs=self.budget_training_epochs))
        if not self.inherited:
            out.update(self._probe())
        out.update(_given(probe_s=self.probe_s, check_epochs=self.check_epochs))
        out.update(planned_steps=self.planned_steps, planned_epochs=self.planned_epochs)
        out.update(_given(momentum=self.momentum, lr=self.lr))
        if self.loop is not None:
            out.update(self.loop.as_dict())
        if self.inherited:
            out.update(self._theta_star())
            out.update(self._probe())
        for i, attempt in enumerate(self.attempts):
            out[f"lr_attempt_{i}"] = attempt.lr
            out[f"val_loss_tuned_attempt_{i}"] = attempt.val_loss_tuned
        out.update(_given(train_sample_cost=self.train_sample_cost, retries=self.retries))
        if self.final is not None:
            out.update(self.final.as_dict())
        return out


def _given(**values: float | None) -> dict[str, float]:
    """The ``values`` that are set (not ``None``), in the order given."""
    return {name: value for name, value in values.items() if value is not None}
