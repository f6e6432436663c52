"""Score modes: curvature + solve per block, then the scores, streamed over gradient chunks.

Convention: a higher score means more harmful.

- ``standard`` (Koh & Liang): ``s_i = − v̄ᵀ (C_tr + λI)^{-1} g_i`` with ``v̄`` the mean
  validation gradient; curvature from the training gradients.
- ``vm`` / ``fvm`` (Ye et al., 2025): at a validation minimum, ``s_i = g̃_iᵀ (C̃_val + λI)^{-1} g̃_i``;
  curvature from the validation gradients.
- per-validation-point: ``S_ji = − g'_jᵀ (C + λI)^{-1} g_i``, an ``(m, n)`` matrix.

Every score is a sum over blocks (block-diagonal curvature).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .distributed import Collectives, unshard
from .normalize import normalized, scale_columns
from .precision import full_precision
from .solvers import InverseSolver, make_solver
from .solvers._linalg import blas_threads
from .solvers.base import SolverSpec, solver_name
from .solvers.damping import damping_from_mean_square
from .store import GradientStore, chunk_bytes, join_rows, masked_sums

if TYPE_CHECKING:  # pragma: no cover - a hint only (config imports attribution, which imports this module)
    from .config import AuditOptions, CurvatureConfig

Blocks = Mapping[str, Tensor]


def _make(solver: SolverSpec, options: dict[str, Any]) -> Any:
    return make_solver(solver, **options) if isinstance(solver, (str, type)) else make_solver(solver)


def _ours(instance: Any) -> bool:
    """A solver of this package (known not to modify the gradients it is fitted on in place)."""
    return type(instance).__module__.startswith("lightning_influence.")


def fit_solvers(curvature: GradientStore, valid: Tensor, solver: SolverSpec, config: CurvatureConfig,
                device: torch.device, compute_dtype: torch.dtype, chunk: int,
                dist: Collectives = Collectives()) -> dict[str, InverseSolver]:
    """One fitted solver per block. The curvature gradients (``(N, r, d)`` per block, this
    rank's shard, only rows where ``valid``) are streamed in chunks into each solver's
    statistics, combined across ranks (sum or concatenation), then fitted with DataInf's
    damping computed from the global mean of ``g²``. Every rank ends with identical solvers.

    The store is read once, all blocks together (one pass over its chunks, not one per block);
    a solver with no statistics (``identity``) reads nothing. The statistics are combined
    across ranks block by block, in the store's block order, on every rank; then the solvers
    are fitted, equal-shaped blocks of one solver class together (:meth:`InverseSolver.fit_group`)."""
    options = config.solver_options or {}
    names = list(curvature.names)
    instances = {name: _make(solver, options) for name in names}
    if any(callable(getattr(inst, "plan", None)) for inst in instances.values()):
        # each solver chooses its form (and so its statistics) from N, r, d before the store is
        # read (hyperinf: low-rank when N·r <= d); N over every rank, alike on each
        n_plan = int(dist.all_reduce_sum(valid.sum().reshape(1).to(torch.float64))[0])
        for name, inst in instances.items():
            if callable(getattr(inst, "plan", None)):
                inst.plan(n_plan, *curvature.shapes[name])
    streaming = {name: hasattr(inst, "statistics") and hasattr(inst, "fit_statistics")
                 for name, inst in instances.items()}
    reductions = {name: (getattr(inst, "reductions", {"grads": "cat"}) if streaming[name] else {"grads": "cat"})
                  for name, inst in instances.items()}
    relative = config.damping_rule != "absolute"
    reads = {name for name in names
             if reductions[name] or (relative and getattr(instances[name], "needs_damping", True))}
    sums: dict[str, dict[str, Tensor]] = {name: {} for name in names}
    cats: dict[str, dict[str, list]] = {name: {k: [] for k, how in reductions[name].items() if how != "sum"}
                                        for name in names}
    sumsq = {name: torch.zeros((), dtype=torch.float64) for name in names}
    with blas_threads():
        if reads:
            for start, groups in curvature.group_chunks(chunk):
                for shape, group_names in curvature.groups:
                    sel = [i for i, name in enumerate(group_names) if name in reads]
                    if not sel:
                        continue
                    data = groups[shape]
                    mask = valid[start:start + data.shape[1]]
                    if len(sel) < len(group_names):
                        data = data[sel]
                    if not bool(mask.all()):
                        data = data[:, mask]
                    if data.shape[1] == 0:
                        continue
                    data = data.to(device, compute_dtype)
                    flat_rows = data.reshape(data.shape[0], 1, -1)   # Σ g² per block: one batched dot
                    squares = (flat_rows @ flat_rows.transpose(1, 2)).reshape(-1).double().cpu()
                    for j, i in enumerate(sel):
                        name = group_names[i]
                        sumsq[name] += squares[j]
                        g = data[j]
                        if not reductions[name]:
                            continue
                        if not _ours(instances[name]):
                            g = g.clone()  # a user solver gets its own copy, as it always did
                        stats = instances[name].statistics(g) if streaming[name] else {"grads": g}
                        for key, value in stats.items():
                            if reductions[name].get(key) == "sum":
                                acc = sums[name].get(key)
                                sums[name][key] = value.clone() if acc is None else acc.add_(value)
                            else:
                                cats[name][key].append(value)
        count_valid = float(valid.sum())
        fit_args: dict[str, tuple] = {}
        for name in names:  # the collectives: every rank, every block, in the same order
            r, d = curvature.shapes[name]
            instance = instances[name]
            count = dist.all_reduce_sum(torch.tensor([count_valid, float(sumsq[name])], dtype=torch.float64))
            n_total, sumsq_total = int(count[0]), float(count[1])
            combined: dict[str, Tensor] = {}
            for key, how in reductions[name].items():
                if how == "sum":
                    local = sums[name].get(key)
                    if local is None:  # an empty shard still joins the collective with zeros
                        local = torch.zeros_like(instance.statistics(torch.zeros(1, r, d, device=device,
                                                                                 dtype=compute_dtype))[key])
                    combined[key] = dist.all_reduce_sum(local)
                else:
                    parts = cats[name][key]
                    local = (join_rows(parts) if parts  # a view of a RAM store's rows: no copy
                             else torch.zeros(0, r, d, device=device, dtype=compute_dtype))
                    combined[key] = dist.all_gather_cat(local)
                    cats[name][key] = []
            if n_total == 0:
                raise ValueError(f"no valid curvature sample for block {name}")
            fit_args[name] = (combined, n_total, damping_from_mean_square(
                sumsq_total / (n_total * r * d), config.damping, config.damping_rule))
        fitted: dict[str, InverseSolver] = {}
        by_class: dict[type, list] = {}
        for name in names:
            instance = instances[name]
            combined, n_total, lam = fit_args.pop(name)
            if not streaming[name]:
                fitted[name] = instance.fit(combined["grads"], lam)
            elif hasattr(type(instance), "fit_group"):
                by_class.setdefault(type(instance), []).append((name, combined, n_total, lam))
            else:
                fitted[name] = instance.fit_statistics(combined, n_total, lam)
        for cls, items in by_class.items():
            done = cls.fit_group([instances[i[0]] for i in items], [i[1] for i in items],
                                 [i[2] for i in items], [i[3] for i in items])
            for item, solver_ in zip(items, done):
                fitted[item[0]] = solver_
    return {name: fitted[name] for name in names}


def solver_info(solvers: Mapping[str, InverseSolver]) -> dict[str, Any]:
    """The solvers' reports (iterations, residuals), per block and summarised."""
    per_block = {name: dict(getattr(s, "info", {}) or {}) for name, s in solvers.items()}
    iterations = [i["iterations"] for i in per_block.values() if "iterations" in i]
    residuals = [i["residual"] for i in per_block.values() if "residual" in i]
    summary: dict[str, Any] = {"blocks": per_block}
    if iterations:
        summary["max_iterations"] = max(iterations)
    if residuals:
        summary["max_residual"] = max(residuals)
    return summary


def _quadratic_plan(names, solvers: Mapping[str, Any]):
    """Split a group of equal-shaped blocks into runs of one solver class: ``[(cls, [index])]``."""
    plan: dict[Any, list] = {}
    for i, name in enumerate(names):
        s = solvers[name]
        key = type(s) if hasattr(type(s), "quadratic_group") else ("apply", i)
        plan.setdefault(key, []).append(i)
    return list(plan.items())


def self_influence(train: GradientStore, solvers: Mapping[str, InverseSolver], chunk: int,
                   device: torch.device, compute_dtype: torch.dtype) -> Tensor:
    """``vm``/``fvm`` scores ``Σ_l g_lᵀ (C_l + λ_l I)^{-1} g_l`` for every stored sample: ``(n,)``.

    One read of the store; each solver's quadratic form (fused where its inverse allows:
    :meth:`InverseSolver.quadratic_group`), equal-shaped blocks of one solver class together."""
    scores = torch.zeros(len(train), dtype=torch.float64)
    plans = [(shape, names, _quadratic_plan(names, solvers)) for shape, names in train.groups]
    for start, groups in train.group_chunks(chunk):
        total = _quadratic_forms(groups, plans, solvers, device, compute_dtype)
        scores[start:start + total.shape[0]] = total.double().cpu()
    return scores


def _quadratic_forms(groups: Mapping[tuple[int, int], Tensor], plans: list, solvers: Mapping[str, InverseSolver],
                     device: torch.device, compute_dtype: torch.dtype) -> Tensor:
    """``Σ_l g_lᵀ (C_l + λ_l I)^{-1} g_l`` ``(B,)`` of one chunk: ``groups`` ``{(r, d): (blocks, B, r, d)}``,
    ``plans`` ``[((r, d), names, _quadratic_plan(names))]``."""
    total = None
    for shape, names, plan in plans:
        data = groups[shape]
        for key, idx in plan:
            sub = (data if len(idx) == len(names) else data[idx]).to(device, compute_dtype)
            if isinstance(key, tuple):  # a duck-typed solver: apply, then the dot product
                s = solvers[names[idx[0]]]
                part = (sub[0] * s.apply(sub[0])).sum(dim=(1, 2))
            else:
                part = key.quadratic_group([solvers[names[i]] for i in idx], sub).sum(0)
            total = part if total is None else total + part
    return total


def scored_as_gathered(options: AuditOptions) -> bool:
    """Whether :func:`~lightning_influence.audit.audit` scores each training batch as its gradients
    are gathered, keeping no training store: for ``vm``/``fvm``, whose score needs only the sample's
    own gradient and the solvers fitted on the validation curvature, when nothing else reads the
    training gradients afterwards (no ``per_validation`` matrix, no ``attribution``)."""
    return options.method in ("vm", "fvm") and not options.per_validation and options.attribution is None


class ScoresAsGathered:
    """The ``vm``/``fvm`` scores made batch by batch as the training gradients are gathered: no
    training store is needed, since each score takes only the sample's own gradient and the
    solvers fitted on the validation curvature. :meth:`fit` fits them (the ``scorer`` of
    :func:`~lightning_influence.gathering.gather_training`) and returns this object, the sink each
    training batch goes to: ``self(start, {block: (B, r, d)})`` fills ``scores`` ``(n,)`` float64,
    the numbers :func:`self_influence` gives on a store of those gradients in the compute dtype."""

    def __init__(self, n: int, options: AuditOptions, device: torch.device, compute_dtype: torch.dtype,
                 stages: Any, dist: Collectives) -> None:
        if not scored_as_gathered(options):
            raise ValueError("scores_as_gathered: only vm/fvm without per_validation or attribution can be scored "
                             f"as the gradients are gathered (method={options.method!r}, per_validation="
                             f"{options.per_validation}, attribution={'set' if options.attribution else None})")
        self.scores = torch.zeros(n, dtype=torch.float64)
        self.solver, self.curvature, self.stages, self.dist = options.solver, options.curvature, stages, dist
        self.device, self.compute_dtype, self.max_memory = device, compute_dtype, options.max_memory
        self.solvers: dict[str, InverseSolver] = {}
        self.plans: list = []

    def fit(self, curvature: Any) -> "ScoresAsGathered":
        """Fit one solver per block on ``curvature`` (a ``Gathered``: its store and valid flags),
        as :func:`fit_solvers` does in the scoring stage, timed as the ``solve`` stage."""
        store = curvature.store
        with self.stages("solve"), full_precision():
            self.solvers = fit_solvers(store, curvature.valid, self.solver, self.curvature, self.device,
                                       self.compute_dtype, store.chunk_size(chunk_bytes(self.max_memory)), self.dist)
        self.plans = [(shape, names, _quadratic_plan(names, self.solvers)) for shape, names in store.groups]
        return self

    @full_precision()  # the gradient pass may run under the user's autocast: the solves must not
    def __call__(self, start: int, grads: Mapping[str, Tensor]) -> None:
        with blas_threads():
            groups = {shape: torch.stack([grads[name].to(self.device, self.compute_dtype) for name in names])
                      for shape, names, _ in self.plans}
            total = _quadratic_forms(groups, self.plans, self.solvers, self.device, self.compute_dtype)
        self.scores[start:start + total.shape[0]] = total.double().cpu()

    def check(self, options: AuditOptions) -> None:
        """Raise unless ``options`` asks for these scores: the solver and curvature they were made
        with, and nothing that reads the training gradients again (no store was kept)."""
        spec = options.solver  # a name compares by value, a class or an instance by identity
        same_solver = spec is self.solver or (isinstance(spec, str) and spec == self.solver)
        if not same_solver or options.curvature != self.curvature or not scored_as_gathered(options):
            raise ValueError(f"score(): this Prepared was scored as its gradients were gathered, with solver "
                             f"{solver_name(self.solver)!r} and {self.curvature}, and kept no training store; to "
                             "score it otherwise (another solver, per_validation, attribution) prepare() it without "
                             "scores_as_gathered")


def inverse_direction(direction: Blocks, solvers: Mapping[str, InverseSolver], device: torch.device,
                      compute_dtype: torch.dtype) -> dict[str, Tensor]:
    """``(C_l + λ_l I)^{-1} v_l`` for a set of vectors per block, ``(M, r, d)`` each."""
    return {name: solvers[name].apply(v.to(device, compute_dtype)) for name, v in direction.items()}


def score_chunks(train: Any, directions: Blocks, chunk: int, device: torch.device,
                 compute_dtype: torch.dtype, column_scale: Tensor | None = None) -> Iterator[tuple[int, Tensor]]:
    """``(start, S)`` over the training store's chunks: ``S = − Σ_l U_l G_lᵀ``, ``(q, n_c)`` in
    ``compute_dtype``, for the query directions ``U_l = (C_l + λ_l I)^{-1} g'_l`` ``(q, r, d)``
    per block and the chunk's training gradients ``G_l`` ``(n_c, r, d)``. One read of the
    store, all blocks of a shape group together. The single place the per-query score is made.
    ``column_scale`` ``(n_r,)``: each training sample's column multiplied by it (e.g. ``1/‖g_i‖``
    for unit-norm gradients; scale the query gradients before the solve for the query side)."""
    groups = train.groups
    q = next(iter(directions.values())).shape[0]
    us = {shape: [directions[name].to(device, compute_dtype).reshape(q, -1) for name in names]
          for shape, names in groups}
    for start, chunks in train.group_chunks(chunk):
        total = None
        for shape, names in groups:
            data = chunks[shape].to(device, compute_dtype)
            for u, g in zip(us[shape], data):
                g = g.reshape(g.shape[0], -1)
                total = u @ g.T if total is None else total.addmm_(u, g.T)
        if column_scale is not None:
            scale_columns(total, column_scale[start:start + total.shape[1]])
        yield start, total.neg_()


def cross_influence(train: GradientStore, inverse: Blocks, chunk: int, device: torch.device,
                   compute_dtype: torch.dtype) -> Tensor:
    """``− Σ_l ⟨u_l, g_il⟩`` for precomputed ``u = (C + λI)^{-1} v`` of shape ``(M, r, d)`` per
    block: ``(M, n)``. With ``M = 1`` and ``v = v̄`` these are the ``standard`` scores."""
    m = next(iter(inverse.values())).shape[0]
    scores = torch.zeros(m, len(train), dtype=torch.float64)
    for start, total in score_chunks(train, inverse, chunk, device, compute_dtype):
        scores[:, start:start + total.shape[1]] = total.double().cpu()
    return scores


def method_scores(method: str, train: GradientStore, val: GradientStore, val_valid: Tensor, val_count: float,
                  solvers: Mapping[str, InverseSolver], chunk: int, device: torch.device, compute_dtype: torch.dtype,
                  dist: Collectives = Collectives()) -> Tensor:
    """This rank's scores ``(n_local,)`` of its training shard ``train`` under ``method``:
    vm/fvm :func:`self_influence`; ``standard`` ``− v̄ᵀ (C + λI)^{-1} g_i`` with ``v̄`` the mean
    gradient of the ``val_count`` valid validation samples of every rank (``val_valid``: this
    rank's flags for its shard ``val``)."""
    args = (device, compute_dtype)
    if method in ("vm", "fvm"):
        return dist.checkpoint(lambda: self_influence(train, solvers, chunk, *args))
    sums = {name: dist.all_reduce_sum(total) for name, total in masked_sums(val, val_valid, chunk, *args).items()}
    mean_val = {name: total / val_count for name, total in sums.items()}
    return dist.checkpoint(lambda: cross_influence(train, inverse_direction(mean_val, solvers, *args), chunk, *args)[0])


def per_validation_scores(train: GradientStore, val: GradientStore, solvers: Mapping[str, InverseSolver], n: int,
                          m: int, chunk: int, device: torch.device, compute_dtype: torch.dtype,
                          dist: Collectives = Collectives(), normalize: str = "none",
                          train_valid: Tensor | None = None) -> Tensor:
    """The per-validation-point matrix ``S_ji = − g'_jᵀ (C + λI)^{-1} g_i`` ``(m, n)`` over
    every rank's ``m`` validation and ``n`` training samples (``train``/``val``: this rank's
    shards), on every rank: the validation gradients are gathered, each rank scores its
    training shard against all of them, ``chunk`` validation points at a time.
    ``normalize="unit"``: with unit-norm gradients on both sides; ``"centered"``: the query
    gradients centred on the mean training gradient first (over this rank's rows where
    ``train_valid`` ``(n_r,)``, summed over ranks), see :mod:`.normalize`."""
    args = (device, compute_dtype)
    val_all = {name: unshard(dist.all_gather_cat(val.block(name).to(*args)), m, dist.world_size) for name in val.names}
    val_all, train_scale = normalized(normalize, val_all, train, train_valid, chunk, *args, dist)

    def rows(s: int) -> Tensor:
        directions = inverse_direction({k: v[s:s + chunk] for k, v in val_all.items()}, solvers, *args)
        blocks = [block.double().cpu() for _, block in score_chunks(train, directions, chunk, *args,
                                                                     column_scale=train_scale)]
        return torch.cat(blocks, 1) if blocks else torch.zeros(next(iter(directions.values())).shape[0], 0,
                                                               dtype=torch.float64)

    local = dist.checkpoint(lambda: torch.cat([rows(s) for s in range(0, m, chunk)]))
    return unshard(dist.all_gather_cat(local.T.contiguous()), n, dist.world_size).T
