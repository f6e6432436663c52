"""Validation tuning that reaches (and proves it reached) a validation minimum, the budget in
passes over the validation set, the learning-rate probe, and the rankings side by side."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lightning_influence import audit
from lightning_influence.config import TuningConfig
from lightning_influence.metrics import detection_metrics
from lightning_influence.tuning import MAX_GRAD_Z, budget_epochs, gradient_noise_test, probe_lr, verify
from tasks import TensorPairs

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
              pytest.mark.filterwarnings("ignore:.*lissa did not converge")]


def _full_val(model, data):
    with torch.no_grad():
        logits = model(data.x)
        return float(nn.functional.cross_entropy(logits, data.y)), float((logits.argmax(-1) == data.y).double().mean())


def test_default_tuning_reaches_a_validation_minimum_and_says_so(digits):
    split, model = digits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = audit(model, split.train, split.val, method="fvm", params="trainable", noisy=split.noisy,
                       batch_size=128)
    t = result.tuning
    loss_star, acc_star = _full_val(model, split.val)  # θ* figures measured independently of the audit
    assert t["val_loss_trained"] == pytest.approx(loss_star, rel=1e-5)
    assert t["val_acc_trained"] == pytest.approx(acc_star)
    assert t["val_loss_tuned"] < 0.5 * t["val_loss_trained"]  # clearly below, on the full validation set
    assert t["val_acc_tuned"] > t["val_acc_trained"]
    # SAM's minimum keeps a clean gradient (about H ε): beyond the noise (z > 3 on this model) but
    # shrunk to a third of its θ* value, and the figure says so
    assert t["at_minimum"] == 1.0 and (t["grad_z"] < MAX_GRAD_Z or t["grad_ratio"] <= 0.5)
    assert math.isnan(t["sharpness"])  # one-pass SAM measures no clean loss beside the perturbed one
    assert not [w for w in caught if "did not reach a validation minimum" in str(w.message)]
    # the default budget: half a training epoch of compute, n / (2m) passes of one-pass SAM steps,
    # the checks (loss at θ*, the gradient check, the probe) counted inside it
    n, m = len(split.train), len(split.val)
    assert TuningConfig().budget == 0.5 and TuningConfig().sam == "momentum"
    assert t["budget_epochs"] == pytest.approx(0.5 * n / m)
    assert 0 < t["check_epochs"] < 0.25
    left = t["budget_epochs"] - t["check_epochs"] * n / m
    assert t["planned_epochs"] == pytest.approx(left, abs=1 / t["batches_per_pass"])
    assert t["epochs"] <= t["planned_epochs"] + 1e-9
    steps_cost = t["steps"] * TuningConfig().batch_size / n  # one forward-backward pass per sample
    assert t["check_epochs"] + steps_cost <= 0.5 + 2 * TuningConfig().batch_size / n  # within a step of the budget


def test_the_checks_at_theta_star_forward_each_validation_sample_once(digits):
    """The full-set loss at θ* takes the check subset's losses from its gradient pass: forward
    passes of the other samples only, and the same figures as the whole set forwarded."""
    from lightning_influence.data import sequential_loader
    from lightning_influence.tuning.probe import grad_check_ids
    from lightning_influence.tuning.steps import theta_star_checks

    split, model = digits
    m = len(split.val)
    check_ids = grad_check_ids(m, seed=0)
    others = [i for i in range(m) if i not in set(check_ids)]
    params = [p for p in model.parameters() if p.requires_grad]
    rows: list[int] = []
    handle = model.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[0]))
    try:
        figures, check, _ = theta_star_checks(model, params, sequential_loader(split.val, 64, others),
                                              sequential_loader(split.val, 8, check_ids), None, lambda b: b, params)
    finally:
        handle.remove()
    assert sum(rows) == m and len(check_ids) == 32 < m  # every sample once, the subset's with its gradient
    loss_star, acc_star = _full_val(model, split.val)
    assert figures.val_loss_trained == pytest.approx(loss_star, rel=1e-6)
    assert figures.val_acc_trained == pytest.approx(acc_star)
    assert check is not None and check[2] == pytest.approx(  # the probe's base loss: the subset's own
        float(nn.functional.cross_entropy(model(split.val.x[check_ids]), split.val.y[check_ids])), rel=1e-6)


def test_tuning_that_does_not_reach_a_minimum_warns_and_names_the_fix(digits):
    split, model = digits
    with pytest.warns(RuntimeWarning, match=r"did not reach a validation minimum.*raise tuning.steps"):
        result = audit(model, split.train, split.val, method="vm", params="trainable", batch_size=128,
                       tuning={"steps": 2, "lr": 1e-7})
    assert result.tuning["at_minimum"] == 0.0
    assert result.tuning["val_loss_tuned"] == pytest.approx(result.tuning["val_loss_trained"], rel=1e-3)
    # θ̃ ≈ θ* here: the gradient figure against per-sample autograd on the untouched model
    per, was = [], model.training
    model.eval()
    for i in range(len(split.val)):
        x, y = split.val[i]
        loss = nn.functional.cross_entropy(model(x[None]), torch.as_tensor(y)[None])
        per.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    model.train(was)
    per = torch.stack(per).double()
    mean, centred = per.mean(0), per - per.mean(0)
    trace = float(centred.pow(2).sum()) / (len(per) - 1)
    gram = centred @ centred.T
    trace_sq = float(gram.pow(2).sum() - gram.diagonal().pow(2).sum()) / (len(per) * (len(per) - 1))
    assert len(per) <= 512  # every pair counts here
    z = (len(per) * float(mean.pow(2).sum()) - trace) / math.sqrt(2 * trace_sq)
    assert result.tuning["grad_z"] == pytest.approx(z, rel=1e-3)
    assert result.tuning["grad_noise_ratio"] == pytest.approx(float(mean.norm()) / math.sqrt(trace / len(per)),
                                                              rel=1e-3)
    assert result.tuning["grad_z"] > MAX_GRAD_Z  # θ* is no validation minimum: a descent direction beyond the noise


def test_gradient_noise_test_tells_a_descent_direction_from_noise():
    """Per-sample gradients with zero mean give z about 0 (within a few units), the same
    gradients shifted by a mean a few noise-norms long a large z; the figures do not depend on
    how the parameters are split into blocks, and a shard per rank (summed) gives the same."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(400, 50, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, 50, dtype=torch.float64)
    noise = noise - noise.mean(0)
    _, ratio0, z0 = gradient_noise_test([noise[:, :20], noise[:, 20:]], 400)
    assert z0 < 0 and ratio0 == pytest.approx(0.0, abs=1e-9)  # the empirical minimum: ḡ = 0
    fresh = torch.randn(400, 50, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, 50, dtype=torch.float64)
    assert abs(gradient_noise_test([fresh], 400)[2]) < 3  # a stationary point of the expected loss
    shifted = fresh + 0.5 * torch.ones(50, dtype=torch.float64) / math.sqrt(50) * 5
    norm, ratio, z = gradient_noise_test([shifted[:, :7], shifted[:, 7:]], 400)
    assert z > 10 and ratio > 3 and norm == pytest.approx(float(shifted.mean(0).norm()), rel=1e-12)
    assert gradient_noise_test([shifted], 400)[2] == pytest.approx(z, rel=1e-9)
    # two "ranks" holding 200 samples each, their all-reduce a sum through a barrier
    import threading

    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def rank(r):
        def all_reduce_sum(t):
            slots[r] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        out[r] = gradient_noise_test([shifted[200 * r:200 * (r + 1), :7], shifted[200 * r:200 * (r + 1), 7:]], 400,
                                     all_reduce_sum)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert out[0] == out[1]  # every rank gets the same figures
    assert out[0][0] == pytest.approx(norm, rel=1e-12) and out[0][1] == pytest.approx(ratio, rel=1e-12)
    assert out[0][2] == pytest.approx(z, rel=0.2)  # tr Σ² from within-rank pairs only: an estimate of the same


def test_gradient_check_on_a_causal_lm_matches_autograd_of_the_models_own_loss():
    """A PEFT GPT-2 on padded, prompt-masked token batches: the audit's gradient figures at θ̃
    (≈ θ*, one step at lr 1e-12) against autograd of ``model(**sample).loss`` on each
    validation sample alone."""
    from torch.utils.data import DataLoader

    import hf_models as hf
    from lightning_influence.params import select_blocks

    model = hf.with_lora(hf.gpt2(), "CAUSAL_LM", ["c_attn"]).eval()
    train, val = hf.lm_samples(12, seed=1), hf.lm_samples(10, seed=2)
    loader = lambda data: DataLoader(data, batch_size=4, collate_fn=hf.pad)  # noqa: E731
    result = audit(model, loader(train), loader(val), method="vm", params="auto", batch_size=4,
                   tuning={"steps": 1, "lr": 1e-12, "batch_size": 4})
    params = [b.param for b in select_blocks(model, "auto")]
    per = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(model(**hf.pad([v])).loss, params)])
                       for v in val]).double()
    mean, centred = per.mean(0), per - per.mean(0)
    trace = float(centred.pow(2).sum()) / (len(per) - 1)
    gram = centred @ centred.T
    trace_sq = float(gram.pow(2).sum() - gram.diagonal().pow(2).sum()) / (len(per) * (len(per) - 1))
    z = (len(per) * float(mean.pow(2).sum()) - trace) / math.sqrt(2 * trace_sq)
    assert result.tuning["grad_norm_tuned"] == pytest.approx(float(mean.norm()), rel=1e-4)
    assert result.tuning["grad_noise_ratio"] == pytest.approx(float(mean.norm()) / math.sqrt(trace / len(per)),
                                                              rel=1e-4)
    assert result.tuning["grad_z"] == pytest.approx(z, rel=1e-4)


def test_gradient_beyond_its_sampling_noise_is_not_a_minimum():
    stats = {"steps": 10.0, "val_loss_trained": 1.0, "planned_epochs": 1.0, "lr": 0.1}
    with pytest.warns(RuntimeWarning,
                      match=r"gradient at θ̃ is 2.5× the norm sampling noise alone gives it, 5.0 standard"):
        out = verify(stats, TuningConfig(), 0.5, 0.9, 0.1, noise_ratio=2.5, grad_z=5.0)
    assert out["at_minimum"] == 0.0 and out["grad_z"] == 5.0
    # fvm (SAM's perturbed minimum): a clean gradient shrunk to half its θ* value passes, vm does not
    shrunk = {**stats, "grad_norm_start": 0.25}
    assert verify({**shrunk, "sharpness_aware": 1.0}, TuningConfig(), 0.5, 0.9, 0.1, 2.5, 5.0)["at_minimum"] == 1.0
    with pytest.warns(RuntimeWarning, match="sampling noise"):
        assert verify({**shrunk, "sharpness_aware": 0.0}, TuningConfig(), 0.5, 0.9, 0.1, 2.5, 5.0)["at_minimum"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verify(stats, TuningConfig(), 0.5, 0.9, 0.1, noise_ratio=1.2, grad_z=1.0)["at_minimum"] == 1.0


def test_budget_is_in_passes_over_the_validation_set_and_stops_early(digits):
    split, model = digits
    m = len(split.val)
    cfg = TuningConfig(epochs=1.5, batch_size=30)
    result = audit(model, split.train, split.val, method="fvm", params="trainable", tuning=cfg)
    assert result.tuning["batches_per_pass"] == math.ceil(m / 30)
    assert result.tuning["steps"] == math.ceil(1.5 * math.ceil(m / 30))
    # a loose tolerance stops after the first pass whose loss fell by less than half
    early = audit(model, split.train, split.val, method="fvm", params="trainable",
                  tuning=TuningConfig(epochs=10, batch_size=30, tol=0.5))
    assert early.tuning["stopped_early"] == 1.0 and early.tuning["epochs"] < 10
    assert early.tuning["epochs"] == int(early.tuning["epochs"])  # it stops at the end of a pass
    # the default: half a training epoch of one-pass steps, n / (2m) passes, for vm and fvm alike
    assert budget_epochs(TuningConfig(), 1000, 300, True) == pytest.approx(1000 / 600)
    assert budget_epochs(TuningConfig(), 1000, 300, False) == pytest.approx(1000 / 600)
    assert budget_epochs(TuningConfig(budget=1.0, sam="two_pass"), 1000, 300, True) == pytest.approx(1000 / 600)
    assert budget_epochs(TuningConfig(budget=1.0), 1000, 300, False) == pytest.approx(1000 / 300)
    assert budget_epochs(TuningConfig(), 10 ** 6, 100, True) == 10.0  # capped
    assert budget_epochs(TuningConfig(), 50, 300, True) == 0.5  # at least half a pass


def test_auto_budget_weights_samples_by_their_size():
    """Padded text: a validation set of long sentences costs more per sample than a training set
    of short phrases, and the auto budget (one training epoch of compute) plans fewer passes."""
    from torch.utils.data import DataLoader

    from helpers import pad_collate
    from lightning_influence.tuning import relative_sample_cost

    class Sized(torch.utils.data.Dataset):
        def __init__(self, lengths):
            self.lengths = lengths

        def __len__(self):
            return len(self.lengths)

        def __getitem__(self, i):
            return {"input_ids": torch.ones(self.lengths[i], dtype=torch.long), "labels": torch.tensor(0)}

    short, long_ = Sized([4] * 40), Sized([12] * 10)
    ratio = relative_sample_cost(DataLoader(short, collate_fn=pad_collate), DataLoader(long_, collate_fn=pad_collate))
    assert ratio == pytest.approx(4 / 12)
    same = TensorPairs(torch.zeros(30, 5), torch.zeros(30, dtype=torch.long))
    assert relative_sample_cost(same, TensorPairs(torch.zeros(7, 5), torch.zeros(7, dtype=torch.long))) == 1.0


def test_learning_rate_probe_is_scale_free():
    """Scaling the loss by c scales the gradient by c: the probe's Polyak-step grid scales by
    1/c, so the step it takes (lr x gradient) is the same."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(8, 3).double()
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    ce = lambda c: (lambda mod, b: c * nn.functional.cross_entropy(mod(b[0]), b[1], reduction="none"))  # noqa: E731
    before = [p.detach().clone() for p in model.parameters()]
    lr1, curve1 = probe_lr(model, list(model.parameters()), batches, ce(1.0))
    lr10, curve10 = probe_lr(model, list(model.parameters()), batches, ce(10.0))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # θ restored exactly
    assert lr10 == pytest.approx(lr1 / 10, rel=1e-6)
    assert min(curve1.values()) < curve1["0"]  # the chosen step lowers the probe loss


def test_learning_rate_probe_stops_one_step_past_the_valley_with_the_full_grids_choice():
    """Along the probe's line a least-squares loss is a parabola (one valley): the probe stops
    at the first grid point above the lowest so far and picks the step the whole grid picks."""
    from lightning_influence.tuning.probe import PROBE_FACTOR

    g = torch.Generator().manual_seed(24)
    x, y = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randn(64, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(24)
    model = nn.Linear(8, 2).double()
    params = list(model.parameters())
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    mse = lambda mod, b: (mod(b[0]) - b[1]).pow(2).sum(1)  # noqa: E731
    lr, curve = probe_lr(model, params, batches, mse)
    # the whole grid by hand: η₀·4^-k, k = 3 .. -1, around the Polyak step η₀ = L / ‖g‖²
    loss = torch.cat([mse(model, b) for b in batches]).mean()
    grads = torch.autograd.grad(loss, params)
    eta0 = float(loss) / sum(float(t.pow(2).sum()) for t in grads)
    grid = [eta0 * 4.0 ** -k for k in range(3, -2, -1)]
    values = []
    with torch.no_grad():
        for eta in grid:
            stepped = [p - eta * t for p, t in zip(params, grads)]
            values.append(float(((x @ stepped[0].T + stepped[1]) - y).pow(2).sum(1).mean()))
    best = min(range(len(grid)), key=values.__getitem__)
    assert lr == pytest.approx(PROBE_FACTOR * grid[best], rel=1e-9)
    assert len(curve) - 1 == min(best + 2, len(grid))  # the points up to one past the valley, no more
    # this draw's point past the valley is still below the loss at θ: only the valley rule stops there
    assert best + 2 <= len(grid) and values[best + 1] < float(loss)


def test_gradient_check_estimates_the_full_gradient_norm_without_the_subset_noise():
    """The yardstick at θ* is measured on a small subset: the norm of the subset's mean gradient
    is inflated by sampling noise, the cross-batch estimate is not (it is the mean inner product
    of per-sample gradients from different batches, computed exactly here)."""
    from lightning_influence.tuning import mean_gradient

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
    model = nn.Linear(6, 3).double()
    params = list(model.parameters())
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    ce = lambda mod, b: nn.functional.cross_entropy(mod(b[0]), b[1], reduction="none")  # noqa: E731
    grads, loss, count, sq = mean_gradient(model, params, batches, ce, params)
    per = [torch.cat([t.flatten() for t in torch.autograd.grad(ce(model, (x[i:i + 1], y[i:i + 1])).sum(), params)])
           for i in range(32)]
    cross = sum(float(per[i] @ per[j]) for i in range(32) for j in range(32) if i // 8 != j // 8)
    assert sq == pytest.approx(cross / (32 * 32 - 4 * 64), rel=1e-9)
    mean = torch.stack(per).mean(0)
    assert torch.allclose(torch.cat([t.flatten() for t in grads]), mean)
    assert count == 32 and loss == pytest.approx(float(ce(model, (x, y)).mean().detach()))
    assert all(p.grad is None for p in params)
    # the probe reuses a measured gradient and loss: the same learning rate
    assert probe_lr(model, params, batches, ce, grads=grads, base=loss)[0] == pytest.approx(
        probe_lr(model, params, batches, ce)[0], rel=1e-9)


def test_gradient_yardstick_is_unbiased_for_the_full_set_gradient_norm():
    """With ``population``, the subset estimate targets what the exact pass at θ̃ measures: the
    norm of the mean gradient over the *whole* validation set, sampling term included (the
    cross-batch estimate alone leaves that term out and is often ≤ 0 on a 32-sample subset,
    which left the check without a yardstick). Checked against per-sample autograd over 200
    samples: exact when the batches cover the set, unbiased over random 32-sample subsets."""
    from lightning_influence.tuning import mean_gradient

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (200,), generator=g)
    model = nn.Linear(6, 3).double()
    params = list(model.parameters())
    ce = lambda mod, b: nn.functional.cross_entropy(mod(b[0]), b[1], reduction="none")  # noqa: E731
    per = torch.stack([torch.cat([t.flatten()
                                  for t in torch.autograd.grad(ce(model, (x[i:i + 1], y[i:i + 1])).sum(), params)])
                       for i in range(200)])
    truth = float(per.mean(0).pow(2).sum())
    whole = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 200, 50)]
    assert mean_gradient(model, params, whole, ce, params, population=200)[3] == pytest.approx(truth, rel=1e-9)
    estimates = []
    for _ in range(400):
        ids = torch.randperm(200, generator=g)[:32]
        batches = [(x[ids[i:i + 8]], y[ids[i:i + 8]]) for i in range(0, 32, 8)]
        estimates.append(mean_gradient(model, params, batches, ce, params, population=200)[3])
    est = torch.tensor(estimates)
    assert abs(float(est.mean()) - truth) < 4 * float(est.std()) / 20  # unbiased: within 4 standard errors
    noisy_only = mean_gradient(model, params, batches, ce, params)[3]  # the old target, ‖E g‖² without D/M
    assert estimates[-1] > noisy_only


def test_rank_by_chooses_the_ranking_and_reports_every_ranking(digits):
    split, model = digits
    kw = dict(method="fvm", params="trainable", noisy=split.noisy, batch_size=128, top_k=30)
    default = audit(model, split.train, split.val, **kw)
    assert default.rank_by == "loss_tuned"
    assert torch.equal(default.scores, default.loss_tuned)
    assert torch.all(default.scores[default.ranking][:-1] >= default.scores[default.ranking][1:])
    by = default.metrics_by
    assert set(by) == {"influence", "loss_tuned", "loss_trained"}
    for name, values in (("influence", default.influence), ("loss_tuned", default.loss_tuned),
                         ("loss_trained", default.loss_trained)):
        assert by[name]["auroc"] == pytest.approx(detection_metrics(values, split.noisy)["auroc"])
    assert default.metrics["auroc"] == by["loss_tuned"]["auroc"]
    influence = audit(model, split.train, split.val, rank_by="influence", **kw)
    assert influence.rank_by == "influence" and torch.equal(influence.scores, influence.influence)
    assert torch.equal(influence.influence, default.influence)  # same θ̃, same influence scores
    assert influence.metrics["auroc"] == pytest.approx(by["influence"]["auroc"])
    assert audit(model, split.train, split.val, method="standard", params="trainable").rank_by == "influence"
    with pytest.raises(ValueError, match="rank_by"):
        audit(model, split.train, split.val, method="standard", rank_by="loss_tuned")
    with pytest.raises(ValueError, match="rank_by"):
        audit(model, split.train, split.val, rank_by="gradient_norm")


def test_summary_and_loggers_show_both_rankings_read_back(tmp_path):
    """Both rankings' metrics and the tuning figures reach the summary and a CSVLogger's
    metrics.csv (read back with the csv module), with the values of the result."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from lightning_influence import InfluenceCallback
    from lightning_influence.reporting import summary_text
    from test_callback import NoisyBlobs, TinyClassifier, make_trainer

    dm = NoisyBlobs()
    cb = InfluenceCallback(noisy=dm.noisy, scores_filename=None)
    logger = CSVLogger(str(tmp_path), name="csv")
    make_trainer(tmp_path, [cb], logger=logger, max_epochs=3).fit(TinyClassifier(), dm)
    result = cb.result
    assert result is not None and result.rank_by == "loss_tuned"
    with open(f"{logger.log_dir}/metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k.startswith("influence/")}
    for ranking in ("influence", "loss_tuned", "loss_trained"):
        for metric in ("auroc", "ap"):
            assert logged[f"influence/by_{ranking}/{metric}"] == pytest.approx(result.metrics_by[ranking][metric])
    assert logged["influence/auroc"] == pytest.approx(result.metrics_by["loss_tuned"]["auroc"])
    for key in ("val_loss_trained", "val_loss_tuned", "val_acc_trained", "val_acc_tuned"):
        assert logged[f"influence/{key}"] == pytest.approx(result.tuning[key])
    assert math.isnan(result.tuning["sharpness"]) and "influence/sharpness" not in logged  # one-pass SAM: unmeasured
    assert logged["influence/val_loss_tuned"] < logged["influence/val_loss_trained"]
    # the callback times the training epochs: the tuning's cost in training epochs is logged
    assert result.tuning["train_epoch_seconds"] > 0
    assert logged["influence/tuning/cost_in_training_epochs"] == pytest.approx(result.tuning["epochs_of_training"])
    text = summary_text(result)
    assert "Detection by ranking" in text and "loss_tuned <- ranking" in text and "influence (fvm)" in text
    assert f"{result.metrics_by['influence']['auroc']:.4g}" in text
    assert "Validation tuning:" in text and "training epochs" in text


def test_a_probed_step_that_raises_the_validation_loss_is_retried_from_theta_star(digits):
    """A step four times the probe's best (``probe_factor=4``) overshoots on the digits MLP: the
    full validation-set loss rises above θ*'s and the audit says so. With ``retries=1`` the
    same first attempt is undone, tuning restarts from θ* at a quarter of its learning rate,
    and the loss falls below θ*'s, without a warning."""
    split, model = digits
    before = [p.detach().clone() for p in model.parameters()]
    loss_star, _ = _full_val(model, split.val)
    runs = {}
    for retries in (0, 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = audit(model, split.train, split.val, method="fvm", params="trainable", batch_size=128,
                           tuning={"probe_factor": 4.0, "retries": retries})
        runs[retries] = (result.tuning, [str(w.message) for w in caught])
        if retries:
            from lightning_influence.reporting import summary_text
            from lightning_influence.reporting.scalars import scalar_metrics

            assert "retried 1x from θ*" in summary_text(result)
            assert scalar_metrics(result)["influence/tuning/retries"] == 1.0
    failed, failed_warnings = runs[0]
    assert failed["retries"] == 0 and failed["val_loss_trained"] == pytest.approx(loss_star, rel=1e-5)
    assert failed["val_loss_tuned"] > failed["val_loss_trained"]  # the overshoot this test is about
    assert any("did not reach a validation minimum" in w and "rose" in w for w in failed_warnings)
    retried, retried_warnings = runs[1]
    assert retried["retries"] == 1
    assert retried["val_loss_tuned_attempt_0"] == pytest.approx(failed["val_loss_tuned"], rel=1e-9)
    assert retried["lr"] == pytest.approx(failed["lr"] / 4, rel=1e-12)
    assert retried["val_loss_trained"] == failed["val_loss_trained"]  # θ* measured once, its cost kept
    assert retried["check_epochs"] == failed["check_epochs"] > 0 and retried["probe_s"] > 0
    assert retried["val_loss_tuned"] < retried["val_loss_trained"]
    assert retried["at_minimum"] == 1.0
    assert not [w for w in retried_warnings if "validation tuning" in w]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the user's model untouched


def test_a_fixed_learning_rate_is_not_retried(digits):
    """``lr`` given by the user: a rise is reported, never silently replaced by another step."""
    split, model = digits
    with pytest.warns(RuntimeWarning, match="rose"):
        result = audit(model, split.train, split.val, method="vm", params="trainable", batch_size=128,
                       tuning={"lr": 3.0, "epochs": 1, "momentum": 0.0})
    assert result.tuning["retries"] == 0 and result.tuning["val_loss_tuned"] > result.tuning["val_loss_trained"]


def test_a_second_retry_runs_when_the_first_still_raised_the_loss(digits):
    """At 16 times the probe's step, one retry (a quarter of it) still overshoots; the default
    two retries go on to a sixteenth, where the loss falls."""
    split, model = digits
    kw = dict(method="fvm", params="trainable", batch_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        once = audit(model, split.train, split.val, tuning={"probe_factor": 16.0, "retries": 1}, **kw).tuning
        twice = audit(model, split.train, split.val, tuning={"probe_factor": 16.0}, **kw).tuning
    assert TuningConfig().retries == 2
    assert once["retries"] == 1 and once["val_loss_tuned"] > once["val_loss_trained"]
    assert twice["retries"] == 2
    assert twice["val_loss_tuned_attempt_1"] == pytest.approx(once["val_loss_tuned"], rel=1e-9)
    assert twice["lr"] == pytest.approx(twice["lr_attempt_0"] / 16, rel=1e-12)
    assert twice["val_loss_tuned"] < twice["val_loss_trained"]
