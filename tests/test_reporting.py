"""Reporting to real Lightning loggers, each checked by reading back what was written with the
logging package's own reader."""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import os
import time

import pytest
import torch

from lightning_influence.metrics import detection_metrics, ranking, score_summary
from lightning_influence.reporting import (
    ADAPTERS,
    detection_curve_figure,
    logger_kind,
    markdown_table,
    report,
    summary_text,
    top_k_rows,
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
    assert list(rows[0]) == ["rank", "id", "score", "percentile", "loss_trained", "loss_tuned", "label",
                             "suggested_label", "noisy", "text"]
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
                       "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache")}.items():
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


# --------------------------------------------------------------------------- the samples themselves: gallery, text


def test_percentile_is_scale_free_and_in_every_table(result, tmp_path):
    pct = result.percentile
    assert float(pct[result.ranking[0]]) == 100.0 and bool((pct > 0).all())
    assert torch.equal(pct.argsort(descending=True, stable=True)[:5], result.ranking[:5])
    scaled = make_result()
    scaled.scores = scaled.scores * 7.5e8  # another curvature scale: same percentiles
    assert torch.allclose(scaled.percentile, pct)
    rows = top_k_rows(result, K)
    assert list(rows[0])[:4] == ["rank", "id", "score", "percentile"] and rows[0]["percentile"] == 100.0
    assert "| percentile |" in markdown_table(rows)
    with open(write_scores_file(result, str(tmp_path))) as handle:
        header = handle.readline().strip().split(",")
    before = ["id", "score", "rank", "loss_trained", "loss_tuned", "label", "suggested_label", "noisy"]
    assert [c for c in header if c in before] == before  # the existing columns keep their order
    assert header[-1] == "percentile" and header == [c for c in AuditResult.COLUMNS if c in header]
    res = make_result()
    res.scores[3] = float("nan")
    assert math.isnan(float(res.percentile[3])) and float(res.percentile.nanmean()) > 0


def test_images_recognised_from_batches_and_hooks():
    from PIL import Image

    from lightning_influence.reporting.gallery import dataset_renderer, image_layout, to_image
    from tasks import TensorPairs

    assert image_layout(torch.rand(2, 3, 5, 6)) == "BCHW"
    assert image_layout(torch.randint(0, 255, (2, 5, 6, 3), dtype=torch.uint8)) == "BHWC"
    assert image_layout(torch.rand(2, 5, 6)) == "BHW"
    assert image_layout(torch.rand(2, 64)) is None  # flat features
    assert image_layout(torch.randint(0, 9, (2, 5, 6))) is None  # token ids / class maps
    y = torch.zeros(4, dtype=torch.long)
    assert dataset_renderer(TensorPairs(torch.rand(4, 64), y)) is None
    render = dataset_renderer(TensorPairs(torch.rand(4, 1, 8, 8) * 5 - 2, y))
    assert to_image(render(2)).shape == (8, 8, 3)
    assert to_image(dataset_renderer(TensorPairs(torch.rand(4, 1, 4, 4), y))(0)).shape == (4, 4, 3)
    assert to_image(torch.rand(1, 4, 4)).shape == (4, 4, 3) and to_image(torch.rand(4, 4, 3)).shape == (4, 4, 3)
    image = to_image(render(2))
    assert image.shape == (8, 8, 3) and float(image.min()) == 0.0 and float(image.max()) == 1.0
    pil = Image.fromarray((torch.rand(6, 7, 3) * 255).to(torch.uint8).numpy())
    assert to_image(pil).shape == (6, 7, 3)
    with pytest.raises(ValueError, match="image"):
        to_image(torch.rand(5, 6, 7))


def test_render_failure_warns_and_keeps_the_tables(result, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="render"):
        report(result, [logger], top_k=K, render=lambda i: 1 / 0)
    assert len(read_csv(os.path.join(logger.log_dir, "influence_top_k.csv"))) == K
    assert not os.path.exists(os.path.join(logger.log_dir, "influence_gallery.png"))


def _image_blobs(n_train: int = 96, n_val: int = 32, flat: bool = False):
    """Gaussian blobs in 16-D shaped as 1x4x4 images (or kept flat), 20 % flipped labels."""
    from helpers import gaussian_blobs
    from tasks import TensorPairs, flip_labels

    train, val = gaussian_blobs(n_train, n_val, 16)
    shape = (-1, 16) if flat else (-1, 1, 4, 4)
    noisy_y, flipped = flip_labels(train.y, 0.2, 3, seed=0)
    return (TensorPairs(train.x.float().reshape(shape), noisy_y), TensorPairs(val.x.float().reshape(shape), val.y),
            flipped)


def _fit_images(tmp_path, loggers, flat: bool = False, **options):
    import lightning.pytorch as L
    from torch import nn
    from torch.utils.data import DataLoader

    from lightning_influence import InfluenceCallback, TuningConfig

    class ImageClassifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    train, val, noisy = _image_blobs(flat=flat)
    cb = InfluenceCallback(noisy=noisy, tuning=TuningConfig(steps=10, batch_size=32), top_k=12, **options)
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_epochs=2, accelerator="cpu", devices=1, logger=loggers,
                        callbacks=[cb], log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(ImageClassifier(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))
    assert cb.result is not None, cb.last_error
    return cb, train


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_image_run_tensorboard_gallery_read_back(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator as ea

    tb, csv_logger = TensorBoardLogger(save_dir=str(tmp_path)), CSVLogger(save_dir=str(tmp_path / "csv"))
    cb, _ = _fit_images(tmp_path, [tb, csv_logger])  # (B, 1, 4, 4) batches: no render= needed
    acc = ea.EventAccumulator(tb.log_dir, size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    assert "influence/gallery" in acc.Tags()["images"]
    (event,) = acc.Images("influence/gallery")
    picture = Image.open(io.BytesIO(event.encoded_image_string))
    assert picture.size == (event.width, event.height) and event.width > 600 and event.height > 150
    (text_tag,) = acc.PluginTagToContent("text")
    table = acc.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| rank | id | score | percentile |")
    saved = Image.open(os.path.join(csv_logger.log_dir, "influence_gallery.png"))
    assert saved.size[0] > 600
    top = read_csv(os.path.join(csv_logger.log_dir, "influence_top_k.csv"))
    assert float(top[0]["percentile"]) == 100.0
    assert [int(r["id"]) for r in top] == cb.result.ranking[:12].tolist()


def wandb_records(path: str, kinds=("artifact",)):
    """The ``Record``s of the given kinds in an offline run's ``.wandb`` file, read with W&B's
    own protobuf over the file's LevelDB-log framing (32 KiB blocks, 7-byte headers); waits
    (up to 30 s) for the run's exit record, as the W&B core may still be writing."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + 30
    while True:
        raw, found, finished = open(path, "rb").read(), [], False
        block, pos, pending = 32768, 7, b""
        while pos + 7 <= len(raw):
            left = block - pos % block
            _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):
                pos += left
                continue
            if pos + 7 + length > len(raw):
                break
            chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                kind_of = record.WhichOneof("record_type")
                finished |= kind_of == "exit"
                if kind_of in kinds:
                    found.append(record)
        if finished or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_image_run_wandb_table_has_image_cells_and_mlflow_gallery(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
    from mlflow import MlflowClient
    from PIL import Image

    for key, value in {"WANDB_SILENT": "true", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                       "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, value)
    wandb_logger = WandbLogger(mode="offline", save_dir=str(tmp_path), project="influence-test")
    uri = f"file:{tmp_path}/mlruns"
    mlflow_logger = MLFlowLogger(experiment_name="gallery", tracking_uri=uri)
    try:
        cb, _ = _fit_images(tmp_path, [wandb_logger, mlflow_logger])
        run_dir = wandb_logger.experiment.dir
    finally:
        wandb.finish()
    # W&B keeps a logged table with media as the run's "run_table" artifact: read it from the run's records
    (events,) = glob.glob(os.path.join(os.path.dirname(run_dir), "*.wandb"))
    (artifact,) = [r.artifact for r in wandb_records(events) if r.artifact.type == "run_table"]
    files = {entry.path: entry.local_path for entry in artifact.manifest.contents}
    table = json.load(open(files["influence/top_k.table.json"]))
    assert table["columns"][:4] == ["rank", "id", "score", "percentile"] and table["columns"][-1] == "image"
    assert [row[1] for row in table["data"]] == cb.result.ranking[:12].tolist()
    cells = [row[-1] for row in table["data"]]
    assert len(cells) == 12 and all(c["_type"] == "image-file" for c in cells)
    assert cells[0]["caption"].startswith(f"#1  id {table['data'][0][1]}") and "p100.0" in cells[0]["caption"]
    picture = Image.open(files[cells[0]["path"]])  # the cell's picture, enlarged from 4x4 for the table
    assert picture.size == (cells[0]["width"], cells[0]["height"]) == (64, 64)
    assert glob.glob(os.path.join(run_dir, "media", "images", "influence", "gallery_*.png"))
    paths = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(mlflow_logger.run_id, "influence")}
    assert "influence/gallery.png" in paths


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_render_hook_draws_flat_inputs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_influence import InfluenceCallback

    with pytest.raises(TypeError, match="render"):
        InfluenceCallback(render="pixels")
    flat_logger = CSVLogger(save_dir=str(tmp_path / "flat"))
    _fit_images(tmp_path, [flat_logger], flat=True)  # flat (B, 16) inputs are not pictures by themselves
    assert not os.path.exists(os.path.join(flat_logger.log_dir, "influence_gallery.png"))
    hooked = CSVLogger(save_dir=str(tmp_path / "hooked"))
    data = _image_blobs(flat=True)[0]
    seen = []
    _fit_images(tmp_path, [hooked], flat=True, render=lambda i: seen.append(i) or data.x[i].reshape(4, 4))
    assert os.path.exists(os.path.join(hooked.log_dir, "influence_gallery.png")) and len(seen) == 12
    off = CSVLogger(save_dir=str(tmp_path / "off"))
    _fit_images(tmp_path, [off], render=False)
    assert not os.path.exists(os.path.join(off.log_dir, "influence_gallery.png"))


class WordTokenizer:
    """A stand-in for a Hugging Face tokenizer: token id ``t`` is the word ``w<t>``, 0 is padding."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{t}" for t in ids if t or not skip_special_tokens)


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_text_tables_decode_inputs_with_the_modules_tokenizer(tmp_path):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from helpers import TokenDataset, pad_collate, tiny_bert_lora
    from lightning_influence import InfluenceCallback, TuningConfig

    class TextClassifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_bert_lora()
            self.tokenizer = WordTokenizer()

        def forward(self, **batch):
            return self.model(**batch)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)

    train, val = TokenDataset(n=24), TokenDataset(n=8, seed=1)
    logger = CSVLogger(save_dir=str(tmp_path))
    cb = InfluenceCallback(tuning=TuningConfig(steps=3, batch_size=8), top_k=5, verbose=True)  # no describe=
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_epochs=1, accelerator="cpu", devices=1, logger=logger,
                        callbacks=[cb], enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(TextClassifier(), DataLoader(train, batch_size=8, collate_fn=pad_collate),
                DataLoader(val, batch_size=8, collate_fn=pad_collate))
    assert cb.result is not None, cb.last_error
    top = read_csv(os.path.join(logger.log_dir, "influence_top_k.csv"))
    assert [r["text"] for r in top] == [" ".join(f"w{t}" for t in train.tokens[int(r["id"])].tolist()) for r in top]
    assert not os.path.exists(os.path.join(logger.log_dir, "influence_gallery.png"))  # token ids are no pictures
