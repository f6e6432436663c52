"""Reporting to real Lightning loggers, each checked by reading back what was written with the
logging package's own reader."""
from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import time

import pytest
import torch

from lightning_influence.metrics import detection_metrics, ranking, score_summary
from lightning_influence.reporting import (
    ADAPTERS, detection_curve_figure, logger_kind, markdown_table, report, summary_text, top_k_rows,
    write_scores_file,
)
from lightning_influence.result import AuditResult

N, K = 30, 7


def make_result(noisy: bool = True) -> AuditResult:
    g = torch.Generator().manual_seed(0)
    flags = torch.zeros(N, dtype=torch.bool)
    flags[torch.randperm(N, generator=g)[:6]] = True
    scores = torch.randn(N, generator=g, dtype=torch.float64) + 2.0 * flags
    labels = torch.randint(0, 3, (N,), generator=g)
    predicted = torch.where(flags, (labels + 1) % 3, labels)
    metrics = score_summary(scores)
    if noisy:
        metrics.update(detection_metrics(scores, flags, k=K))
    return AuditResult(
        scores=scores, ranking=ranking(scores), metrics=metrics, method="fvm", solver="hyperinf",
        loss_trained=torch.rand(N, generator=g, dtype=torch.float64),
        loss_tuned=torch.rand(N, generator=g, dtype=torch.float64),
        labels=labels, predicted=predicted, noisy=flags if noisy else None,
        stage_seconds={"tune": 0.5, "gradients": 0.25, "solve": 0.125, "metrics": 0.01},
    )


@pytest.fixture
def result() -> AuditResult:
    return make_result()


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- tables, summary


def test_top_k_rows_and_tables(result):
    rows = top_k_rows(result, K, describe=lambda i: f"sample | #{i}")
    assert [r["id"] for r in rows] == result.ranking[:K].tolist()
    assert [r["rank"] for r in rows] == list(range(1, K + 1))
    assert list(rows[0]) == ["rank", "id", "score", "loss_trained", "loss_tuned", "label", "suggested_label",
                             "noisy", "text"]
    assert rows[0]["text"] == f"sample | #{rows[0]['id']}"
    table = markdown_table(rows).splitlines()
    assert len(table) == K + 2 and table[0].startswith("| rank | id | score")
    assert "sample \\| #" in table[2]  # pipes escaped, the table keeps its columns


def test_describe_failure_warns_not_raises(result):
    with pytest.warns(UserWarning, match="describe"):
        rows = top_k_rows(result, 3, describe=lambda i: 1 / 0)
    assert [r["text"] for r in rows] == ["", "", ""]


def test_summary_text(result):
    text = summary_text(result)
    assert "method=fvm" in text and "solver=hyperinf" in text and "30 training samples" in text
    assert "auroc=" in text and "tune 0.50s" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Top 10"))
    ids = [int(line.split()[1]) for line in lines[start + 2:start + 12]]
    assert ids == result.ranking[:10].tolist()


def test_write_scores_file(result, tmp_path):
    path = write_scores_file(result, str(tmp_path / "sub"))
    rows = read_csv(path)
    assert path.endswith("influence_scores.csv") and len(rows) == N
    assert [int(r["id"]) for r in rows] == result.ranking.tolist()
    assert {"id", "score", "rank", "loss_trained", "loss_tuned", "label", "suggested_label", "noisy"} <= set(rows[0])
    assert not [f for f in os.listdir(tmp_path / "sub") if f.startswith(".tmp-")]


def test_detection_curve_figure(result):
    from matplotlib.figure import Figure

    assert isinstance(detection_curve_figure(result), Figure)
    with pytest.raises(ValueError, match="noisy"):
        detection_curve_figure(make_result(noisy=False))


# --------------------------------------------------------------------------- real loggers


def test_tensorboard_read_back(result, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator as ea

    logger = TensorBoardLogger(save_dir=str(tmp_path))
    assert logger_kind(logger) == "tensorboard"
    report(result, [logger], top_k=K, describe=lambda i: f"sentence {i}", step=3)
    logger.finalize("success")

    acc = ea.EventAccumulator(logger.log_dir, size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    auroc = acc.Scalars("influence/auroc")
    assert auroc[0].step == 3 and auroc[0].value == pytest.approx(result.metrics["auroc"])
    assert "influence/time/solve" in acc.Tags()["scalars"]
    assert "influence/precision@k" in acc.Tags()["scalars"]
    hist = acc.Histograms("influence/scores")
    assert hist[0].histogram_value.num == N
    (text_tag,) = acc.PluginTagToContent("text")
    assert text_tag.startswith("influence/top_k")
    table = acc.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert f"sentence {result.ranking[0].item()}" in table and len(table.splitlines()) == K + 2
    assert "influence/pr_curve" in acc.PluginTagToContent("pr_curves")
    assert "influence/detection_curve" in acc.Tags()["images"]


def test_csv_logger_read_back(result, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(tmp_path))
    report(result, [logger], top_k=K)
    metrics = read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    assert float(metrics[-1]["influence/auroc"]) == pytest.approx(result.metrics["auroc"])
    assert float(metrics[-1]["influence/time/tune"]) == 0.5
    top = read_csv(os.path.join(logger.log_dir, "influence_top_k.csv"))
    assert len(top) == K and [int(r["id"]) for r in top] == result.ranking[:K].tolist()
    curve = read_csv(os.path.join(logger.log_dir, "influence_detection_curve.csv"))
    assert float(curve[0]["fraction_noisy_found"]) == 0.0 and float(curve[-1]["fraction_noisy_found"]) == 1.0


def test_pytorch_lightning_namespace(result, tmp_path):
    pl_loggers = pytest.importorskip("pytorch_lightning.loggers")
    logger = pl_loggers.CSVLogger(save_dir=str(tmp_path))
    assert logger_kind(logger) == "csv"
    assert logger_kind(pl_loggers.TensorBoardLogger(save_dir=str(tmp_path))) == "tensorboard"
    report(result, logger, top_k=K)  # a single logger is accepted too
    assert "influence/auroc" in read_csv(os.path.join(logger.log_dir, "metrics.csv"))[-1]
    assert len(read_csv(os.path.join(logger.log_dir, "influence_top_k.csv"))) == K


def test_mlflow_read_back(result, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.x: the file store is opt-in
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    uri = f"file:{tmp_path}/mlruns"
    logger = MLFlowLogger(experiment_name="audit", tracking_uri=uri)
    report(result, [logger], top_k=K)
    client = MlflowClient(tracking_uri=uri)
    paths = {a.path for a in client.list_artifacts(logger.run_id, "influence")}
    assert {"influence/top_k.json", "influence/influence_scores.csv", "influence/detection_curve.png"} <= paths
    table = json.load(open(client.download_artifacts(logger.run_id, "influence/top_k.json", str(tmp_path))))
    assert len(table["data"]) == K
    scores = read_csv(client.download_artifacts(logger.run_id, "influence/influence_scores.csv", str(tmp_path)))
    assert len(scores) == N
    logged = client.get_run(logger.run_id).data.metrics
    assert logged["influence/auroc"] == pytest.approx(result.metrics["auroc"])
    assert "influence/precision_at_k" in logged and "influence/detection_at_10pct" in logged


def test_wandb_offline_read_back(result, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    for key, value in {"WANDB_SILENT": "true", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                       "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    logger = WandbLogger(mode="offline", save_dir=str(tmp_path), project="influence-test")
    try:
        run_dir = logger.experiment.dir
    except Exception as err:  # pragma: no cover - sandbox-specific
        pytest.skip(f"wandb could not start an offline run here: {type(err).__name__}: {err}")
    try:
        report(result, [logger], top_k=K)
    finally:
        wandb.finish()
        wandb.teardown()  # stop the wandb service, so it flushes and closes the run's files
    tables = glob.glob(os.path.join(run_dir, "media", "table", "influence", "top_k_*.table.json"))
    assert len(tables) == 1
    table = json.load(open(tables[0]))
    assert table["columns"][:3] == ["rank", "id", "score"] and len(table["data"]) == K
    assert glob.glob(os.path.join(run_dir, "media", "images", "influence", "detection_curve_*.png"))
    # the run's transaction log (.wandb) may still be closing after finish(); wait for it
    (events,) = glob.glob(os.path.join(os.path.dirname(run_dir), "*.wandb"))
    keys = (b"influence/top_k", b"influence/auroc", b"influence/scores")
    deadline = time.monotonic() + 20
    while not all(k in open(events, "rb").read() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(k in open(events, "rb").read() for k in keys)


# --------------------------------------------------------------------------- unknown loggers, failures, ranks


class RecordingLogger:
    """Built lazily so importing this file does not import Lightning."""

    @staticmethod
    def make():
        from lightning.pytorch.loggers import Logger

        class Recording(Logger):
            name, version = "recording", 0

            def __init__(self):
                super().__init__()
                self.calls = []

            def log_hyperparams(self, params, *args, **kwargs):
                pass

            def log_metrics(self, metrics, step=None):
                self.calls.append((dict(metrics), step))

        return Recording()


def test_unknown_logger_gets_scalars(result, caplog):
    logger = RecordingLogger.make()
    assert logger_kind(logger) is None
    with caplog.at_level(logging.DEBUG, logger="lightning_influence.reporting"):
        report(result, [logger], step=5)
    ((metrics, step),) = logger.calls
    assert step == 5 and metrics["influence/auroc"] == result.metrics["auroc"]
    assert metrics["influence/time/gradients"] == 0.25 and "influence/score_mean" in metrics
    assert all(k.startswith("influence/") and math.isfinite(v) for k, v in metrics.items())
    assert "no rich-output adapter" in caplog.text


def test_nan_metrics_skipped_and_no_noisy(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    res = make_result(noisy=False)
    res.metrics["auroc"] = float("nan")
    logger = CSVLogger(save_dir=str(tmp_path))
    report(res, [logger], top_k=K)
    assert "influence/auroc" not in read_csv(os.path.join(logger.log_dir, "metrics.csv"))[-1]
    assert os.path.exists(os.path.join(logger.log_dir, "influence_top_k.csv"))
    assert not os.path.exists(os.path.join(logger.log_dir, "influence_detection_curve.csv"))


def test_excluded_samples_nan_scores(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    res = make_result()
    last = int(res.ranking[-1])
    res.scores[last] = float("nan")  # an excluded sample: NaN score, ranked last
    res.excluded = [last]
    csv_logger, tb_logger = CSVLogger(save_dir=str(tmp_path)), TensorBoardLogger(save_dir=str(tmp_path))
    report(res, [csv_logger, tb_logger], top_k=N)
    top = read_csv(os.path.join(csv_logger.log_dir, "influence_top_k.csv"))
    assert len(top) == N and int(top[-1]["id"]) == last and top[-1]["score"] == "nan"
    curve = read_csv(os.path.join(csv_logger.log_dir, "influence_detection_curve.csv"))
    assert float(curve[-1]["fraction_noisy_found"]) == 1.0
    assert "1 excluded" in summary_text(res)


def test_adapter_failure_is_a_warning(result, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    def broken(*args, **kwargs):
        raise ImportError("No module named 'somepackage'")

    monkeypatch.setitem(ADAPTERS, "csv", broken)
    logger = CSVLogger(save_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="somepackage"):
        report(result, [logger])
    assert "influence/auroc" in read_csv(os.path.join(logger.log_dir, "metrics.csv"))[-1]  # scalars still logged


def test_only_rank_zero_writes(result, monkeypatch):
    from lightning_utilities.core.rank_zero import rank_zero_only

    logger = RecordingLogger.make()
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    report(result, [logger])
    assert logger.calls == []
