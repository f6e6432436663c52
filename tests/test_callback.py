"""InfluenceCallback end to end on a tiny noisy-label MLP (CPU, a few seconds per trainer).

Every test trains a real ``Trainer`` and reads back what the callback produced: logger files
through the packages' own readers, the scores file, checkpoints.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import struct
import time
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_influence import AuditResult, InfluenceCallback, TuningConfig
from lightning_influence.callback import InfluenceCallbackError
from tasks import TensorPairs, flip_labels

N_TRAIN, N_VAL, NOISE = 200, 60, 0.2
FAST = TuningConfig(steps=10, batch_size=32)  # a few SAM steps: enough to separate the noisy labels here

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
              pytest.mark.filterwarnings("ignore:.*but have no `val_dataloader`")]


# ---------------------------------------------------------------------- module-level (importable) fixtures


def blobs(n_train: int = N_TRAIN, n_val: int = N_VAL, noise: float = NOISE, seed: int = 0):
    """3 Gaussian blobs in 8-D: a training set with ``noise`` flipped labels, a clean val set."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=g) * 2.5

    def make(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return centers[y] + torch.randn(n, 8, generator=g), y

    x_tr, y_tr = make(n_train)
    x_va, y_va = make(n_val)
    noisy_y, flipped = flip_labels(y_tr, noise, 3, seed=seed)
    return TensorPairs(x_tr, noisy_y), TensorPairs(x_va, y_va), flipped


class NoisyBlobs(L.LightningDataModule):
    """Noisy-label blobs; ``self.noisy`` holds the ground-truth flags."""

    def __init__(self, n_train: int = N_TRAIN, n_val: int = N_VAL, batch_size: int = 32, shuffle: bool = True):
        super().__init__()
        self.n_train, self.n_val, self.batch_size, self.shuffle = n_train, n_val, batch_size, shuffle
        self.train, self.val, self.noisy = blobs(n_train, n_val)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)


class TinyClassifier(L.LightningModule):
    """An MLP; counts its training steps so tests can prove none happened."""

    def __init__(self, hidden: int = 16, lr: float = 0.1, momentum: float = 0.9, dropout: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 3))
        self.training_steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class Spy(Callback):
    """Records which hooks ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def setup(self, trainer, pl_module, stage):
        self.calls.append("setup")

    def on_fit_start(self, trainer, pl_module):
        self.calls.append("on_fit_start")


def make_trainer(tmp_path, callbacks=(), **overrides) -> L.Trainer:
    options: dict[str, Any] = dict(default_root_dir=str(tmp_path), max_epochs=2, accelerator="cpu", devices=1,
                                   logger=False, log_every_n_steps=1, enable_checkpointing=False,
                                   enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0)
    options.update(overrides)
    return L.Trainer(callbacks=list(callbacks), **options)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def data():
    return blobs()



# ---------------------------------------------------------------------- 1. real loggers, read back


def test_tensorboard_and_csv_loggers_read_back(tmp_path, data, caplog, capsys):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, val, noisy = data
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    cb = InfluenceCallback(noisy=noisy, tuning=FAST, top_k=20, describe=lambda i: f"blob sample #{i}")
    trainer = make_trainer(tmp_path, [cb, TQDMProgressBar()], logger=[tb, csv_logger], enable_progress_bar=True)
    with caplog.at_level(logging.INFO):
        trainer.fit(TinyClassifier(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))

    # a bar per stage, in the trainer's (tqdm) style, and the one-screen summary at the end
    bars = capsys.readouterr().err
    assert all(f"influence: {stage}" in bars for stage in ("tuning", "gradients", "solve"))
    [summary] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Influence audit:")]
    assert "method=fvm" in summary and "Time per stage" in summary and "Top 10 most harmful" in summary
    assert "auroc=" in summary and f"blob sample #{int(cb.result.ranking[0])}" in summary

    result = cb.result
    assert isinstance(result, AuditResult) and result.scores.shape == (N_TRAIN,)
    assert result.metrics["auroc"] > 0.8  # the flipped labels are found
    assert cb.ran and cb.state_dict()["global_step"] == trainer.global_step

    # TensorBoard, through tensorboard's own reader
    events = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert "influence/auroc" in tags["scalars"]
    assert events.Scalars("influence/auroc")[-1].value == pytest.approx(result.metrics["auroc"], rel=1e-5)
    assert {"influence/ap", "influence/precision@k", "influence/recall@k"} <= set(tags["scalars"])
    assert any(t.startswith("influence/time/") for t in tags["scalars"])
    assert "influence/scores" in tags["histograms"]
    histogram = events.Histograms("influence/scores")[-1].histogram_value
    assert histogram.num == N_TRAIN
    text_tags = [t for t in tags["tensors"] if t.startswith("influence/top_k")]
    assert text_tags, tags["tensors"]
    table = events.Tensors(text_tags[0])[-1].tensor_proto.string_val[0].decode()
    top_id = int(result.ranking[0])
    assert "| rank |" in table and f"blob sample #{top_id}" in table
    assert table.count("blob sample #") == 20
    assert any(t.startswith("influence/pr_curve") for t in tags["tensors"])
    assert "influence/detection_curve" in tags["images"]

    # the full scores file, in the trainer's log dir (the first logger's)
    scores_file = os.path.join(tb.log_dir, "influence_scores.csv")
    assert cb.scores_path == scores_file
    rows = read_csv(scores_file)
    assert len(rows) == N_TRAIN and sorted(int(r["id"]) for r in rows) == list(range(N_TRAIN))
    assert set(rows[0]) == {"id", "score", "rank", "influence", "loss_trained", "loss_tuned", "label",
                            "suggested_label", "noisy", "percentile"}
    assert int(rows[0]["id"]) == top_id and rows[0]["rank"] == "1"
    by_id = {int(r["id"]): r for r in rows}
    assert all(float(by_id[i]["score"]) == pytest.approx(float(result.scores[i])) for i in range(N_TRAIN))
    assert not glob.glob(os.path.join(tb.log_dir, ".tmp-*"))  # written atomically, nothing left over

    # CSVLogger: the scalars in metrics.csv, the top-k table in its log_dir
    metrics = read_csv(os.path.join(csv_logger.log_dir, "metrics.csv"))
    logged = [float(r["influence/auroc"]) for r in metrics if r.get("influence/auroc")]
    assert logged and logged[-1] == pytest.approx(result.metrics["auroc"], rel=1e-5)
    top_k = read_csv(os.path.join(csv_logger.log_dir, "influence_top_k.csv"))
    assert len(top_k) == 20 and int(top_k[0]["id"]) == top_id and top_k[0]["text"] == f"blob sample #{top_id}"


# ---------------------------------------------------------------------- 2. W&B and MLflow, read back


def test_wandb_offline_and_mlflow_file_store_read_back(tmp_path, data, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the W&B adapter needs the optional package wandb")
    pytest.importorskip("mlflow", reason="the MLflow adapter needs the optional package mlflow")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # recent MLflow wants an opt-in for ./mlruns stores
    train, val, noisy = data
    wandb_logger = WandbLogger(project="lightning-influence-test", save_dir=str(tmp_path), mode="offline")
    uri = "file:" + str(tmp_path / "mlruns")
    mlflow_logger = MLFlowLogger(experiment_name="influence", tracking_uri=uri)
    cb = InfluenceCallback(noisy=noisy, tuning=FAST, top_k=15)
    trainer = make_trainer(tmp_path, [cb], logger=[wandb_logger, mlflow_logger], max_epochs=1)
    try:
        trainer.fit(TinyClassifier(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))
        run_dir = wandb_logger.experiment.dir
    finally:
        wandb.finish()
    result = cb.result
    top_ids = result.ranking[:15].tolist()

    # W&B (offline): the wandb.Table file and the summary the run wrote
    tables = glob.glob(os.path.join(run_dir, "media", "table", "influence", "top_k*.table.json"))
    assert tables, os.listdir(run_dir)
    with open(tables[0]) as handle:
        table = json.load(handle)
    assert table["columns"][:2] == ["rank", "id"]
    assert [row[1] for row in table["data"]] == top_ids
    [run_file] = glob.glob(os.path.join(os.path.dirname(run_dir), "*.wandb"))
    history = wandb_history(run_file)
    assert json.loads(history["influence/auroc"]) == pytest.approx(result.metrics["auroc"], rel=1e-5)
    assert json.loads(history["influence/top_k/_type"]) == "table-file"
    assert json.loads(history["influence/top_k/nrows"]) == 15
    assert glob.glob(os.path.join(run_dir, "media", "images", "influence", "detection_curve*.png"))

    # MLflow (local file store): metrics, the table and the artifacts, through MlflowClient
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(mlflow_logger.run_id)
    assert run.data.metrics["influence/auroc"] == pytest.approx(result.metrics["auroc"], rel=1e-5)
    assert "influence/precision_at_k" in run.data.metrics
    names = {a.path for a in client.list_artifacts(mlflow_logger.run_id, "influence")}
    assert {"influence/top_k.json", "influence/influence_scores.csv", "influence/detection_curve.png"} <= names
    folder = client.download_artifacts(mlflow_logger.run_id, "influence", str(tmp_path / "downloaded"))
    with open(os.path.join(folder, "top_k.json")) as handle:
        logged_table = json.load(handle)
    id_column = logged_table["columns"].index("id")
    assert [row[id_column] for row in logged_table["data"]] == top_ids
    assert len(read_csv(os.path.join(folder, "influence_scores.csv"))) == N_TRAIN


def wandb_history(path: str) -> dict[str, str]:
    """The logged values (JSON text) of an offline run's ``.wandb`` file, read with W&B's own
    protobuf ``Record`` over the file's LevelDB-log framing (32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + 30
    while True:  # the W&B core process may still be writing after finish() returned
        raw = open(path, "rb").read()
        values, finished = _wandb_records(raw, wandb_internal_pb2)
        if finished or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


def _wandb_records(raw: bytes, pb):
    block, pos, pending, values, finished = 32768, 7, b"", {}, False
    assert raw.startswith(b":W&B")
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        if pos + 7 + length > len(raw):
            break  # a record still being written
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            kind_of = record.WhichOneof("record_type")
            finished |= kind_of == "exit"
            if kind_of == "history":
                values.update({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return values, finished


# ---------------------------------------------------------------------- 3. shuffled loaders


def test_shuffled_and_sequential_loaders_give_the_same_scores(tmp_path, data):
    train, val, noisy = data
    torch.manual_seed(0)
    shuffled = InfluenceCallback(noisy=noisy, tuning=FAST, scores_filename=None)
    module = TinyClassifier()
    make_trainer(tmp_path / "a", [shuffled]).fit(
        module, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))

    # the same weights (lr=0 keeps them), a sequential loader of another batch size, the audit by hand
    same = TinyClassifier(lr=0.0, momentum=0.0)
    same.load_state_dict(module.state_dict())
    sequential = InfluenceCallback(noisy=noisy, tuning=FAST, scores_filename=None, run_on_fit_end=False)
    trainer = make_trainer(tmp_path / "b", [sequential], max_epochs=1)
    trainer.fit(same, DataLoader(train, batch_size=50, shuffle=False), DataLoader(val, batch_size=20))
    assert sequential.result is None  # run_on_fit_end=False
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, same.state_dict()[name])
    by_hand = sequential.run(trainer, same)

    assert sequential.result is by_hand
    torch.testing.assert_close(by_hand.scores, shuffled.result.scores)
    torch.testing.assert_close(by_hand.loss_trained, shuffled.result.loss_trained)
    assert torch.equal(by_hand.labels, train.y)  # ids are dataset positions
    assert by_hand.metrics["auroc"] == pytest.approx(shuffled.result.metrics["auroc"])


def test_audits_under_the_trainers_precision(tmp_path, data):
    """Under "64-true" Lightning converts the module and each batch to float64; the audit's own
    loaders get the same conversion (the precision plugin's convert_input)."""
    train, val, noisy = data
    cb = InfluenceCallback(noisy=noisy, tuning=FAST, on_error="raise", scores_filename=None)
    module = TinyClassifier()
    make_trainer(tmp_path, [cb], max_epochs=1, precision="64-true").fit(
        module, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))
    assert next(module.parameters()).dtype == torch.float64
    assert cb.result.config["grad_dtype"] == "torch.float64"
    assert torch.isfinite(cb.result.scores).all() and cb.result.metrics["auroc"] > 0.8


# ---------------------------------------------------------------------- 4. fail fast


class Stream(IterableDataset):
    def __init__(self, pairs: TensorPairs) -> None:
        self.pairs = pairs

    def __iter__(self):
        return iter(self.pairs[i] for i in range(len(self.pairs)))


@pytest.mark.parametrize("case", ["no_val", "lora", "noisy_length", "iterable"])
def test_bad_configuration_fails_in_setup_before_training(tmp_path, data, case):
    train, val, noisy = data
    options: dict[str, Any] = {"noisy": noisy, "tuning": FAST}
    train_loader = DataLoader(train, batch_size=32, shuffle=True)
    val_loader: DataLoader | None = DataLoader(val, batch_size=32)
    error, match = ValueError, None
    if case == "no_val":
        val_loader, error, match = None, InfluenceCallbackError, "no validation data"
    elif case == "lora":
        options["params"], match = "lora", "no PEFT LoRA layers"
    elif case == "noisy_length":
        options["noisy"], match = noisy[:-1], rf"one flag per training sample \({N_TRAIN}\)"
    elif case == "iterable":
        train_loader, error, match = DataLoader(Stream(train), batch_size=32), TypeError, "map-style"
    cb = InfluenceCallback(**options)  # a bad method or solver is refused here already (see below)
    module, spy = TinyClassifier(), Spy()
    trainer = make_trainer(tmp_path, [cb, spy])
    with pytest.raises(error, match=match):
        trainer.fit(module, train_loader, val_loader)
    assert module.training_steps == 0
    assert "on_fit_start" not in spy.calls  # it was setup() that raised
    assert cb.result is None


def test_bad_arguments_fail_at_construction(data):
    _, _, noisy = data
    for kwargs, match in [({"method": "nope"}, "unknown method"), ({"solver": "nope"}, "nope"),
                          ({"on_error": "ignore"}, "on_error"), ({"every_n_epochs": 0}, "every_n_epochs"),
                          ({"top_k": 0}, "top_k"), ({"noisy": noisy.view(2, -1)}, "1-D"),
                          ({"noisy": [0.5, 1.0]}, "booleans"), ({"scores_filename": "a/b.csv"}, "plain file name"),
                          ({"grad_dtype": "int8"}, "grad_dtype"), ({"tuning": {"stepz": 3}}, "stepz"),
                          ({"nonfinite": "ignore"}, "nonfinite")]:
        with pytest.raises(ValueError, match=match):
            InfluenceCallback(**kwargs)


class LateLayers(TinyClassifier):
    """Builds its layers in configure_model (as for FSDP): the params check waits for them."""

    def __init__(self):
        super().__init__()
        del self.net

    def configure_model(self):
        if not hasattr(self, "net"):
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def test_checks_on_layers_built_late_still_run_before_training(tmp_path, data):
    train, val, _ = data
    module, spy = LateLayers(), Spy()
    trainer = make_trainer(tmp_path, [spy, InfluenceCallback(params="lora", tuning=FAST)])
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        trainer.fit(module, DataLoader(train, batch_size=32), DataLoader(val, batch_size=32))
    assert module.training_steps == 0 and "on_fit_start" in spy.calls


class OwnLoaders(TinyClassifier):
    """Creates its datasets in setup() and serves its own loaders (no datamodule)."""

    def __init__(self, with_val: bool = True):
        super().__init__()
        self.with_val = with_val
        self.train_set = self.val_set = None

    def setup(self, stage):
        self.train_set, self.val_set, _ = blobs(n_train=90, n_val=30)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=16) if self.with_val else []


def test_the_modules_own_loaders_are_audited_after_its_setup(tmp_path):
    cb = InfluenceCallback(tuning=FAST, method="vm", scores_filename=None)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1)
    module = OwnLoaders()
    trainer.fit(module)
    assert cb.result.scores.shape == (90,) and torch.equal(cb.result.labels, module.train_set.y)

    module = OwnLoaders(with_val=False)
    with pytest.raises(InfluenceCallbackError, match="no validation data"):
        make_trainer(tmp_path, [InfluenceCallback(tuning=FAST)]).fit(module)
    assert module.training_steps == 0


# ---------------------------------------------------------------------- 5. weights untouched


class Hashes(Callback):
    """Hashes the checkpoint files when training ends, before the final audit runs."""

    def __init__(self, folder: str) -> None:
        self.folder, self.at_train_end = folder, {}

    def on_train_end(self, trainer, pl_module):
        self.at_train_end = hash_files(self.folder)


def hash_files(folder: str) -> dict[str, str]:
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(folder, "*.ckpt")))}


def assert_equal_nested(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_weights_optimizer_and_checkpoints_are_bit_identical_with_and_without(tmp_path, data):
    train, val, noisy = data
    runs = {}
    for name, with_callback in (("without", False), ("with", True)):
        L.seed_everything(0, verbose=False)
        folder = str(tmp_path / name / "ckpt")
        checkpoint = ModelCheckpoint(dirpath=folder, monitor="val_loss", save_last=True, save_top_k=2)
        cb = InfluenceCallback(noisy=noisy, tuning=FAST, every_n_epochs=2, dirpath=str(tmp_path / name))
        hashes = Hashes(folder)
        callbacks = [hashes, cb, checkpoint] if with_callback else [hashes, checkpoint]
        module = TinyClassifier(dropout=0.2)  # dropout + shuffling: any RNG use by the audit would show
        trainer = make_trainer(tmp_path / name, callbacks, max_epochs=3, enable_checkpointing=True)
        trainer.fit(module, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))
        runs[name] = (module, trainer, checkpoint, cb, hashes, folder)

    module_a, trainer_a, ckpt_a, _, _, folder_a = runs["without"]
    module_b, trainer_b, ckpt_b, cb, hashes, folder_b = runs["with"]
    assert cb.state_dict()["audits"] == 2  # after epoch index 1 (every 2nd epoch) and at the end of fit
    assert os.path.exists(tmp_path / "with" / "influence_scores-epoch1.csv")
    assert os.path.exists(tmp_path / "with" / "influence_scores.csv")
    assert_equal_nested(module_a.state_dict(), module_b.state_dict(), "weights")
    assert_equal_nested(trainer_a.optimizers[0].state_dict(), trainer_b.optimizers[0].state_dict(), "optimizer")
    assert sorted(hash_files(folder_a)) == sorted(hash_files(folder_b))
    for filename in hash_files(folder_a):
        a = torch.load(os.path.join(folder_a, filename), weights_only=False)
        b = torch.load(os.path.join(folder_b, filename), weights_only=False)
        for key in ("state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step", "loops"):
            assert_equal_nested(a[key], b[key], f"{filename}:{key}")
    assert hash_files(folder_b) == hashes.at_train_end  # the final audit didn't touch the checkpoints
    assert ckpt_a.best_model_score == ckpt_b.best_model_score


# ---------------------------------------------------------------------- 6. LightningCLI


def test_lightning_cli_configures_the_callback(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["train.py"])

    cli = LightningCLI(
        TinyClassifier, NoisyBlobs, run=True,
        args=["fit", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.log_every_n_steps=1",
              "--trainer.callbacks+=lightning_influence.InfluenceCallback",
              "--trainer.callbacks.method=fvm", "--trainer.callbacks.solver=datainf",
              "--trainer.callbacks.tuning.steps=10", "--trainer.callbacks.tuning.batch_size=32",
              "--trainer.callbacks.scores_filename=cli_scores.csv",
              "--data.n_train=120"],
    )
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCallback)]
    assert cb.options.method == "fvm" and cb.options.solver == "datainf" and cb.options.tuning.steps == 10
    assert cb.result is not None and cb.result.scores.shape == (120,)
    assert cb.result.config["solver"] == "datainf"
    assert len(read_csv(os.path.join(cli.trainer.log_dir, "cli_scores.csv"))) == 120


# ---------------------------------------------------------------------- errors after training


def broken_loss(model, batch):
    raise RuntimeError("boom in the loss")


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_a_failing_audit_warns_or_raises(tmp_path, data, on_error):
    train, val, _ = data
    # with the pre-flight check this loss fails in setup() (see the test below); without it,
    # the failure comes after training, which is what on_error is for
    cb = InfluenceCallback(loss_fn=broken_loss, tuning=FAST, on_error=on_error, preflight=False)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"))
    module = TinyClassifier()
    trainer = make_trainer(tmp_path, [cb, checkpoint], max_epochs=1, enable_checkpointing=True)
    loaders = (DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))
    if on_error == "warn":
        with pytest.warns(RuntimeWarning, match="audit failed with RuntimeError: boom in the loss"):
            trainer.fit(module, *loaders)
        assert trainer.state.finished and not trainer.interrupted
        assert isinstance(cb.last_error, RuntimeError)
    else:
        with pytest.raises(RuntimeError, match="boom in the loss"):
            trainer.fit(module, *loaders)
    assert module.training_steps == len(loaders[0])  # training itself completed
    assert glob.glob(str(tmp_path / "ckpt" / "*.ckpt"))  # and its checkpoint is there
    assert cb.result is None and not cb.ran


def test_a_loss_that_fails_is_caught_by_the_preflight_before_training(tmp_path, data):
    train, val, _ = data
    module = TinyClassifier()
    trainer = make_trainer(tmp_path, [InfluenceCallback(loss_fn=broken_loss, tuning=FAST)], max_epochs=1)
    with pytest.raises(RuntimeError, match="boom in the loss"):
        trainer.fit(module, DataLoader(train, batch_size=32), DataLoader(val, batch_size=32))
    assert module.training_steps == 0


# ---------------------------------------------------------------------- stateful


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_state_dict_round_trip_and_resume(tmp_path, data):
    train, val, noisy = data
    cb = InfluenceCallback(noisy=noisy, tuning=FAST, every_n_epochs=1, run_on_fit_end=False, scores_filename=None)
    assert cb.state_key == "InfluenceCallback{'method': 'fvm', 'solver': 'hyperinf'}"
    assert InfluenceCallback(method="vm", solver="exact").state_key != cb.state_key
    # same method and solver, two dirpaths: two callbacks one Trainer can hold
    assert (InfluenceCallback(dirpath=str(tmp_path / "a")).state_key
            != InfluenceCallback(dirpath=str(tmp_path / "b")).state_key)
    assert cb.state_dict()["ran"] is False
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_on_train_epoch_end=True)
    loaders = (DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))
    trainer = make_trainer(tmp_path, [cb, checkpoint], max_epochs=1, enable_checkpointing=True)
    trainer.fit(TinyClassifier(), *loaders)
    state = cb.state_dict()
    assert state["ran"] is True and state["epoch"] == 0 and state["global_step"] == trainer.global_step
    assert state["audits"] == 1 and state["metrics"]["auroc"] == pytest.approx(cb.result.metrics["auroc"])

    fresh = InfluenceCallback(noisy=noisy, tuning=FAST)
    fresh.load_state_dict(state)
    assert fresh.ran and fresh.state_dict()["epoch"] == 0 and fresh.result is None

    # a run resumed from the checkpoint knows that these weights were audited, and doesn't redo it
    saved = torch.load(str(tmp_path / "ckpt" / "last.ckpt"), weights_only=False)
    assert saved["callbacks"][cb.state_key]["ran"] is True
    resumed = InfluenceCallback(noisy=noisy, tuning=FAST, every_n_epochs=1, scores_filename=None)
    trainer = make_trainer(tmp_path, [resumed, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True,
                                                               save_on_train_epoch_end=True)],
                           max_epochs=1, enable_checkpointing=True)
    trainer.fit(TinyClassifier(), *loaders, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.ran and resumed.state_dict()["audits"] == 1 and resumed.result is None


# ---------------------------------------------------------------------- the other namespace


def test_pytorch_lightning_namespace(tmp_path, data, caplog):
    pl = pytest.importorskip("pytorch_lightning", reason="the pytorch_lightning package is not installed")
    from pytorch_lightning.callbacks import RichProgressBar
    from pytorch_lightning.loggers import CSVLogger

    from lightning_influence.pl import InfluenceCallback as PLInfluenceCallback

    class PLClassifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    train, val, noisy = data
    cb = PLInfluenceCallback(noisy=noisy, tuning=FAST)
    assert isinstance(cb, pl.Callback) and not isinstance(cb, L.Callback)
    assert not isinstance(InfluenceCallback(), pl.Callback)
    logger = CSVLogger(str(tmp_path))
    trainer = pl.Trainer(callbacks=[cb, RichProgressBar()], logger=logger, max_epochs=1, accelerator="cpu",
                         devices=1, enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1)
    with caplog.at_level(logging.INFO, logger="pytorch_lightning"):
        trainer.fit(PLClassifier(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))
    assert any(r.name.startswith("pytorch_lightning.") and r.getMessage().startswith("Influence audit:")
               for r in caplog.records)
    assert cb.result.scores.shape == (N_TRAIN,) and cb.result.metrics["auroc"] > 0.7
    metrics = read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    assert any(r.get("influence/auroc") for r in metrics)
    assert len(read_csv(os.path.join(logger.log_dir, "influence_scores.csv"))) == N_TRAIN
    with pytest.raises(InfluenceCallbackError, match="no validation data"):
        pl.Trainer(callbacks=[PLInfluenceCallback()], logger=False, max_epochs=1, enable_progress_bar=False,
                   enable_model_summary=False).fit(PLClassifier(), DataLoader(train, batch_size=32))


def test_loader_discovery_unwraps_combined_loaders_of_either_namespace():
    from lightning.pytorch.utilities.combined_loader import CombinedLoader
    from pytorch_lightning.utilities.combined_loader import CombinedLoader as PLCombinedLoader

    from lightning_influence.trainer_data import single_loader

    a, b = DataLoader(list(range(4))), DataLoader(list(range(3)))
    for combined in (CombinedLoader([a, b], "sequential"), PLCombinedLoader({"x": a, "y": b}, "sequential")):
        told = []
        assert single_loader(combined, "val", told.append) is a
        assert len(told) == 1 and "2 validation loaders" in told[0]
        with pytest.raises(InfluenceCallbackError, match="one training DataLoader"):
            single_loader(combined, "train")
    assert single_loader([], "val") is None and single_loader(a, "train") is a


@pytest.mark.parametrize("kwargs, error, message", [
    ({"clean_labels": [0.0, 1.7, 2.0]}, ValueError, "clean_labels must be one integer label"),  # was truncated
    ({"top_k": 0}, ValueError, "top_k must be a positive integer"),
    ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ({"damping": float("inf")}, ValueError, "damping must be a finite number > 0"),
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ({"batch_size": 2.5}, ValueError, "batch_size must be >= 1"),
    ({"projection": 0}, ValueError, "projection must be None or a positive integer"),
    ({"max_memory": -1}, ValueError, "max_memory must be None or >= 0"),
    ({"grad_dtype": "float8_e4m3fn"}, ValueError, "grad_dtype must be one of"),
    ({"tuning": {"lr": float("nan")}}, ValueError, "tuning.lr must be a finite number > 0"),
    ({"rank_by": "loss_tuned", "method": "standard"}, ValueError, "rank_by='loss_tuned' needs"),
])
def test_callback_and_audit_reject_the_same_options(data, kwargs, error, message):
    # one validator: the callback refuses at construction exactly what audit() refuses
    from lightning_influence import audit

    train, val, _ = data
    with pytest.raises(error, match=message):
        InfluenceCallback(**kwargs)
    n = len(train)
    if "clean_labels" in kwargs:
        kwargs = {"clean_labels": torch.linspace(0, 1.7, n)}
    with pytest.raises(error, match=message):
        audit(TinyClassifier(), train, val, **kwargs)
