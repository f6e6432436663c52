"""Every Lightning precision that runs on the CPU (32-true, 64-true, bf16-mixed, bf16-true,
16-true; float16 autocast, the rule of GPU 16-mixed, through ``check`` under
``torch.autocast``): a correct PEFT-LoRA model passes the pre-flight check, trains and is
audited; a parameter used outside its layer still fails, in every precision; the per-sample
gradients agree with autograd on each sample alone within what the precision's rounding
allows (precision.py); a bf16-mixed audit ranks as a float32 audit does; the solve and the
scores are computed in full precision under autocast."""
from __future__ import annotations

import copy

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from helpers import digits_mlp
from lightning_influence import AuditOptions, InfluenceCallback, audit
from lightning_influence.audit import prepare, score
from lightning_influence.exceptions import PreflightError
from lightning_influence.gradients import gradient_mode, per_sample_gradients
from lightning_influence.params import select_blocks
from lightning_influence.precision import MAX_ROUNDING_ERROR, compute_tolerance, full_precision, rounding_eps
from lightning_influence.preflight import check
from tasks import noisy_digits

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*validation tuning"),
              pytest.mark.filterwarnings("ignore:.*precision"),
              pytest.mark.filterwarnings("ignore:.*tuning")]
CPU_PRECISIONS = ["32-true", "64-true", "bf16-mixed", "bf16-true", "16-true"]


class Net(nn.Module):
    """64-32-10 MLP; ``reuse``: its first weight is used a second time outside its layer."""

    def __init__(self, reuse: bool = False) -> None:
        super().__init__()
        hidden = 64 if reuse else 32  # a reused weight must be square
        self.fc1, self.fc2, self.reuse = nn.Linear(64, hidden), nn.Linear(hidden, 10), reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if self.reuse:  # invisible to the Linear hooks: the audit's gradient misses this part
            h = torch.tanh(nn.functional.linear(h, self.fc1.weight))
        return self.fc2(h)


def lora_net(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)  # LoRA B starts at zero: make every gradient non-trivial
    return model


class Module(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.training_steps = net, 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)  # Adam's eps=1e-8 is 0 in float16 (16-true)


@pytest.fixture(scope="module")
def digits():
    split = noisy_digits(0.2)
    return Subset(split.train, range(96)), Subset(split.val, range(32))


def _trainer(tmp_path, precision, callbacks, **extra):
    return L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, precision=precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=callbacks, **extra)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_a_lora_model_passes_the_check_trains_and_is_audited(tmp_path, digits, precision):
    train, val = digits
    module = Module(lora_net())
    cb = InfluenceCallback(tuning={"steps": 4}, scores_filename=None, solver="datainf")
    _trainer(tmp_path, precision, [cb], max_epochs=1).fit(module, DataLoader(train, batch_size=32),
                                                          DataLoader(val, batch_size=32))
    assert module.training_steps == 3  # it trained
    report = cb.preflight_report
    assert report is not None and report.loss_reference == "training_step" and len(report.gradient_error) == 4
    assert cb.result is not None and bool(torch.isfinite(cb.result.scores).all())
    assert bool(torch.isfinite(cb.result.influence).all()) and float(cb.result.influence.std()) > 0


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_a_parameter_used_outside_its_layer_fails_in_every_precision(tmp_path, digits, precision):
    train, val = digits
    torch.manual_seed(0)
    module = Module(Net(reuse=True))
    cb = InfluenceCallback(tuning={"steps": 4}, scores_filename=None, params=["net.fc1.weight"])
    with pytest.raises(PreflightError, match=r"autograd.*fc1\.weight"):
        _trainer(tmp_path, precision, [cb], max_epochs=1).fit(module, DataLoader(train, batch_size=32),
                                                              DataLoader(val, batch_size=32))
    assert module.training_steps == 0  # refused before the first training step


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_per_sample_gradients_match_autograd_on_each_sample_alone_within_the_rounding(digits, precision):
    """Independent of the check: each sample alone, through the plugin's own conversion and
    autocast, with the training loss written here; the reused weight's error is of order 1."""
    plugin = L.Trainer(accelerator="cpu", precision=precision, logger=False).strategy.precision_plugin
    x, y = next(iter(DataLoader(digits[0], batch_size=6)))
    for net, params, expect_ok in [(lora_net(), "auto", True), (Net(reuse=True), ["fc1.weight"], False)]:
        model = plugin.convert_module(copy.deepcopy(net))
        bx, by = plugin.convert_input((x, y))
        blocks = select_blocks(model, params)
        with plugin.forward_context(), gradient_mode(model, blocks):
            got, _ = per_sample_gradients(model, blocks, (bx, by))
            tol = compute_tolerance(blocks[0].param.dtype, "cpu")
            for b in blocks:
                want = torch.stack([b.to_matrix(torch.autograd.grad(
                    nn.functional.cross_entropy(model(bx[i:i + 1]), by[i:i + 1]), b.param)[0].unsqueeze(0))[0]
                    for i in range(len(by))])
                error = _rel(got[b.name], want)
                assert (error <= tol) if expect_ok else (error > 3 * MAX_ROUNDING_ERROR), (b.name, error, tol)


def test_the_rule_follows_the_compute_dtype():
    """bf16-mixed computes in bfloat16 with float32 parameters; 16-mixed in float16."""
    f32 = compute_tolerance(torch.float32, "cpu")
    assert f32 == pytest.approx(1e-3, rel=0.05) and compute_tolerance(torch.float64, "cpu") < 1e-11
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            assert rounding_eps(torch.float32, "cpu") == torch.finfo(dtype).eps
            assert compute_tolerance(torch.float32, "cpu") == MAX_ROUNDING_ERROR
            with full_precision():
                assert rounding_eps(torch.float32, "cpu") == torch.finfo(torch.float32).eps
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert compute_tolerance(dtype, "cpu") == MAX_ROUNDING_ERROR


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_check_under_half_precision_autocast_passes_lora_and_catches_reuse(digits, dtype):
    """float16 autocast is GPU 16-mixed's arithmetic (Lightning maps CPU 16-mixed to bfloat16)."""
    train, val = digits
    with torch.autocast("cpu", dtype=dtype):
        report = check(lora_net(), train, val, AuditOptions())
        assert 0 < max(report.gradient_error.values()) <= MAX_ROUNDING_ERROR  # rounding, and accepted
        torch.manual_seed(0)
        with pytest.raises(PreflightError, match=r"fc1\.weight"):
            check(Net(reuse=True), train, val, AuditOptions(params=["fc1.weight"]))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_a_bf16_mixed_audit_ranks_as_a_float32_audit(tmp_path, digits):
    train, val = digits
    module = Module(lora_net())
    _trainer(tmp_path, "32-true", [], max_epochs=3).fit(module, DataLoader(train, batch_size=32))
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        cb = InfluenceCallback(tuning={"steps": 10}, scores_filename=None, solver="datainf")
        results[precision] = cb.run(_trainer(tmp_path, precision, [cb]), module,
                                    train_data=DataLoader(train, batch_size=32),
                                    val_data=DataLoader(val, batch_size=32))
    full, half = results["32-true"], results["bf16-mixed"]
    assert max(half.preflight.gradient_error.values()) > 1e-4  # autocast was on: bfloat16 rounding
    assert _spearman(half.influence, full.influence) > 0.9
    assert _spearman(half.scores, full.scores) > 0.9


def test_the_solve_and_scores_run_in_full_precision_under_autocast(digits):
    """The callback keeps autocast on around the audit (the model computes as it trained):
    the solve and the scores must not be rounded to bfloat16 (identical with and without it)."""
    train, val = digits
    options = AuditOptions(method="standard", solver="exact")
    prepared = prepare(lora_net(), train, val, options)
    try:
        plain = score(prepared, options).influence
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = score(prepared, options).influence
    finally:
        prepared.close()
    assert torch.equal(plain, under)


def test_audit_inside_a_users_autocast_region_still_tunes():
    """``torch.autocast`` caches each weight's bfloat16 copy for its whole region unless told not to:
    the tuning's in-place steps would then change nothing the forward passes see."""
    split = noisy_digits(rate=0.2, seed=0)
    model = digits_mlp(split)
    kw = dict(method="fvm", params="trainable", batch_size=128, tuning={"budget": 0.5})
    plain = audit(model, split.train, split.val, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cache_enabled=True, torch's default
        cached = audit(model, split.train, split.val, **kw)
    probe = [v for k, v in cached.tuning.items() if k.startswith("probe_loss@")]
    assert len(set(probe)) > 1  # the probe sees its steps
    drop, drop32 = (r.tuning["val_loss_trained"] - r.tuning["val_loss_tuned"] for r in (cached, plain))
    assert drop > 0.5 * drop32 > 0
    assert torch.is_autocast_enabled("cpu") is False  # the user's region is theirs again after it


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_detection_metrics_are_not_rounded_to_the_half_precision_default_dtype(tmp_path, digits, precision):
    """Lightning's half-true precisions make bfloat16/float16 the default dtype around the audit:
    ROC AUC and AP must still be float32 figures (against sklearn on the same scores)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    train, val = digits
    noisy = torch.zeros(len(train), dtype=torch.bool)
    noisy[::5] = True
    module = Module(lora_net())
    cb = InfluenceCallback(tuning={"steps": 4}, scores_filename=None, solver="datainf", noisy=noisy)
    _trainer(tmp_path, precision, [cb], max_epochs=1).fit(module, DataLoader(train, batch_size=32),
                                                          DataLoader(val, batch_size=32))
    scores = cb.result.scores.double().numpy()
    assert cb.result.metrics["auroc"] == pytest.approx(roc_auc_score(noisy.numpy(), scores), abs=1e-6)
    assert cb.result.metrics["ap"] == pytest.approx(average_precision_score(noisy.numpy(), scores), abs=1e-6)
    assert torch.get_default_dtype() == torch.float32
