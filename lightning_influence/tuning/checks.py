"""Is θ̃ a validation minimum? The checks after tuning, and the retry they may call for.

:func:`gradient_noise_test` compares the full validation set's mean gradient at θ̃ with its
sampling noise; :func:`minimum_check` / :func:`verify` judge θ̃ on the full-set figures and
warn when it is not a minimum; :func:`retry_due` / :func:`retry_config` decide whether a probed
learning rate that raised the loss is retried from θ* at a smaller one.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

import torch

from ..config import TuningConfig
from .report import FinalFigures

#: the loss must fall by at least this fraction of its value at θ* to count as tuned
MIN_DROP = 0.01
#: at a validation minimum the full-set mean gradient is within this many standard deviations of
#: what sampling noise alone gives it (``grad_z``, see :func:`gradient_noise_test`)
MAX_GRAD_Z = 3.0
#: fvm: a clean gradient that fell to this fraction of its value at θ* also counts (see :func:`verify`)
MAX_GRAD_RATIO = 0.5
#: validation samples per rank whose pairwise inner products estimate ``tr(Σ²)`` for that test
NOISE_PAIR_SAMPLES = 512
#: a retry restarts from θ* at the failed attempt's learning rate over this
RETRY_SHRINK = 4.0


def gradient_noise_test(blocks: Iterable[torch.Tensor], count: int,
                        all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                        ) -> tuple[float, float, float]:
    """Is the full validation set's mean gradient larger than sampling noise explains?

    ``blocks``: for each parameter block, this rank's per-sample validation gradients at θ̃
    ``(M_r, ...)``, flattened to ``(M_r, d_b)`` (the samples with a finite loss); ``count``: ``M``,
    their number over all ranks; ``all_reduce_sum``: the sum over ranks (every rank calls it equally often).

    With ``ḡ`` the mean gradient and ``Σ`` the per-sample gradients' covariance: at a
    stationary point of the expected validation loss ``M‖ḡ‖²`` is a weighted sum of χ²₁
    variables with mean ``tr Σ`` and variance ``2 tr Σ²``; at a minimum of the validation set's
    own loss ``ḡ = 0``. So ``z = (M‖ḡ‖² - tr Σ) / sqrt(2 tr Σ²)`` well above 0 is a descent
    direction the validation data still shows. ``tr Σ`` comes from every sample; ``tr Σ²``
    is the mean squared inner product of centred gradients of two different samples, over the
    pairs among each rank's first ``NOISE_PAIR_SAMPLES`` samples (an ``S×S`` Gram matrix per
    block, ``S ≤ 512``: cheap beside gathering the gradients).

    Returns ``(‖ḡ‖, ‖ḡ‖ / sqrt(tr Σ / M), z)`` (NaN where undefined)."""
    nan = float("nan")
    grad_sq, sample_sq = 0.0, torch.zeros((), dtype=torch.float64)
    gram: torch.Tensor | None = None
    for block in blocks:
        block = block.double().reshape(block.shape[0], -1)
        mean = all_reduce_sum(block.sum(0)) / max(count, 1)
        grad_sq += float(mean.pow(2).sum())
        sample_sq = sample_sq + block.pow(2).sum().cpu()
        centred = block[:NOISE_PAIR_SAMPLES] - mean
        part = centred @ centred.T
        gram = part if gram is None else gram + part
    sample_sq = all_reduce_sum(sample_sq)
    if gram is None:
        gram = torch.zeros(0, 0, dtype=torch.float64)
    off = gram.pow(2).sum() - gram.diagonal().pow(2).sum()
    size = gram.shape[0]
    pairs = all_reduce_sum(torch.stack([off.cpu(), torch.tensor(float(size * size - size), dtype=torch.float64)]))
    if count < 2:
        return (math.sqrt(grad_sq) if count else nan), nan, nan
    trace = (float(sample_sq) - count * grad_sq) / (count - 1)  # tr Σ, unbiased
    trace_sq = float(pairs[0]) / float(pairs[1]) if float(pairs[1]) > 0 else nan  # tr Σ²
    ratio = math.sqrt(grad_sq / (trace / count)) if trace > 0 else nan
    z = (count * grad_sq - trace) / math.sqrt(2 * trace_sq) if trace_sq == trace_sq and trace_sq > 0 else nan
    return math.sqrt(grad_sq), ratio, z


def minimum_check(stats: Mapping[str, float], config: TuningConfig, val_loss: float, val_acc: float,
                  grad_norm: float, noise_ratio: float = float("nan"), grad_z: float = float("nan"),
                  warn: bool = True) -> FinalFigures:
    """The full validation-set figures at θ̃ and the verdict of :func:`verify`, typed; ``stats``:
    the tuning figures (:meth:`~.report.TuningReport.as_dict`). Warns as :func:`verify` does."""
    start = stats.get("grad_norm_start", float("nan"))
    ratio = grad_norm / start if start and math.isfinite(start) and start > 0 else float("nan")
    trained = stats.get("val_loss_trained", float("nan"))
    problems = []
    if stats.get("steps", 0) and math.isfinite(trained) and math.isfinite(val_loss):
        if trained > 1e-4 and val_loss > trained * (1 - MIN_DROP):
            verb = "rose" if val_loss > trained else "barely fell"
            problems.append(f"the full validation-set loss {verb} from {trained:.4g} at θ* to {val_loss:.4g} at θ̃")
    shrunk = bool(stats.get("sharpness_aware")) and math.isfinite(ratio) and ratio <= MAX_GRAD_RATIO
    if stats.get("steps", 0) and math.isfinite(grad_z) and grad_z > MAX_GRAD_Z and not shrunk:
        problems.append(f"the full validation-set gradient at θ̃ is {noise_ratio:.2g}× the norm sampling noise alone "
                        f"gives it, {grad_z:.1f} standard deviations above it (at a minimum: at most {MAX_GRAD_Z:g})")
    if (warn and stats.get("steps", 0) and math.isfinite(trained) and math.isfinite(val_loss)
            and val_loss > max(2 * trained, trained + 1.0)):  # far beyond noise: not a validation minimum
        warnings.warn(f"validation tuning raised the validation loss from {trained:.4g} to {val_loss:.4g}: it "
                      "diverged, and the scores are not taken at a validation minimum; lower tuning.lr", RuntimeWarning)
    at_minimum = float(not problems) if stats.get("steps", 0) else float("nan")
    if problems and warn:
        epochs = stats.get("planned_epochs", float("nan"))
        budget = (f"tuning.steps (now {config.steps})" if config.steps is not None else
                  f"tuning.budget (now {config.budget:g} training epochs, {epochs:.2g} passes)"
                  if config.epochs == "auto" else f"tuning.epochs (now {config.epochs:g} passes)")
        rose = trained == trained and val_loss > trained
        used = stats.get("lr", float("nan"))
        lr = f"{used:.3g}, probed" if config.lr == "auto" else f"{used:g}"
        if rose:
            hint = f"lower tuning.lr (now {lr}) or tuning.rho (now {config.rho:g})"
        elif stats.get("retries", 0):  # a larger lr raised the loss: only a longer tuning can help
            hint = (f"raise {budget}; the probed learning rate raised the loss and was retried at a quarter "
                    f"({int(stats['retries'])}x, now {used:.3g}), so a larger one would not help")
        else:
            hint = f"raise {budget} or tuning.lr (now {lr})"
        warnings.warn("validation tuning did not reach a validation minimum: " + "; ".join(problems)
                      + f". vm/fvm scores assume θ̃ is at one; {hint}.", RuntimeWarning)
    return FinalFigures(val_loss_tuned=val_loss, val_acc_tuned=val_acc, grad_norm_tuned=grad_norm, grad_ratio=ratio,
                        grad_noise_ratio=noise_ratio, grad_z=grad_z, at_minimum=at_minimum)


def verify(stats: Mapping[str, float], config: TuningConfig, val_loss: float, val_acc: float,
           grad_norm: float, noise_ratio: float = float("nan"), grad_z: float = float("nan"),
           warn: bool = True) -> dict[str, float]:
    """Add the full validation-set figures at θ̃ to ``stats`` (``val_loss_tuned``,
    ``val_acc_tuned``, ``grad_norm_tuned``, ``grad_ratio`` = ``grad_norm_tuned /
    grad_norm_start`` (informative only: the θ* figure is a 32-sample estimate),
    ``grad_noise_ratio`` and ``grad_z`` (:func:`gradient_noise_test`), ``at_minimum`` 1/0) and
    warn when θ̃ is not a validation minimum:

    - the full-set loss did not fall below its value at θ* by ``MIN_DROP``, or
    - the full-set mean gradient is larger than sampling noise explains: ``grad_z`` above
      ``MAX_GRAD_Z``. This yardstick is measured at θ̃ on every validation sample's own
      gradient, so the check never goes without one. SAM (fvm) converges to a minimum of the
      *perturbed* loss, where the clean gradient is about ``H ε`` rather than 0, so for fvm a
      clean gradient that fell to at most ``MAX_GRAD_RATIO`` of its θ* value also passes.

    ``warn=False``: the figures only (an attempt that :func:`retry_config` will retry).
    Returns a new dict: ``stats`` and the figures (:func:`minimum_check`)."""
    return {**stats, **minimum_check(stats, config, val_loss, val_acc, grad_norm, noise_ratio, grad_z, warn).as_dict()}


def retry_due(config: TuningConfig, stats: Mapping[str, float], attempt: int) -> bool:
    """Whether tuning attempt ``attempt`` (0 for the first; ``stats`` after :func:`verify`) is
    retried: the learning rate was probed (``config.lr == "auto"``, the user's configuration),
    attempts are left (``config.retries``), and the full validation-set loss at θ̃ *rose* above
    its value at θ*. The probe picks its step on the samples whose gradient it follows, which
    overestimates the step where θ* is already near a minimum (CoLA in ``benchmarks/TUNING.md``).
    A loss that fell too little is not retried: a smaller step would not help."""
    if config.lr != "auto" or attempt >= config.retries or not stats.get("steps"):
        return False
    trained, tuned = stats.get("val_loss_trained", float("nan")), stats.get("val_loss_tuned", float("nan"))
    return math.isfinite(trained) and math.isfinite(tuned) and tuned > trained


def retry_config(config: TuningConfig, stats: Mapping[str, float]) -> TuningConfig:
    """The next attempt's configuration: ``config`` with a fixed learning rate, the failed
    attempt's (``stats["lr"]``) over ``RETRY_SHRINK``. It starts again from θ* with the full
    budget; its θ* figures are the first attempt's."""
    return replace(config, lr=float(stats["lr"]) / RETRY_SHRINK)
