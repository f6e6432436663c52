"""Explain predictions: for each query (a validation or test sample), the training samples behind it.

The per-query score is ``S_ji = − g'_jᵀ (C + λI)^{-1} g_i`` (summed over blocks): negative =
training sample ``i`` helps query ``j`` (lowers its loss), positive = harms it. :func:`score_chunks`
is the one place it is computed, for the dense ``per_validation`` matrix
(:func:`~lightning_influence.scoring.per_validation_scores`) and for :func:`streaming_top_k`, which
keeps, per query, the ``k`` most helpful and most harmful training samples without ever holding
the ``(m, n)`` matrix: training chunks x query chunks, a ``torch.topk`` of each ``(m_c, n_c)``
block merged into a running ``(m_c, k)``; under DDP each rank does its training shard, then one
all-gather of the ``(m_q, k)`` candidates and a last merge.

Which queries (:class:`AttributionConfig`): by default the validation samples the trained model
(θ*) gets wrong: for classification the misclassified ones, highest loss first, else the highest
losses; at most ``max_queries``. Or named ids, every sample, or a separate query set (a test set).
"""
from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_open
from .data import sequential_loader, to_device
from .distributed import Collectives, unshard
from .losses import default_loss
from .metrics import check_k
from .modes import preserved
from .normalize import normalized
from .scoring import inverse_direction, score_chunks
from .store import chunk_bytes

Blocks = Mapping[str, Tensor]
QUERY_RULES = ("auto", "all")


def _is_data(value: Any) -> bool:
    """A Dataset or DataLoader (has ``__getitem__``+``__len__``, or a ``dataset``), not a list of ids."""
    if isinstance(value, (str, list, tuple, Tensor, range)):
        return False
    return hasattr(value, "dataset") or (hasattr(value, "__getitem__") and hasattr(value, "__len__"))


@dataclass
class AttributionConfig:
    """Which predictions to explain, and how many training samples to name for each.

    Attributes:
        queries: ``"auto"`` (default): the samples the trained model θ* gets most wrong: with
            class labels the misclassified ones, highest loss first (the highest-loss ones if
            none is misclassified); without, the highest losses. ``"all"``: every sample.
            A sequence of ids (positions in the query set). A Dataset or DataLoader: shorthand
            for ``data=that, queries="all"``.
        k: training samples named per query and side (most helpful, most harmful).
        max_queries: cap on the number of ``"auto"`` queries (``None``: no cap).
        data: a separate query set (e.g. a test set; a Dataset or a DataLoader over one) instead
            of the validation data. Its per-sample gradients are taken at the scoring weights.
    """

    queries: Any = "auto"
    k: int = 10
    max_queries: int | None = 20
    data: Any = None

    def __post_init__(self) -> None:
        if _is_data(self.queries):
            if self.data is not None:
                raise ValueError("attribution: give the query set as queries= or as data=, not both")
            self.data, self.queries = self.queries, "all"
        if isinstance(self.queries, str):
            if self.queries not in QUERY_RULES:
                raise ValueError(f"attribution.queries must be one of {QUERY_RULES}, a sequence of ids or a "
                                 f"Dataset/DataLoader, got {self.queries!r}")
        else:
            ids = torch.as_tensor(list(self.queries) if not isinstance(self.queries, Tensor) else self.queries)
            if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or bool((ids < 0).any()):
                raise ValueError(f"attribution.queries must be a non-empty sequence of ids >= 0, got {self.queries!r}")
            self.queries = ids.long()
        check_k(self.k, "attribution.k")
        if self.max_queries is not None and (isinstance(self.max_queries, bool) or not isinstance(self.max_queries, int)
                                             or self.max_queries < 1):
            raise ValueError(f"attribution.max_queries must be None or a positive integer, got {self.max_queries!r}")
        if self.data is not None and not _is_data(self.data):
            raise TypeError(f"attribution.data must be a Dataset or a DataLoader, got {type(self.data).__name__}")


def coerce_attribution(value: None | bool | AttributionConfig | Mapping[str, Any]) -> AttributionConfig | None:
    """``None``/``False`` -> no attribution; ``True`` -> the defaults; a dict -> its config."""
    if value is None or value is False:
        return None
    if value is True:
        return AttributionConfig()
    if isinstance(value, AttributionConfig):
        return value
    if isinstance(value, Mapping):
        return AttributionConfig(**value)
    raise TypeError(f"attribution must be None, True, an AttributionConfig or a dict, got {type(value).__name__}")


@dataclass
class Attribution:
    """Per query, the training samples behind its prediction (ids = dataset positions).

    Attributes:
        query_ids: ``(q,)`` the queries' positions in the query set.
        source: ``"validation"`` (the audit's validation data) or ``"queries"`` (a separate set).
        rule: how the queries were chosen, in words.
        helpful_ids, helpful_scores: ``(q, k)`` the most helpful training samples (most negative
            score: they lower the query's loss), most helpful first.
        harmful_ids, harmful_scores: ``(q, k)`` the most harmful (most positive), most harmful first.
        query_losses, query_labels, query_predicted: ``(q,)`` each query's loss, given label and
            predicted label at the trained weights θ* (labels -1 where the loss has none).
    """

    query_ids: Tensor
    source: str
    rule: str
    helpful_ids: Tensor
    helpful_scores: Tensor
    harmful_ids: Tensor
    harmful_scores: Tensor
    query_losses: Tensor | None = None
    query_labels: Tensor | None = None
    query_predicted: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    COLUMNS = ("query", "query_label", "query_predicted", "query_loss", "side", "rank", "train_id", "score")

    def __len__(self) -> int:
        return int(self.query_ids.numel())

    @property
    def k(self) -> int:
        return int(self.helpful_ids.shape[1])

    def query_row(self, j: int) -> dict[str, Any]:
        """Query ``j`` (its index in :attr:`query_ids`): id, label, predicted label, loss."""
        row: dict[str, Any] = {"query": int(self.query_ids[j])}
        for key, values in (("query_label", self.query_labels), ("query_predicted", self.query_predicted)):
            if values is not None and int(values[j]) >= 0:
                row[key] = int(values[j])
        if self.query_losses is not None:
            row["query_loss"] = float(self.query_losses[j])
        return row

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (query, side, rank): the query's columns, ``side`` (``"helpful"`` or
        ``"harmful"``), ``rank`` (1 = strongest), ``train_id`` and ``score``."""
        out: list[dict[str, Any]] = []
        sides = (("helpful", self.helpful_ids.tolist(), self.helpful_scores.tolist()),
                 ("harmful", self.harmful_ids.tolist(), self.harmful_scores.tolist()))
        for j in range(len(self)):
            head = self.query_row(j)
            for side, ids, scores in sides:
                for r, (i, s) in enumerate(zip(ids[j], scores[j])):
                    out.append({**head, "side": side, "rank": r + 1, "train_id": i, "score": s})
        return out

    def save(self, path: str) -> str:
        """Write :meth:`rows` as CSV to ``path`` atomically. Returns ``path``."""
        rows = self.rows()
        columns = [c for c in self.COLUMNS if any(c in r for r in rows)] or list(self.COLUMNS)
        with atomic_open(os.fspath(path), what="the attribution table") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return path


def attribution_path(scores_path: str) -> str:
    """The attribution file beside a scores file: ``scores.csv`` -> ``scores_attribution.csv``."""
    stem, _ = os.path.splitext(os.fspath(scores_path))
    return stem + "_attribution.csv"


# ---------------------------------------------------------------------- choosing the queries


def select_queries(config: AttributionConfig, losses: Tensor, labels: Tensor, predicted: Tensor,
                   valid: Tensor) -> tuple[Tensor, str]:
    """The query ids ``(q,)`` and the rule in words, from every candidate's loss ``(m,)``, label
    and predicted label at θ* (``-1``: no class label) and validity flag (finite loss and
    gradient; invalid samples are never chosen by ``"auto"``/``"all"``)."""
    m = int(losses.numel())
    if isinstance(config.queries, Tensor):
        bad = config.queries[config.queries >= m]
        if bad.numel():
            raise ValueError(f"attribution.queries: ids {bad.tolist()[:10]} out of range for {m} query samples")
        return config.queries.clone(), f"{config.queries.numel()} named sample(s)"
    ids = valid.nonzero().squeeze(1)
    if config.queries == "all":
        return ids, f"all {ids.numel()} sample(s)"
    ids = ids[torch.argsort(losses[ids], descending=True, stable=True)]  # highest loss at θ* first
    classified = bool((labels[ids] >= 0).all()) and ids.numel() > 0
    wrong = ids[predicted[ids] != labels[ids]] if classified else ids[:0]
    if wrong.numel():
        ids, rule = wrong, f"misclassified at θ* ({wrong.numel()} of {m}), highest loss first"
    else:
        rule = ("highest loss at θ* (none misclassified)" if classified else "highest loss at θ*")
    if config.max_queries is not None and ids.numel() > config.max_queries:
        ids, rule = ids[:config.max_queries], rule + f", first {config.max_queries}"
    return ids, rule


def gather_rows(block: Tensor, ids: Tensor, m: int, dist: Collectives) -> Tensor:
    """Rows ``ids`` ``(q,)`` (global positions of ``m`` samples sharded by
    :func:`~lightning_influence.distributed.shard_ids`) of a per-rank sharded ``block``
    ``(m_r, ...)``, on every rank, in the order of ``ids``."""
    w = dist.world_size
    mine = ids % w == dist.rank
    parts = dist.all_gather_cat(block[ids[mine] // w])
    order = torch.cat([(ids % w == r).nonzero().squeeze(1) for r in range(w)])
    out = torch.empty_like(parts)
    out[order.to(parts.device)] = parts
    return out


# ---------------------------------------------------------------------- the per-query scores


def _merge(values: Tensor, ids: Tensor, new_values: Tensor, new_ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest of two candidate sets ``(q, a)`` and ``(q, b)``, largest first."""
    values, ids = torch.cat([values, new_values], 1), torch.cat([ids, new_ids], 1)
    top, where = torch.topk(values, min(k, values.shape[1]), dim=1)
    return top, torch.gather(ids, 1, where)


def local_top_k(train: Any, directions: Blocks, train_ids: Tensor, train_valid: Tensor, k: int, chunk: int,
                device: torch.device, compute_dtype: torch.dtype,
                column_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """This rank's candidates: per query, the ``k`` largest and the ``k`` smallest ``S_ji`` over
    its training shard, without the ``(q, n_r)`` matrix: a ``torch.topk`` of each chunk's
    ``(q, n_c)`` block merged into the running ``(q, ≤k)``.

    Args:
        train: this rank's training store (``n_r`` rows; :func:`score_chunks` reads it).
        directions: ``(q, r, d)`` per block, ``(C + λI)^{-1} g'_j`` for every query.
        train_ids: ``(n_r,)`` the global ids of this rank's rows.
        train_valid: ``(n_r,)`` validity flags (invalid samples score ``-inf`` on both sides:
            never named while ``k`` valid ones exist).
        k: per side; ``chunk``: training rows per chunk; ``column_scale``: see :func:`score_chunks`.

    Returns ``(harm_values, harm_ids, neg_help_values, help_ids)``, ``(q, ≤k)`` each, on
    ``device``: the largest scores and the largest negated scores, strongest first."""
    q = next(iter(directions.values())).shape[0]
    dev_ids = train_ids.to(device)
    blocked = (~train_valid).to(device)
    empty_v = torch.empty(q, 0, device=device, dtype=compute_dtype)
    empty_i = torch.empty(q, 0, device=device, dtype=torch.long)
    hv, hi, lv, li = empty_v, empty_i, empty_v, empty_i
    for start, scores in score_chunks(train, directions, chunk, device, compute_dtype, column_scale):
        width = scores.shape[1]
        cols = dev_ids[start:start + width].expand(q, -1)
        mask = blocked[start:start + width]
        kk = min(k, width)
        top, where = torch.topk(scores.masked_fill(mask, float("-inf")), kk, dim=1)
        hv, hi = _merge(hv, hi, top, torch.gather(cols, 1, where), k)
        low, where = torch.topk(scores.neg_().masked_fill_(mask, float("-inf")), kk, dim=1)
        lv, li = _merge(lv, li, low, torch.gather(cols, 1, where), k)
    return hv, hi, lv, li


def merge_ranks(values: Tensor, ids: Tensor, k: int, dist: Collectives) -> tuple[Tensor, Tensor]:
    """Every rank's ``(q, k_r)`` candidates gathered (along dim 0 as ``(k_r, q)``) and merged:
    the ``k`` largest ``(q, k)``, float64 on the CPU, identical on every rank."""
    all_v = dist.all_gather_cat(values.double().T.contiguous()).T
    all_i = dist.all_gather_cat(ids.T.contiguous()).T
    top, where = torch.topk(all_v, min(k, all_v.shape[1]), dim=1)
    return top.cpu(), torch.gather(all_i, 1, where).cpu()


def query_chunk_size(directions_bytes_per_query: int, max_memory: int | None) -> int:
    """Queries per pass over the training store: their directions ``(m_c, P)`` fit the budget
    of one chunk of stored rows (:func:`~lightning_influence.store.chunk_bytes`: an eighth of
    ``max_memory``, or 256 MiB without one)."""
    return max(1, chunk_bytes(max_memory) // max(directions_bytes_per_query, 1))


def streaming_top_k(train: Any, query_blocks: Blocks, solvers: Mapping[str, Any], train_ids: Tensor,
                    train_valid: Tensor, k: int, chunk: int, device: torch.device, compute_dtype: torch.dtype,
                    dist: Collectives = Collectives(), query_chunk: int | None = None,
                    max_memory: int | None = None,
                    column_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per query, the ``k`` most harmful (largest ``S_ji``) and most helpful (smallest) training
    samples over every rank's shard, never forming the ``(q, n)`` matrix.

    Args:
        train, train_ids, train_valid, chunk: this rank's training store, its rows' global ids
            ``(n_r,)`` and validity flags ``(n_r,)``, training rows per chunk (see :func:`local_top_k`).
        query_blocks: the query gradients ``g'``, ``(q, r, d)`` per block, the same on every rank.
        solvers: the fitted per-block solvers; ``(C + λI)^{-1} g'`` are the query directions.
        k: per side, capped at the number of valid training samples over all ranks.
        query_chunk: queries per pass over the store (default: :func:`query_chunk_size`,
            usually all of them: one pass).

    Returns ``(harmful_scores, harmful_ids, helpful_scores, helpful_ids)``, ``(q, k)`` each,
    float64 scores, the strongest first, identical on every rank. Every rank takes part in every
    collective: one all-reduce (the count of valid samples), then the local work (agreed on by a
    checkpoint), then one all-gather per side."""
    k = min(k, int(dist.all_reduce_sum(train_valid.sum().double().reshape(1)).item()))
    q = next(iter(query_blocks.values())).shape[0]
    if query_chunk is None:
        itemsize = torch.tensor([], dtype=compute_dtype).element_size()
        query_chunk = query_chunk_size(sum(v[0].numel() for v in query_blocks.values()) * itemsize, max_memory)

    def local() -> list[Tensor]:
        parts = []
        for s in range(0, q, max(1, int(query_chunk))):
            directions = inverse_direction({n: v[s:s + query_chunk] for n, v in query_blocks.items()}, solvers,
                                           device, compute_dtype)
            parts.append(local_top_k(train, directions, train_ids, train_valid, k, chunk, device, compute_dtype,
                                     column_scale))
        return [torch.cat(t) for t in zip(*parts)]

    hv, hi, lv, li = dist.checkpoint(local)
    harm_scores, harm_ids = merge_ranks(hv, hi, k, dist)
    low_scores, help_ids = merge_ranks(lv, li, k, dist)
    return harm_scores, harm_ids, -low_scores, help_ids


# ---------------------------------------------------------------------- the audit's stage


def query_outcomes(model: Any, data: Any, batch_size: int, device: torch.device, loss_fn: Any,
                   indices: Tensor, name: str = "val_data") -> tuple[Tensor, Tensor, Tensor]:
    """Each sample's loss ``(k,)`` (float64), given label and predicted label (``-1`` where the
    loss has no class labels) under ``model`` in eval mode, for the ``indices`` of ``data``: what
    the trained model θ* makes of the candidate queries (vm/fvm score at θ̃, so this is a
    separate forward pass before tuning)."""
    losses, labels, predicted = [], [], []
    with preserved(model, params=(), training=False), torch.no_grad():
        for batch in sequential_loader(data, batch_size, indices.tolist(), name=name):
            out = default_loss(model, to_device(batch, device), loss_fn)
            size = out.losses.shape[0]
            losses.append(out.losses.detach().double().cpu())
            if out.logits is not None and out.labels is not None:
                labels.append(out.labels.long().cpu())
                predicted.append(out.logits.argmax(-1).cpu())
            else:
                labels.append(torch.full((size,), -1, dtype=torch.long))
                predicted.append(torch.full((size,), -1, dtype=torch.long))
    if not losses:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.zeros(0, dtype=torch.float64), empty, empty.clone()
    return torch.cat(losses), torch.cat(labels), torch.cat(predicted)


def explain(config: AttributionConfig, train: Any, train_ids: Tensor, train_valid: Tensor, source: Any, m: int,
            outcomes: tuple[Tensor, Tensor, Tensor], solvers: Mapping[str, Any], chunk: int, device: torch.device,
            compute_dtype: torch.dtype, dist: Collectives = Collectives(), from_queries: bool = False,
            max_memory: int | None = None, normalize: str = "none") -> Attribution:
    """The audit's attribution stage, on every rank.

    Args:
        config: which queries, how many training samples per side.
        train, train_ids, train_valid: this rank's training store and its rows' global ids and
            validity flags ``(n_r,)``.
        source: this rank's shard of the query candidates (a ``Gathered``: ``store``, ``valid``),
            ``m`` candidates in all, sharded by :func:`~lightning_influence.distributed.shard_ids`.
        outcomes: this rank's candidates' ``(losses, labels, predicted)`` at θ* ``(m_r,)`` each.
        from_queries: the candidates are a separate query set (else the validation data).
        normalize: the gradient normalisation of the scores (:func:`normalize.normalized`), the
            same as the ``per_validation`` matrix's, so the top-k are that matrix's top-k."""
    def full(values: Tensor) -> Tensor:
        return unshard(dist.all_gather_cat(values), m, dist.world_size)

    losses, labels, predicted = (full(t) for t in outcomes)
    valid = full(source.valid)
    ids, rule = select_queries(config, losses, labels, predicted, valid)
    if ids.numel() == 0:
        raise ValueError("attribution: no query to explain (every candidate has a non-finite loss or gradient)")
    blocks = {name: gather_rows(source.store.block(name), ids, m, dist) for name in source.store.names}
    blocks, column_scale = normalized(normalize, blocks, train, train_valid, chunk, device, compute_dtype, dist)
    harm_s, harm_i, help_s, help_i = streaming_top_k(train, blocks, solvers, train_ids, train_valid, config.k, chunk,
                                                     device, compute_dtype, dist, max_memory=max_memory,
                                                     column_scale=column_scale)
    bad = ~valid[ids]  # named queries whose own gradient is not finite: nothing to say about them
    for values, names in ((harm_s, harm_i), (help_s, help_i)):
        values[bad] = float("nan")
        names[bad] = -1
    has_labels = bool((labels[ids] >= 0).any())
    return Attribution(query_ids=ids, source="queries" if from_queries else "validation", rule=rule,
                       helpful_ids=help_i, helpful_scores=help_s, harmful_ids=harm_i, harmful_scores=harm_s,
                       query_losses=losses[ids], query_labels=labels[ids] if has_labels else None,
                       query_predicted=predicted[ids] if has_labels else None)


__all__ = ["AttributionConfig", "Attribution", "attribution_path", "coerce_attribution", "select_queries",
           "local_top_k", "merge_ranks", "streaming_top_k", "gather_rows", "query_outcomes", "explain"]
