"""Validation tuning for ``vm``/``fvm``: move a *copy* of the model to a validation minimum, and check it.

The names below are re-exported from its modules, in the order the audit uses them:

- :mod:`.budget`: the budget in passes over the validation set, steps, the validation loaders;
- :mod:`.evaluation`: the validation loss and its gradient over the samples with a finite loss;
- :mod:`.probe`: the learning-rate probe and the samples it runs on;
- :mod:`.steps`: :func:`tune`, the checks at θ*, the probe, the SGD/SAM step loop;
- :mod:`.checks`: is θ̃ a validation minimum (:func:`verify`), and is a retry due;
- :mod:`.report`: :class:`TuningReport`, the typed figures behind ``AuditResult.tuning``;
- :mod:`.run`: :func:`tune_and_check`, the audit's tuning stage (tune, check, retry, on every rank).
"""
from __future__ import annotations

from .budget import (
    FORWARD_COST,
    MAX_AUTO_EPOCHS,
    MIN_AUTO_EPOCHS,
    MIN_STEP_SHARE,
    bucketed_loader_factory,
    budget_epochs,
    planned_steps,
    relative_sample_cost,
)
from .checks import (
    MAX_GRAD_RATIO,
    MAX_GRAD_Z,
    MIN_DROP,
    NOISE_PAIR_SAMPLES,
    RETRY_SHRINK,
    gradient_noise_test,
    minimum_check,
    retry_config,
    retry_due,
    verify,
)
from .evaluation import evaluate, mean_gradient
from .probe import GRAD_CHECK_SAMPLES, PROBE_FACTOR, PROBE_OCTAVES, PROBE_SAMPLES, PROBE_STEPS, grad_check_ids, probe_lr
from .report import Attempt, FinalFigures, StepFigures, ThetaStarFigures, TuningReport
from .run import tune_and_check, validation_gradients
from .steps import MOMENTUM_HORIZON, tune

__all__ = [
    "FORWARD_COST", "MAX_AUTO_EPOCHS", "MIN_AUTO_EPOCHS", "MIN_STEP_SHARE", "bucketed_loader_factory", "budget_epochs",
    "planned_steps", "relative_sample_cost",
    "MAX_GRAD_RATIO", "MAX_GRAD_Z", "MIN_DROP", "NOISE_PAIR_SAMPLES", "RETRY_SHRINK", "gradient_noise_test",
    "minimum_check", "retry_config", "retry_due", "verify",
    "evaluate", "mean_gradient",
    "GRAD_CHECK_SAMPLES", "PROBE_FACTOR", "PROBE_OCTAVES", "PROBE_SAMPLES", "PROBE_STEPS", "grad_check_ids", "probe_lr",
    "Attempt", "FinalFigures", "StepFigures", "ThetaStarFigures", "TuningReport",
    "tune_and_check", "validation_gradients",
    "MOMENTUM_HORIZON", "tune",
]
