"""The arithmetic precision the model computes in, what its rounding allows, and autocast off
for the audit's own linear algebra.

Lightning's precisions set the arithmetic two ways: ``"64-true"``, ``"32-true"``,
``"bf16-true"`` and ``"16-true"`` convert the parameters (the compute dtype is theirs);
``"bf16-mixed"`` and ``"16-mixed"`` keep float32 parameters and run the forward pass under
``torch.autocast`` (matrix products in bfloat16 / float16). On CUDA, float32 matrix products may
run in TF32 (``torch.backends.cuda.matmul.allow_tf32``) or bfloat16
(``torch.set_float32_matmul_precision("medium")``). :func:`rounding_eps` finds the machine
epsilon of the coarsest of these where the model's computation runs, and :func:`tolerance`
turns it into the largest relative error the pre-flight check accepts between two
computations of the same quantity (the audit's per-sample gradient and autograd on one sample,
the audit's per-sample loss and the model's own):

    ``tolerance = min(MAX_ROUNDING_ERROR, ROUNDING_ULPS * eps)``

``ROUNDING_ULPS`` leaves room for the error growth of reductions summed in another order
(``√K`` for ``K`` terms) and for cancellation in them: 9.8e-4 in float32 (the check's figure
before precisions were told apart), 1.8e-12 in float64. In float16 and bfloat16 one rounding
of the result is already 4.9e-4 and 3.9e-3 (the audit's per-sample products are exact in
float32, autograd's are rounded to the compute dtype); ``MAX_ROUNDING_ERROR`` caps them at
0.1, an order below the relative errors of a real mistake (a parameter used outside its layer,
a batch that does not split into samples: 0.3 to 1), which therefore fail in every precision.

The audit's own linear algebra (per-sample gradient products, curvature, solves, scores) runs
under :func:`full_precision`: autocast, which the callback keeps on around the audit so that
the model computes as it trained, would otherwise round those matrix products to bfloat16 too.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

#: room, in units of the compute dtype's machine epsilon, for reductions summed in another order
ROUNDING_ULPS = 8192
#: the largest relative error rounding may explain in any precision (real errors are of order 1)
MAX_ROUNDING_ERROR = 0.1
#: machine epsilon of TF32 (10 explicit mantissa bits), the CUDA float32 matmul's under allow_tf32
TF32_EPS = 2.0 ** -10
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_dtype(device_type: str) -> None | torch.dtype:
    """The dtype autocast computes in on ``device_type`` now, or ``None`` when it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, AttributeError):  # a device type this torch doesn't know
        return None


def rounding_eps(param_dtype: torch.dtype, device: str | torch.device) -> float:
    """The machine epsilon of the coarsest arithmetic the model's forward and backward use on
    ``device`` now: its parameters' dtype, autocast's dtype where autocast is on, TF32 or
    bfloat16 for CUDA float32 matrix products where torch allows them."""
    device = torch.device(device)
    dtypes = [param_dtype if param_dtype.is_floating_point else torch.float32]
    found = _autocast_dtype(device.type)
    if found is not None:
        dtypes.append(found)
    eps = max(torch.finfo(d).eps for d in dtypes)
    if device.type == "cuda" and torch.float32 in dtypes:
        mode = torch.get_float32_matmul_precision()
        if mode == "medium":
            eps = max(eps, torch.finfo(torch.bfloat16).eps)
        elif mode == "high" or torch.backends.cuda.matmul.allow_tf32:
            eps = max(eps, TF32_EPS)
    return float(eps)


def tolerance(eps: float) -> float:
    """The largest relative error rounding at machine epsilon ``eps`` allows (module docstring)."""
    return min(MAX_ROUNDING_ERROR, ROUNDING_ULPS * eps)


def compute_tolerance(param_dtype: torch.dtype, device: str | torch.device) -> float:
    """:func:`tolerance` of :func:`rounding_eps`: what the pre-flight check accepts now."""
    return tolerance(rounding_eps(param_dtype, device))


@contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off on every device type where it is on, and a half-precision default dtype
    (Lightning's ``"bf16-true"``/``"16-true"`` set it around the callback's audit) back to
    float32, until exit (both restored after): tensors made without a dtype (torchmetrics' ROC
    AUC and AP among them) are not rounded to 8 or 11 bits."""
    default = torch.get_default_dtype()
    with ExitStack() as stack:
        for kind, _ in _autocast_on():
            stack.enter_context(torch.autocast(kind, enabled=False))
        if default in (torch.float16, torch.bfloat16):
            torch.set_default_dtype(torch.float32)
            stack.callback(torch.set_default_dtype, default)
        yield


@contextmanager
def uncached_autocast() -> Iterator[None]:
    """Autocast kept as it is on every device type where it is on, but without its weight cache,
    until exit. ``torch.autocast`` caches each weight's low-precision copy for its whole region
    (``cache_enabled=True``, the default outside Lightning, whose own regions turn it off), so a
    weight changed in place inside the region (the tuning's steps, the lr probe) would keep
    computing with its old copy: tuning would silently move nothing."""
    with ExitStack() as stack:
        for kind, dtype in _autocast_on():
            stack.enter_context(torch.autocast(kind, dtype=dtype, cache_enabled=False))
        yield


def _autocast_on() -> list[tuple[str, torch.dtype]]:
    """``(device type, dtype)`` of every device type where autocast is on now."""
    found = [(kind, _autocast_dtype(kind)) for kind in _AUTOCAST_DEVICES]
    return [(kind, dtype) for kind, dtype in found if dtype is not None]
