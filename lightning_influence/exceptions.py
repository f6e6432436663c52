"""Every exception the library raises on purpose, in one place (exported at the top level).

Each one subclasses the built-in type a caller would catch anyway (``ValueError`` for bad
configuration, ``TypeError`` for data of the wrong shape or kind, ...), so existing
``except ValueError`` code keeps working.
"""
from __future__ import annotations


class BatchFormatError(TypeError):
    """The default loss does not understand this batch (its format, or a key the model's
    forward doesn't take); the message names it. Pass ``loss_fn``."""


class LossMismatchError(ValueError):
    """The default per-sample loss does not reproduce the model's own loss; pass ``loss_fn``."""


class PreflightError(ValueError):
    """The pre-flight check found that the audit would be wrong or would not fit; the message
    says what to change."""


class NonFiniteGradientError(FloatingPointError):
    """Some samples have a non-finite loss or gradient and ``nonfinite="raise"`` (or every
    sample does)."""


class RemoteStageError(RuntimeError):
    """Another rank failed in this stage; its own error was raised there."""


class InfluenceCallbackError(RuntimeError):
    """The callback could not find what it needs (e.g. the trainer has no training data)."""


__all__ = ["BatchFormatError", "LossMismatchError", "PreflightError", "NonFiniteGradientError", "RemoteStageError",
           "InfluenceCallbackError"]
