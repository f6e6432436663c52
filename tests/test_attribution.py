"""Attribution: per query, the top-k most helpful and most harmful training samples, streamed.

Checked against a dense reference computed independently (explicit block inverses, the
``per_validation`` matrix, the model's own predictions), on one process and two thread ranks,
and read back from the loggers."""
from __future__ import annotations

import csv
import os
import threading

import pytest
import torch
from torch import nn

from helpers import gaussian_blobs, mlp, run_gloo_ranks
from lightning_influence import Attribution, AttributionConfig, audit
from lightning_influence.attribution import gather_rows, select_queries, streaming_top_k
from lightning_influence.distributed import Collectives, shard_ids
from lightning_influence.store import GradientStore

SHAPES = {"a": (3, 4), "b": (3, 4), "c": (2, 5)}  # two blocks of one shape group, one of another


class DenseSolver:
    """``apply(v) = v A^{-1}`` on flattened blocks, for a given SPD ``A`` ``(P, P)``."""

    def __init__(self, a: torch.Tensor) -> None:
        self.inverse = torch.linalg.inv(a)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return (v.reshape(v.shape[0], -1) @ self.inverse.to(v.dtype)).reshape(v.shape)


def synthetic(n: int = 157, q: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    train = {k: torch.randn(n, *s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    queries = {k: torch.randn(q, *s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    solvers = {}
    for k, (r, d) in SHAPES.items():
        m = torch.randn(r * d, r * d, generator=g, dtype=torch.float64)
        solvers[k] = DenseSolver(m @ m.T + r * d * torch.eye(r * d, dtype=torch.float64))
    valid = torch.ones(n, dtype=torch.bool)
    valid[torch.randperm(n, generator=g)[:11]] = False
    # the reference: S = − Σ_l G'_l A_l^{-1} G_lᵀ, dense, by explicit solves
    dense = -sum(torch.linalg.solve(solvers[k].inverse.inverse(), queries[k].reshape(q, -1).T).T
                 @ train[k].reshape(n, -1).T for k in SHAPES)
    return train, queries, solvers, valid, dense


def store_of(blocks, rows, **kw) -> GradientStore:
    store = GradientStore(int(rows.numel()), SHAPES, torch.float64, **kw)
    store.write(0, {k: v[rows] for k, v in blocks.items()})
    return store


def dense_top_k(dense: torch.Tensor, valid: torch.Tensor, k: int):
    harm = torch.topk(dense.masked_fill(~valid, float("-inf")), k, dim=1)
    help_ = torch.topk((-dense).masked_fill(~valid, float("-inf")), k, dim=1)
    return harm.values, harm.indices, -help_.values, help_.indices


@pytest.mark.parametrize("spilled", [False, True])
def test_streaming_top_k_equals_the_dense_matrix_top_k(spilled, tmp_path):
    train, queries, solvers, valid, dense = synthetic()
    n, k = dense.shape[1], 6
    ids = torch.arange(n)
    kw = dict(max_memory=0, spill_dir=str(tmp_path)) if spilled else {}
    with store_of(train, ids, **kw) as store:
        # 10-row training chunks and 4-query passes: 16 chunk merges per query, 3 passes
        got = streaming_top_k(store, queries, solvers, ids, valid, k, 10, torch.device("cpu"), torch.float64,
                              query_chunk=4)
    want = dense_top_k(dense, valid, k)
    for g, w in zip(got, want):
        if g.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
        else:
            assert torch.equal(g, w)
    assert not bool((~valid[got[1]]).any()) and not bool((~valid[got[3]]).any())  # excluded never named
    assert bool((got[0] > 0).all()) and bool((got[2] < 0).all())


class ThreadCollectives(Collectives):
    """Two ranks as two threads: all-gather and all-reduce through a barrier."""

    def __init__(self, rank: int, slots: list, barrier: threading.Barrier) -> None:
        self.rank, self.world_size, self.slots, self.barrier = rank, 2, slots, barrier

    def _exchange(self, tensor):
        self.slots[self.rank] = tensor
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()
        return parts

    def all_reduce_sum(self, tensor):
        a, b = self._exchange(tensor)
        return a + b

    def all_gather_cat(self, tensor):
        return torch.cat(self._exchange(tensor))

    def any(self, flag):
        return any(self._exchange(flag))


def test_two_ranks_merge_their_shards_candidates_into_the_dense_top_k():
    train, queries, solvers, valid, dense = synthetic(n=83, q=5, seed=1)
    n, k = dense.shape[1], 4
    slots, barrier, out, errors = [None, None], threading.Barrier(2), [None, None], []
    wanted = torch.tensor([4, 0, 3])  # gather_rows: rows of a sharded block, in the order asked

    def rank(r):
        try:
            dist = ThreadCollectives(r, slots, barrier)
            ids = shard_ids(n, r, 2)
            with store_of(train, ids) as store:
                top = streaming_top_k(store, queries, solvers, ids, valid[ids], k, 7, torch.device("cpu"),
                                      torch.float64, dist)
            q_shard = queries["a"][shard_ids(5, r, 2)]
            out[r] = (top, gather_rows(q_shard, wanted, 5, dist))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors, errors
    want = dense_top_k(dense, valid, k)
    for r in (0, 1):
        top, rows = out[r]
        for g, w in zip(top, want):
            assert torch.equal(g, w) if not g.is_floating_point() else torch.allclose(g, w, rtol=1e-10, atol=1e-10)
        assert torch.equal(rows, queries["a"][wanted])


def test_query_rule():
    losses = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2, 0])
    predicted = torch.tensor([0, 0, 1, 1, 1])  # wrong: 1, 3, 4
    valid = torch.tensor([True, True, True, True, False])
    ids, rule = select_queries(AttributionConfig(), losses, labels, predicted, valid)
    assert ids.tolist() == [3, 1] and rule.startswith("misclassified")  # 4 is invalid
    ids, _ = select_queries(AttributionConfig(max_queries=1), losses, labels, predicted, valid)
    assert ids.tolist() == [3]
    ids, rule = select_queries(AttributionConfig(), losses, labels, labels, valid)  # none wrong
    assert ids.tolist() == [3, 1, 2, 0] and "none misclassified" in rule
    ids, _ = select_queries(AttributionConfig(), losses, -torch.ones(5, dtype=torch.long), labels, valid)  # an LM
    assert ids.tolist() == [3, 1, 2, 0]
    ids, _ = select_queries(AttributionConfig(queries=[4, 0]), losses, labels, predicted, valid)
    assert ids.tolist() == [4, 0]
    with pytest.raises(ValueError, match="out of range"):
        select_queries(AttributionConfig(queries=[7]), losses, labels, predicted, valid)
    for bad in (dict(k=0), dict(queries="worst"), dict(queries=[-1]), dict(max_queries=0)):
        with pytest.raises(ValueError):
            AttributionConfig(**bad)


OPTIONS = dict(batch_size=16, solver="datainf", preflight=False)


def test_audit_attribution_is_the_per_validation_top_k_and_explains_the_misclassified():
    train, val = gaussian_blobs(70, 24, 8, seed=3)
    model = mlp()
    result = audit(model, train, val, per_validation=True, attribution=AttributionConfig(k=5, max_queries=None),
                   tuning={"steps": 6}, **OPTIONS)
    a = result.attribution
    # the default queries: the validation samples the given (trained) model gets wrong, highest loss first
    with torch.no_grad():
        logits = model(val.x)
        losses = nn.functional.cross_entropy(logits, val.y, reduction="none").double()
    wrong = (logits.argmax(-1) != val.y).nonzero().squeeze(1)
    assert wrong.numel() >= 2
    assert a.query_ids.tolist() == wrong[torch.argsort(losses[wrong], descending=True)].tolist()
    torch.testing.assert_close(a.query_losses, losses[a.query_ids])
    assert a.query_predicted.tolist() == logits.argmax(-1)[a.query_ids].tolist()
    # the streamed top-k equals the dense matrix's rows
    rows = result.per_validation[a.query_ids]
    harm, help_ = torch.topk(rows, 5, dim=1), torch.topk(-rows, 5, dim=1)
    assert torch.equal(a.harmful_ids, harm.indices) and torch.equal(a.helpful_ids, help_.indices)
    torch.testing.assert_close(a.harmful_scores, harm.values)
    torch.testing.assert_close(a.helpful_scores, -help_.values)


def test_a_separate_query_set_is_scored_like_per_validation_on_it(tmp_path):
    train, val = gaussian_blobs(60, 20, 8, seed=4)
    _, test = gaussian_blobs(10, 15, 8, seed=5)
    model = mlp()
    # standard: the curvature comes from the training gradients, so the test set as validation data is the reference
    got = audit(model, train, val, method="standard", attribution=AttributionConfig(queries=test, k=4), **OPTIONS)
    ref = audit(model, train, test, method="standard", per_validation=True, **OPTIONS).per_validation
    a = got.attribution
    assert a.source == "queries" and a.query_ids.tolist() == list(range(15))
    assert torch.equal(a.harmful_ids, torch.topk(ref, 4, dim=1).indices)
    torch.testing.assert_close(a.helpful_scores, -torch.topk(-ref, 4, dim=1).values)
    # save() writes the table beside the scores file
    path = got.save(str(tmp_path / "scores.csv"))
    with open(os.path.join(os.path.dirname(path), "scores_attribution.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15 * 2 * 4
    first = [r for r in rows if r["query"] == "7" and r["side"] == "helpful"]
    assert [int(r["train_id"]) for r in first] == a.helpful_ids[7].tolist()
    assert float(first[0]["score"]) == pytest.approx(float(a.helpful_scores[7, 0]))


# --------------------------------------------------------------------------- reporting


def result_with_attribution():
    from test_reporting import make_result

    result = make_result()
    g = torch.Generator().manual_seed(1)
    q, k = 3, 4
    ids = torch.stack([torch.randperm(30, generator=g)[:2 * k] for _ in range(q)])
    harm = torch.sort(torch.rand(q, k, generator=g, dtype=torch.float64), 1, descending=True).values
    result.attribution = Attribution(
        query_ids=torch.tensor([5, 1, 9]), source="validation", rule="misclassified at θ*",
        helpful_ids=ids[:, :k], helpful_scores=-harm, harmful_ids=ids[:, k:], harmful_scores=harm,
        query_losses=torch.tensor([2.0, 1.5, 1.0], dtype=torch.float64),
        query_labels=torch.tensor([0, 1, 2]), query_predicted=torch.tensor([1, 2, 0]))
    return result


def test_tensorboard_and_csv_read_back_the_per_query_tables(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator as ea

    from lightning_influence.reporting import report, summary_text

    result = result_with_attribution()
    a = result.attribution
    tb, csv_logger = TensorBoardLogger(save_dir=str(tmp_path)), CSVLogger(save_dir=str(tmp_path / "csv"))
    report(result, [tb, csv_logger], top_k=5, describe=lambda i: f"train sentence {i}",
           describe_query=lambda j: f"val sentence {j}", step=2)
    tb.finalize("success")
    acc = ea.EventAccumulator(tb.log_dir, size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    tags = set(acc.PluginTagToContent("text"))
    assert {f"influence/attribution/query_{q}/text_summary" for q in (5, 1, 9)} <= tags
    text = acc.Tensors("influence/attribution/query_1/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "query 1: given 1, predicted 2" in text and '"val sentence 1"' in text
    lines = [line for line in text.splitlines() if line.startswith("| helpful") or line.startswith("| harmful")]
    assert len(lines) == 8
    assert lines[0].split(" | ")[2] == str(int(a.helpful_ids[1, 0]))  # side | rank | train_id
    assert f"train sentence {int(a.harmful_ids[1, 0])}" in lines[4]
    with open(os.path.join(csv_logger.log_dir, "influence_attribution.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 2 * 4
    harmful_9 = [r for r in rows if r["query"] == "9" and r["side"] == "harmful"]
    assert [int(r["train_id"]) for r in harmful_9] == a.harmful_ids[2].tolist()
    assert [float(r["score"]) for r in harmful_9] == pytest.approx(a.harmful_scores[2].tolist())
    assert harmful_9[0]["label"] == str(int(result.labels[a.harmful_ids[2, 0]]))
    assert harmful_9[0]["noisy"] == str(bool(result.noisy[a.harmful_ids[2, 0]]))
    assert harmful_9[0]["query_text"] == "val sentence 9"
    assert "query 5: given 0, predicted 1" in summary_text(result)


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_image_run_logs_a_gallery_row_per_query(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator as ea

    from test_reporting import _fit_images

    tb, csv_logger = TensorBoardLogger(save_dir=str(tmp_path)), CSVLogger(save_dir=str(tmp_path / "csv"))
    cb, _ = _fit_images(tmp_path, [tb, csv_logger], attribution={"k": 3, "max_queries": 4}, solver="datainf")
    a = cb.result.attribution
    assert a is not None and 1 <= len(a) <= 4 and a.k == 3
    acc = ea.EventAccumulator(tb.log_dir, size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    (event,) = acc.Images("influence/attribution_gallery")
    picture = Image.open(__import__("io").BytesIO(event.encoded_image_string))
    assert picture.size == (event.width, event.height)
    assert event.width > 7 * 100 and event.height > 150 * len(a)  # 1 + 2 x 3 columns, a row per query
    saved = Image.open(os.path.join(csv_logger.log_dir, "influence_attribution_gallery.png"))
    assert saved.size == picture.size
    beside = os.path.join(os.path.dirname(cb.scores_path), "influence_scores_attribution.csv")
    with open(beside, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(a) * 2 * 3


def _gloo_rank(rank: int, world: int, port: int, queue) -> None:
    """One of two gloo processes: the audit's attribution over its shards (odd sizes: unequal shards)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train, val = gaussian_blobs(37, 13, 6)
        result = audit(mlp(d_in=6), train, val, method="standard", attribution={"queries": "all", "k": 3}, **OPTIONS)
        a = result.attribution
        queue.put((rank, *(t.tolist() for t in (a.query_ids, a.harmful_ids, a.harmful_scores, a.helpful_ids,
                                                 a.helpful_scores))))  # lists: no shared memory past exit
    except Exception as err:  # noqa: BLE001 - reported to the test
        queue.put((rank, repr(err)))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_one_process_attribution():
    outcome = run_gloo_ranks(_gloo_rank, timeout=240)
    train, val = gaussian_blobs(37, 13, 6)
    single = audit(mlp(d_in=6), train, val, method="standard", attribution={"queries": "all", "k": 3}, **OPTIONS)
    a = single.attribution
    for rank in (0, 1):
        got = outcome[rank]
        assert len(got) == 5, got
        got = [torch.tensor(g, dtype=torch.float64 if i in (2, 4) else torch.long) for i, g in enumerate(got)]
        assert torch.equal(got[0], a.query_ids) and torch.equal(got[1], a.harmful_ids)
        assert torch.equal(got[3], a.helpful_ids)
        torch.testing.assert_close(got[2], a.harmful_scores)
        torch.testing.assert_close(got[4], a.helpful_scores)


def test_a_column_scale_is_applied_to_every_training_column():
    """``column_scale`` (e.g. unit-norm training gradients): the dense matrix with scaled columns."""
    train, queries, solvers, valid, dense = synthetic(n=61, q=4, seed=2)
    n = dense.shape[1]
    scale = 1.0 / torch.cat([v.reshape(n, -1) for v in train.values()], 1).norm(dim=1)
    ids = torch.arange(n)
    with store_of(train, ids) as store:
        got = streaming_top_k(store, queries, solvers, ids, valid, 5, 8, torch.device("cpu"), torch.float64,
                              column_scale=scale)
    want = dense_top_k(dense * scale, valid, 5)
    assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[0], want[0]) and torch.testing.assert_close(got[2], want[2])


@pytest.mark.parametrize("normalize", ["centered", "unit"])
def test_attribution_top_k_follows_the_normalised_per_validation_matrix(normalize):
    """Under the attribution defaults (per_validation with no method/solver: standard, kronecker,
    centred unit gradients) or unit norms, the streamed top-k is the normalised matrix's top-k."""
    train, val = gaussian_blobs(70, 24, 8, seed=3)
    model = mlp()
    options = dict(batch_size=16, preflight=False)
    if normalize == "unit":
        options.update(method="standard", solver="datainf", normalize="unit")
    result = audit(model, train, val, per_validation=True, attribution=AttributionConfig(k=5, queries="all"),
                   **options)
    assert result.config["normalize"] == normalize
    a = result.attribution
    rows = result.per_validation[a.query_ids]
    harm, help_ = torch.topk(rows, 5, dim=1), torch.topk(-rows, 5, dim=1)
    assert torch.equal(a.harmful_ids, harm.indices) and torch.equal(a.helpful_ids, help_.indices)
    torch.testing.assert_close(a.harmful_scores, harm.values)
    torch.testing.assert_close(a.helpful_scores, -help_.values)
