"""lightning_influence: audit a model's training data with influence functions.

Public names: :class:`InfluenceCallback`, :func:`audit`, :class:`AuditResult`, the option
dataclasses, the solver registry (:class:`InverseSolver`, :func:`register_solver`,
:data:`SOLVERS`), the pre-flight :func:`check`, and every exception the library raises
(``lightning_influence.exceptions``).
"""
from .attribution import Attribution, AttributionConfig
from .audit import audit, prepare, score
from .config import AuditOptions, CurvatureConfig, TuningConfig
from .exceptions import (
    BatchFormatError,
    InfluenceCallbackError,
    LossMismatchError,
    NonFiniteGradientError,
    PreflightError,
    RemoteStageError,
)
from .preflight import PreflightReport, check
from .result import AuditResult
from .solvers import SOLVERS, InverseSolver, make_solver, register_solver

__all__ = ["audit", "prepare", "score", "AuditResult", "AuditOptions", "TuningConfig", "CurvatureConfig",
           "InverseSolver", "register_solver", "make_solver", "SOLVERS", "InfluenceCallback", "check",
           "PreflightReport", "BatchFormatError", "LossMismatchError", "PreflightError", "NonFiniteGradientError",
           "RemoteStageError", "InfluenceCallbackError", "Attribution", "AttributionConfig"]


def __getattr__(name: str):  # the callback imports Lightning; keep `import lightning_influence` light
    if name == "InfluenceCallback":
        from .callback import InfluenceCallback

        return InfluenceCallback
    raise AttributeError(f"module 'lightning_influence' has no attribute {name!r}")

__version__ = "0.1.0"
