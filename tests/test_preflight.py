"""The pre-flight check: every problem that would make the audit wrong or make it fail after
training is raised in ``setup()``, before the first training step (``training_step`` is never
called); samplers are honoured; the README's options are keywords of both entry points."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, SubsetRandomSampler

import hf_models as hf
from helpers import gaussian_blobs, mlp
from lightning_influence import AuditOptions, InfluenceCallback, audit
from lightning_influence.losses import BatchFormatError
from lightning_influence.preflight import PreflightError, check

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*validation tuning")]
FAST = {"steps": 5}


class Counting(L.LightningModule):
    """A small classifier that counts its training steps; ``loss`` picks its training loss."""

    def __init__(self, loss: str = "ce", d_in: int = 8, hidden: int = 16, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))
        self.loss, self.training_steps = loss, 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch[0], batch[1]
        logits = self(x)
        if self.loss == "smoothed":
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=0.3)
        else:
            loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Spy(Callback):
    def __init__(self):
        self.calls: list[str] = []

    def on_fit_start(self, trainer, pl_module):
        self.calls.append("on_fit_start")


class WithIndex(Dataset):
    """Samples as ``(x, y, index)`` tuples: the default loss can't read them."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, y, i


def _trainer(tmp_path, callbacks, **extra):
    return L.Trainer(default_root_dir=str(tmp_path), max_epochs=1, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=callbacks, **extra)


def _fails_in_setup(tmp_path, module, train, val, error, match, **options):
    spy = Spy()
    cb = InfluenceCallback(tuning=FAST, scores_filename=None, **options)
    with pytest.raises(error, match=match):
        _trainer(tmp_path, [cb, spy]).fit(module, train, val)
    assert module.training_steps == 0 and "on_fit_start" not in spy.calls  # setup() raised
    return cb


@pytest.fixture(scope="module")
def blobs():
    return gaussian_blobs(60, 20, 8)


def _float32(data):
    from tasks import TensorPairs

    return TensorPairs(data.x.float(), data.y)


def test_a_batch_the_default_loss_cant_read_fails_in_setup(tmp_path, blobs):
    train, val = (_float32(d) for d in blobs)
    _fails_in_setup(tmp_path, Counting(), DataLoader(WithIndex(train), batch_size=8),
                    DataLoader(val, batch_size=8), BatchFormatError, r"of 3 \(Tensor.*loss_fn")


class KeyedSet(Dataset):
    def __init__(self, samples, extra: bool):
        self.samples, self.extra = samples, extra

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return {**self.samples[i], **({"sample_id": torch.tensor(i)} if self.extra else {})}


class CausalModule(L.LightningModule):
    """A LightningModule holding a causal LM as an attribute, as HF fine-tuning scripts do."""

    def __init__(self, model=None):
        super().__init__()
        self.model = model if model is not None else hf.with_lora(hf.gpt2(dtype=torch.float32), "CAUSAL_LM", ["c_attn"])
        self.training_steps = 0

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        return self(**batch).loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_a_mapping_key_the_forward_does_not_take_fails_in_setup_and_is_named(tmp_path):
    samples = hf.lm_samples(12)
    train = DataLoader(KeyedSet(samples, extra=True), batch_size=4, collate_fn=_pad_with_extra)
    val = DataLoader(KeyedSet(samples[:6], extra=False), batch_size=4, collate_fn=_pad_with_extra)
    _fails_in_setup(tmp_path, CausalModule(), train, val, BatchFormatError, r"sample_id.*loss_fn")


def _pad_with_extra(items):
    batch = hf.pad([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])
    if "sample_id" in items[0]:
        batch["sample_id"] = torch.stack([it["sample_id"] for it in items])
    return batch


def test_a_causal_lm_inside_a_lightning_module_passes_and_matches_its_own_loss(tmp_path):
    samples = hf.lm_samples(12)
    train = DataLoader(KeyedSet(samples, extra=False), batch_size=4, collate_fn=_pad_with_extra)
    val = DataLoader(KeyedSet(samples[:6], extra=False), batch_size=4, collate_fn=_pad_with_extra)
    module = CausalModule()
    cb = InfluenceCallback(tuning=FAST, scores_filename=None, solver="datainf")
    _trainer(tmp_path, [cb]).fit(module, train, val)
    report = cb.preflight_report
    assert report is not None and report.loss_reference == "the model's own loss" and report.loss_error < 1e-4
    assert report.gradient_error and max(report.gradient_error.values()) < 1e-3
    assert cb.result is not None and torch.isfinite(cb.result.scores).all()


def test_a_training_step_with_another_loss_fails_in_setup(tmp_path, blobs):
    train, val = (_float32(d) for d in blobs)
    _fails_in_setup(tmp_path, Counting(loss="smoothed"), DataLoader(train, batch_size=8), DataLoader(val, batch_size=8),
                    PreflightError, r"training_step.*loss_fn")


def test_the_training_step_reference_leaves_the_module_untouched(tmp_path, blobs):
    train, val = (_float32(d) for d in blobs)
    module = Counting()
    cb = InfluenceCallback(tuning=FAST, scores_filename=None)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _trainer(tmp_path, [cb], max_steps=1).fit(module, DataLoader(train, batch_size=8), DataLoader(val, batch_size=8))
    assert cb.preflight_report.loss_reference == "training_step" and cb.preflight_report.loss_error < 1e-5
    assert module.training_steps == 1  # the one real step; the check's calls ran on a sandbox
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())  # it did train


def test_an_oversized_gradient_store_fails_in_setup_with_the_options(tmp_path):
    """No LoRA, params='auto' on a 1M-parameter model, 12k training samples, and a per-validation
    matrix (which reads the training gradients again, so they are stored): ~48 GB of gradients
    on a machine with less RAM: refused before training, with every way out."""
    from tasks import TensorPairs

    g = torch.Generator().manual_seed(0)
    train = TensorPairs(torch.randn(12_000, 1000, generator=g), torch.randint(0, 10, (12_000,), generator=g))
    val = TensorPairs(torch.randn(50, 1000, generator=g), torch.randint(0, 10, (50,), generator=g))
    module = Counting(d_in=1000, hidden=1000, classes=10)
    cb = _fails_in_setup(tmp_path, module, DataLoader(train, batch_size=64), DataLoader(val, batch_size=64),
                         PreflightError, r"would not fit", per_validation=True)
    del cb
    for options in (AuditOptions(per_validation=True), AuditOptions(method="standard")):
        with pytest.raises(PreflightError) as info:
            check(module, train, val, options)
        message = str(info.value)
        for option in ("max_memory=", "projection=", "params=", "grad_dtype="):
            assert option in message, option
        assert "12,000 samples" in message
    # the default fvm audit scores each batch as it is gathered: no store, and it fits
    report = check(module, train, val, AuditOptions())
    assert report.streamed and report.store_bytes == 0
    assert report.peak_bytes < 2 * 50 * report.numbers_per_sample * 4 + (1 << 30)
    assert "no gradient store" in report.summary()


class FunctionalReuse(nn.Module):
    """Uses its first layer's weight a second time outside the layer (invisible to the hooks)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = torch.tanh(nn.functional.linear(h, self.fc.weight))
        return self.head(h)


def test_the_gradient_check_catches_a_parameter_used_outside_its_layer(blobs):
    train, val = blobs
    with pytest.raises(PreflightError, match=r"autograd.*fc\.weight"):
        check(FunctionalReuse().double(), train, val, AuditOptions())
    report = check(mlp(), train, val, AuditOptions())  # a clean model passes, with its figures
    assert report.samples == 3 and set(report.gradient_error) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert report.streamed and report.store_bytes == 0  # fvm scores each batch as it is gathered
    stored = check(mlp(), train, val, AuditOptions(method="standard"))
    assert not stored.streamed and stored.store_bytes == 60 * (8 * 16 + 16 + 16 * 3 + 3) * 8
    # a per-validation matrix keeps the store and adds its copy of the validation gradients and a
    # chunk of query directions (here all 60 rows) to the solve's side of the peak
    matrix = check(mlp(), train, val, AuditOptions(per_validation=True))
    parts = matrix.peak_parts
    assert not matrix.streamed and parts["per_validation"] == (20 + 60) * matrix.numbers_per_sample * 8
    assert stored.peak_parts["per_validation"] == 0
    assert matrix.peak_bytes >= parts["val"] + parts["store"] + parts["solve"] + parts["per_validation"]


def test_a_subset_sampler_is_honoured(blobs):
    """Train and validation drawn from one dataset by samplers: only the training ids are
    scored, exactly as an audit of that subset, and the validation ids are not scored."""
    train, val = blobs
    full = ConcatDataset([train, val])
    train_ids, val_ids = list(range(0, 60)), list(range(60, 80))
    model = mlp()
    options = dict(method="vm", tuning=FAST, solver="exact", seed=3)
    got = audit(model, DataLoader(full, batch_size=16, sampler=SubsetRandomSampler(train_ids)),
                DataLoader(full, batch_size=16, sampler=SubsetRandomSampler(val_ids)), **options)
    expected = audit(model, train, val, **options)
    assert got.scores.shape == (80,) and torch.isnan(got.scores[60:]).all()
    torch.testing.assert_close(got.scores[:60], expected.scores)
    assert torch.equal(got.ranking, expected.ranking) and torch.equal(got.audited, torch.arange(60))
    assert got.preflight is not None and any("sampler" in n for n in got.preflight.notes)


def test_the_callback_honours_the_training_loaders_sampler_and_says_when_training_is_trimmed(tmp_path, blobs):
    train, val = (_float32(d) for d in blobs)
    picked = list(range(10, 50))
    cb = InfluenceCallback(tuning=FAST, scores_filename=None, device="cpu")
    with pytest.warns(UserWarning, match="limit_train_batches=0.5"):
        _trainer(tmp_path, [cb], limit_train_batches=0.5).fit(
            Counting(), DataLoader(train, batch_size=8, sampler=SubsetRandomSampler(picked)),
            DataLoader(val, batch_size=8))
    assert cb.result.scores.shape == (60,)
    assert torch.isfinite(cb.result.scores[picked]).all() and torch.isnan(cb.result.scores[:10]).all()
    assert sorted(cb.result.ranking.tolist()) == picked


@pytest.mark.parametrize("limit, says", [(0.5, "validation sees only part"), (0, "validation is off")])
def test_a_limited_validation_is_named_since_the_audit_uses_every_validation_sample(tmp_path, blobs, limit, says):
    train, val = (_float32(d) for d in blobs)
    cb = InfluenceCallback(tuning=FAST, scores_filename=None, device="cpu")
    with pytest.warns(UserWarning, match=f"limit_val_batches={limit}: {says}.*all {len(val)} samples"):
        _trainer(tmp_path, [cb], limit_val_batches=limit).fit(Counting(), DataLoader(train, batch_size=8),
                                                                DataLoader(val, batch_size=8))
    assert cb.result is not None


def test_the_readme_options_are_keywords_of_both_entry_points():
    """The README's options table: each option is a keyword of audit() and of the callback, but
    those it marks "callback only" (of the callback alone)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| option | default | meaning |"):]
    table = table[:table.index("\n\n")]
    both, callback_only = set(), set()
    for line in table.splitlines()[2:]:
        cells = line.split("|")
        names = set(re.findall(r"`([a-z_]+)`", cells[1]))
        (callback_only if cells[3].strip().startswith("callback only") else both).update(names)
    assert len(both) > 10 and callback_only
    for entry, wanted in ((audit, both), (InfluenceCallback.__init__, both | callback_only)):
        missing = wanted - set(inspect.signature(entry).parameters)
        assert not missing, (entry.__qualname__, missing)
    assert not callback_only & set(inspect.signature(audit).parameters)


def test_the_memory_plan_counts_the_solver_form_its_options_choose():
    """curvature.solver_options reach the solver the plan asks for its peak: hyperinf forced to
    its Schulz form on a 64 x 65 block with 3 curvature samples keeps a d x d inverse, which the
    default (the exact low-rank form, N·r <= d) does not: the report's solve bytes say so."""
    from lightning_influence.memory import solve_bytes
    from lightning_influence.params import select_blocks

    train, val = gaussian_blobs(20, 3, 64)
    model = nn.Sequential(nn.Linear(64, 3)).double()
    default = check(model, train, val, AuditOptions(method="vm", params="trainable"))
    schulz = check(model, train, val, AuditOptions(method="vm", params="trainable",
                                                   curvature={"solver_options": {"form": "schulz"}}))
    blocks = select_blocks(model, "trainable")
    assert default.solve_bytes == solve_bytes(blocks, "hyperinf", 3, None, 8)
    assert schulz.solve_bytes == solve_bytes(blocks, "hyperinf", 3, None, 8, {"form": "schulz"})
    assert schulz.solve_bytes != default.solve_bytes
