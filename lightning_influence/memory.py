"""How many bytes the audit will need, and whether the machine has them.

The pre-flight check (:func:`~lightning_influence.preflight.check`) plans the audit's memory
before any expensive stage with :func:`check_memory`: the gradient stores (numbers per sample ×
samples × bytes), the solve's peak as the solver itself estimates it
(:func:`~lightning_influence.solvers.base.estimate_solve_bytes`), and the other terms of the
audit's peak (:func:`peak_parts`), against the available RAM (:func:`available_ram`, of which
:data:`RAM_SHARE` may be planned) and, for a store spilled past ``max_memory``, the free disk.
Past either, a :class:`~lightning_influence.exceptions.PreflightError` that names
``max_memory=``, ``projection=``, ``params=`` and ``grad_dtype=`` with the figure each would give.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .exceptions import PreflightError
from .params import Block
from .solvers.base import SolverSpec, estimate_solve_bytes, make_solver
from .store import chunk_bytes

#: share of the available RAM the audit may plan to use
RAM_SHARE = 0.8


@dataclass
class MemoryPlan:
    """The audit's planned memory, in bytes (the fields of the same names in
    :class:`~lightning_influence.preflight.PreflightReport` hold them).

    Attributes:
        numbers_per_sample: audited gradient numbers per sample (after projection).
        store_bytes: the training-gradient store(s); ``val_bytes`` the validation one(s).
        solve_bytes: the solver's estimated peak memory (:func:`solve_bytes`).
        peak_parts: each term of the peak (:func:`peak_parts`); ``peak_bytes`` the peak itself:
            ``val + store + max(model + tuning + batch, chunks + solve)``, or, when ``streamed``
            (vm/fvm scored as the training gradients are gathered: no training store, the solvers
            fitted and kept while the model copy computes), ``val + model + tuning + batch + chunks + solve``.
        available_bytes: RAM available when planned (``None`` if unknown).
    """

    numbers_per_sample: int = 0
    store_bytes: int = 0
    val_bytes: int = 0
    solve_bytes: int = 0
    peak_bytes: int = 0
    peak_parts: dict[str, int] = field(default_factory=dict)
    available_bytes: int | None = None
    streamed: bool = False


def available_ram() -> int | None:
    """Bytes of RAM available to a new allocation (Linux ``MemAvailable``), else ``None``."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def stored_shape(block: Block, projection: int | None) -> tuple[int, int]:
    """The stored ``(r, d)`` of a block's per-sample gradient, after ``projection`` (see projection.py)."""
    if projection is None or block.linear is None or max(block.param.shape) <= projection:
        return block.shape
    sides = [min(s, projection) for s in block.param.shape]
    return (1, sides[0]) if len(sides) == 1 else (min(sides), max(sides))


def gradient_numbers(blocks: list[Block], projection: int | None) -> int:
    """Numbers of one sample's stored gradient over ``blocks``: the sum of ``r·d``."""
    return sum(r * d for r, d in (stored_shape(b, projection) for b in blocks))


def solve_bytes(blocks: list[Block], solver: SolverSpec, n_curvature: int, projection: int | None,
                compute_bytes: int, options: dict[str, Any] | None = None, gathered: bool = True) -> int:
    """The solve stage's peak memory as the solver estimates it (its own
    :meth:`~lightning_influence.solvers.base.InverseSolver.estimate_bytes`, the solver built with
    the curvature config's ``options``; see :func:`~lightning_influence.solvers.base.estimate_solve_bytes`
    for a duck-typed one). ``gathered``: whether the solvers' gathered ``"cat"`` statistics are a
    copy (a spilled or converted store, several ranks) rather than views of a store in RAM of the
    compute dtype."""
    sizes = [stored_shape(b, projection) for b in blocks]
    instance = make_solver(solver, **(options or {})) if isinstance(solver, (str, type)) else solver
    return estimate_solve_bytes(instance, sizes, n_curvature, compute_bytes, gathered)


def peak_parts(plan: MemoryPlan, train_samples: int, val_samples: int, blocks: list[Block], dtype: torch.dtype,
               method: str, max_memory: int | None, projection: int | None, model: nn.Module | None,
               batch_size: int, per_validation: bool = False) -> dict[str, int]:
    """The terms of the audit's peak memory growth, in bytes (``plan`` holds the stores' and the
    solve's; see :attr:`~lightning_influence.preflight.PreflightReport.peak_bytes`):

    - ``val``: the validation store (always in RAM), ``store``: the training store(s) in RAM (0
      when spilled past ``max_memory``);
    - ``model``: the audit's copy of the model (parameters and buffers); ``tuning``: vm/fvm's
      state of the tuned (audited) parameters: gradient, momentum or SAM's, θ* kept for a retry;
    - ``batch``: one batch's per-sample gradients ``batch × numbers`` in the compute dtype, with
      the transposed copy and finiteness mask of the largest block;
    - ``chunks``: the rows read at once (:func:`store.chunk_bytes`): a spilled store's read
      buffer, a float32 copy of float16 rows, and the solver's per-chunk temporaries of one block;
    - ``solve``: the solver's own peak (:func:`solve_bytes`);
    - ``per_validation``: with a per-validation matrix, its copy of every rank's validation
      gradients in the compute dtype and one chunk of query directions (alive with the solvers).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    compute_bytes = 8 if dtype == torch.float64 else 4
    sizes = [r * d for r, d in (stored_shape(b, projection) for b in blocks)]
    numbers, largest = sum(sizes), max(sizes, default=0)
    tuned = method in ("vm", "fvm")
    one_store = train_samples * numbers * itemsize
    spilled = max_memory is not None and one_store > max_memory
    row = max(numbers * itemsize, 1)
    rows = max(1, min(max(train_samples, val_samples), chunk_bytes(max_memory) // row))
    chunk = rows * row
    convert = rows * numbers * compute_bytes if itemsize != compute_bytes else 0
    model_bytes = 0
    if model is not None:
        model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    audited = sum(b.param.numel() * b.param.element_size() for b in blocks)
    return {"val": plan.val_bytes, "store": 0 if spilled else plan.store_bytes, "model": model_bytes,
            "tuning": (4 if method == "fvm" else 3) * audited if tuned else 0,
            "batch": batch_size * (numbers + 2 * largest) * compute_bytes,
            "chunks": (chunk if spilled else 0) + convert + rows * largest * compute_bytes,
            "solve": plan.solve_bytes,
            "per_validation": (val_samples + rows) * numbers * compute_bytes if per_validation else 0}


def check_memory(train_samples: int, val_samples: int, blocks: list[Block], dtype: torch.dtype, method: str,
                 solver: SolverSpec, fisher: str, max_memory: int | None, spill_dir: str | None,
                 projection: int | None, model: nn.Module | None = None, batch_size: int = 32,
                 solver_options: dict[str, Any] | None = None, plan: MemoryPlan | None = None,
                 streamed: bool = False, per_validation: bool = False) -> MemoryPlan:
    """Plan the audit's memory for ``train_samples`` scored and ``val_samples`` validation samples
    over ``blocks``, gradients stored in ``dtype``; raise :class:`PreflightError` (with the
    options that would make it fit) when the peak is past :data:`RAM_SHARE` of the available RAM,
    or a store spilled past ``max_memory`` is past the free disk under ``spill_dir``.
    ``solver_options``: the solver's constructor options (``curvature.solver_options``), which
    may change its form and so its peak (e.g. hyperinf's ``form``). ``plan``: the object to fill in
    (e.g. the pre-flight report, a :class:`MemoryPlan` itself); a new one by default. ``streamed``:
    vm/fvm scored as the training gradients are gathered (:func:`~.scoring.scored_as_gathered`): no
    training store. ``per_validation``: the ``(m, n)`` matrix is also made (its working memory counted)."""
    plan = plan if plan is not None else MemoryPlan()
    itemsize = torch.empty((), dtype=dtype).element_size()
    compute_bytes = 8 if dtype == torch.float64 else 4
    numbers = gradient_numbers(blocks, projection)
    n, m = train_samples, val_samples
    plan.numbers_per_sample = numbers
    plan.streamed = streamed = streamed and method in ("vm", "fvm")
    plan.store_bytes = 0 if streamed else n * numbers * itemsize
    tuned = method in ("vm", "fvm")
    curvature_rows = m if tuned else n
    plan.val_bytes = m * numbers * itemsize * (2 if fisher == "true" and tuned else 1)
    if fisher == "true" and not tuned:
        plan.store_bytes *= 2
    plan.solve_bytes = solve_bytes(blocks, solver, curvature_rows, projection, compute_bytes, solver_options)
    parts = plan.peak_parts = peak_parts(plan, 0 if streamed else n, m, blocks, dtype, method, max_memory, projection,
                                         model, batch_size, per_validation)
    alive = (parts["model"] + parts["tuning"] + parts["batch"],
             parts["chunks"] + parts["solve"] + parts["per_validation"])
    plan.peak_bytes = need = parts["val"] + parts["store"] + (sum(alive) if streamed else max(alive))
    plan.available_bytes = available = available_ram()
    if available is None:
        return plan
    budget = int(available * RAM_SHARE)
    spilled = max_memory is not None and plan.store_bytes > max_memory
    folder = spill_dir or tempfile.gettempdir()
    disk = free_disk(folder)
    if need <= budget and not (spilled and disk is not None and plan.store_bytes > disk):
        return plan
    per_number = n * itemsize
    options = []
    if not spilled and not streamed:
        free = format_bytes(disk) if disk is not None else "?"
        options.append(f"max_memory={budget // 2:_} (bytes): keeps {format_bytes(budget // 2)} in RAM and spills "
                       f"{format_bytes(plan.store_bytes)} to {folder} ({free} free)")
    for k in (64, 16):
        projected = gradient_numbers(blocks, k)
        if projected < numbers:
            options.append(f"projection={k}: {format_bytes(projected * per_number)} ({projected:,} numbers per sample)")
            break
    largest = sorted(blocks, key=lambda b: -b.shape[0] * b.shape[1])[:3]
    options.append(f"params=[...] name patterns for fewer parameters (now {len(blocks)} blocks, {numbers:,} numbers "
                   f"per sample; the largest: {', '.join(b.name for b in largest)}), or LoRA adapters with "
                   "params='lora'")
    if itemsize > 2:
        options.append(f"grad_dtype='float16': {format_bytes(plan.store_bytes * 2 // itemsize)}")
    where = ("the disk" if need <= budget else "RAM")
    raise PreflightError(
        f"the audit would not fit in {where}: the training-gradient store needs {format_bytes(plan.store_bytes)} "
        f"({n:,} samples × {numbers:,} numbers × {itemsize} bytes), the validation store "
        f"{format_bytes(plan.val_bytes)} and the solve about {format_bytes(plan.solve_bytes)}, a peak of about "
        f"{format_bytes(need)} in all, against {format_bytes(available)} of available RAM"
        + (f" and {format_bytes(disk)} free under {folder}" if spilled and disk is not None else "")
        + ". Options: " + "; ".join(options))


def free_disk(folder: str) -> int | None:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent), else ``None``."""
    probe = folder
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or ".").free
    except OSError:
        return None


def format_bytes(nbytes: int | None) -> str:
    """``nbytes`` for a message: ``"512 B"``, ``"1.5 MiB"``, ... (``"?"`` for ``None``)."""
    if nbytes is None:
        return "?"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover
