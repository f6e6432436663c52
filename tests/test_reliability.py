"""Reliability (issue 6): bad input, faults and interruptions never corrupt the results or the
user's model. Every case asserts a specific, clear error or the correct handling.

Tiny float64 models and a dozen samples: the whole file runs in seconds on a CPU."""
from __future__ import annotations

import csv
import json
import os
import stat
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from helpers import mlp
from lightning_influence import AuditResult, audit
from lightning_influence.exceptions import NonFiniteGradientError
from lightning_influence.gradients import gradient_mode, per_sample_gradients
from lightning_influence.losses import BatchFormatError
from lightning_influence.params import select_blocks
from lightning_influence.solvers import ExactSolver
from tasks import TensorPairs

FAST = {"steps": 2, "batch_size": 8}



def data(n: int, seed: int = 0, classes: int = 3, d: int = 8) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    return TensorPairs(torch.randn(n, d, generator=g, dtype=torch.float64),
                       torch.randint(0, classes, (n,), generator=g))


@pytest.fixture
def small():
    return data(12), data(6, seed=1)


def run(model=None, train=None, val=None, **kw):
    kw.setdefault("tuning", FAST)
    kw.setdefault("batch_size", 4)
    return audit(model if model is not None else mlp(), train, val, **kw)


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def with_nan_rows(ds: TensorPairs, rows, value=float("nan")) -> TensorPairs:
    x = ds.x.clone()
    x[list(rows)] = value
    return TensorPairs(x, ds.y.clone())


def subset(ds: TensorPairs, keep) -> TensorPairs:
    return TensorPairs(ds.x[keep].clone(), ds.y[keep].clone())


# ----------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("method", ["fvm", "standard"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_training_samples_excluded_reported_and_harmless(small, method, value):
    train, val = small
    bad = [3, 7]
    with pytest.warns(RuntimeWarning, match=r"2 training sample\(s\) have a non-finite .*ids \[3, 7\]"):
        result = run(train=with_nan_rows(train, bad, value), val=val, method=method, solver="exact",
                     per_validation=True)
    assert result.excluded == bad
    assert torch.isnan(result.influence[bad]).all()
    assert torch.isfinite(result.influence[[i for i in range(12) if i not in bad]]).all()
    assert result.ranking[-2:].tolist() == bad  # excluded rank last
    assert torch.isnan(result.per_validation[:, bad]).all()
    # never poisoning: the other samples score exactly as if the bad ones were not in the data set
    # (for 'standard' this also proves the excluded rows never entered the training curvature)
    keep = [i for i in range(12) if i not in bad]
    clean = run(train=subset(train, keep), val=val, method=method, solver="exact", per_validation=True)
    torch.testing.assert_close(result.influence[keep], clean.influence, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.per_validation[:, keep], clean.per_validation, rtol=1e-9, atol=1e-12)


def test_nonfinite_raise_policy(small):
    train, val = small
    with pytest.raises(NonFiniteGradientError, match=r"ids \[5\]"):
        run(train=with_nan_rows(train, [5]), val=val, method="standard", nonfinite="raise")
    with pytest.raises(NonFiniteGradientError, match=r"validation sample.*ids \[2\]"):
        run(train=train, val=with_nan_rows(val, [2]), method="standard", nonfinite="raise")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        run(train=train, val=val, nonfinite="ignore")


def test_inf_loss_with_finite_gradient_is_excluded(small):
    """A loss_fn that returns inf for some samples (finite gradient): still flagged and excluded."""
    train, val = small
    x = train.x.clone()
    x[[1, 9], 0] = 50.0  # marker feature

    def loss_fn(model, batch):
        inputs, labels = batch
        ce = F.cross_entropy(model(inputs), labels, reduction="none")
        return ce + torch.where(inputs[:, 0] > 40, float("inf"), 0.0).to(ce)

    with pytest.warns(RuntimeWarning, match=r"ids \[1, 9\]"):
        result = run(train=TensorPairs(x, train.y), val=val, method="standard", loss_fn=loss_fn)
    assert result.excluded == [1, 9] and torch.isnan(result.influence[[1, 9]]).all()
    assert int(torch.isfinite(result.influence).sum()) == 10


def test_nan_gradient_with_finite_loss_is_excluded(small):
    """sqrt'(0) = inf: a finite loss whose gradient is NaN, only for the marked samples."""
    train, val = small
    x = train.x.clone()
    x[[4], 0] = 50.0

    def loss_fn(model, batch):
        inputs, labels = batch
        logits = model(inputs)
        ce = F.cross_entropy(logits, labels, reduction="none")
        marked = inputs[:, 0] > 40
        extra = torch.zeros_like(ce)
        extra[marked] = ((logits[marked] - logits[marked].detach()) ** 2).sum(1).sqrt()
        return ce + extra

    with pytest.warns(RuntimeWarning, match=r"ids \[4\]"):
        result = run(train=TensorPairs(x, train.y), val=val, method="standard", loss_fn=loss_fn)
    assert result.excluded == [4] and torch.isfinite(result.loss_trained[4])
    assert int(torch.isfinite(result.influence).sum()) == 11


def test_nonfinite_validation_samples_do_not_poison_tuning(small):
    """fvm/vm: a NaN validation sample is dropped from every tuning step (masking its loss is
    not enough: 0 * NaN activations reach the weight gradient) and from the curvature."""
    train, val = small
    with pytest.warns(RuntimeWarning, match=r"1 validation sample\(s\).*ids \[2\]"):
        result = run(train=train, val=with_nan_rows(val, [2]), method="fvm")
    clean = run(train=train, val=subset(val, [0, 1, 3, 4, 5]), method="fvm")
    assert torch.isfinite(result.influence).all() and result.excluded == []
    # the tuning batch (8) holds the whole validation set: the same 5 samples every step
    torch.testing.assert_close(result.influence, clean.influence, rtol=1e-10, atol=1e-12)


def test_every_sample_nonfinite_is_a_clear_error(small):
    train, val = small
    with pytest.raises(NonFiniteGradientError, match="every training sample"):
        quiet(run, train=with_nan_rows(train, range(12)), val=val, method="standard")
    with pytest.raises(NonFiniteGradientError, match="every validation sample"):
        quiet(run, train=train, val=with_nan_rows(val, range(6)), method="standard")
    with pytest.raises(FloatingPointError, match="non-finite validation loss.*NaN/inf"):
        quiet(run, train=train, val=with_nan_rows(val, range(6)), method="fvm")


def test_diverging_tuning_warns_and_runaway_tuning_raises(small):
    with pytest.warns(RuntimeWarning, match=r"validation tuning raised the validation loss from .* it diverged"):
        run(train=small[0], val=small[1], method="vm", tuning={"steps": 10, "lr": 1e3, "batch_size": 2})
    with pytest.raises(FloatingPointError, match=r"validation tuning diverged \(non-finite weights\); lower tuning.lr"):
        run(train=small[0], val=small[1], method="fvm", tuning={"steps": 4, "lr": 1e300})


# ----------------------------------------------------------------------------- degenerate sizes, labels


@pytest.mark.parametrize("which", ["train", "val"])
def test_empty_data_is_a_clear_error(small, which):
    train, val = small
    empty = subset(train, [])
    args = (empty, val) if which == "train" else (train, empty)
    with pytest.raises(ValueError, match=f"{which}_data is empty"):
        run(None, *args)
    with pytest.raises(ValueError, match=f"{which}_data is empty"):
        run(None, *(DataLoader(a, batch_size=2) for a in args))


# A rank-one curvature with the default damping 0.1 * mean(g^2) has condition number ~10 * D;
# LiSSA needs ~10^4 Neumann steps there (and warns when it runs out): damping 1 keeps it fast.
DAMPING = {"lissa": 1.0}


@pytest.mark.parametrize("method", ["fvm", "standard"])
@pytest.mark.parametrize("solver", ["hyperinf", "exact", "datainf", "lissa"])
def test_one_training_sample(small, method, solver):
    train, val = small
    result = run(train=subset(train, [0]), val=val, method=method, solver=solver, damping=DAMPING.get(solver))
    assert result.influence.shape == (1,) and torch.isfinite(result.influence).all()
    assert result.ranking.tolist() == [0] and result.metrics["score_std"] == 0.0


@pytest.mark.parametrize("method", ["fvm", "standard"])
@pytest.mark.parametrize("solver", ["hyperinf", "exact", "datainf", "lissa"])
def test_one_validation_sample(small, method, solver):
    train, val = small
    result = run(train=train, val=subset(val, [0]), method=method, solver=solver, damping=DAMPING.get(solver))
    assert torch.isfinite(result.influence).all()
    for block in result.solver_info["blocks"].values():  # a well-defined (converged) damped inverse
        assert block.get("residual", 0.0) < 1e-5


@pytest.mark.filterwarnings("ignore:detection_metrics")
def test_single_class_labels(small):
    """Every label the same class: scores stay finite and informative; the detection metrics that
    need both classes of ``noisy`` are NaN with a warning, not an error."""
    train, val = small
    same = TensorPairs(train.x, torch.zeros(12, dtype=torch.long))
    with pytest.warns(UserWarning, match="AUROC and average precision are undefined"):
        result = run(train=same, val=TensorPairs(val.x, torch.zeros(6, dtype=torch.long)),
                     noisy=torch.zeros(12, dtype=torch.bool))
    assert torch.isfinite(result.influence).all() and bool((result.influence != 0).any())
    assert result.metrics["auroc"] != result.metrics["auroc"]  # NaN


def test_single_logit_model_is_a_clear_error(small):
    train, val = small
    torch.manual_seed(0)
    one_logit = nn.Linear(8, 1).double()
    zeros = lambda ds: TensorPairs(ds.x, torch.zeros(len(ds), dtype=torch.long))  # noqa: E731
    with pytest.raises(ValueError, match="1 class logit.*loss_fn"):
        run(one_logit, zeros(train), zeros(val))


def test_all_zero_scores_warn(small):
    train, val = small
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    nn.init.zeros_(model[2].weight)  # the first layer's gradients vanish
    with pytest.warns(RuntimeWarning, match="every score is 0"):
        run(model, train, val, method="standard", params=["0.*"])


@pytest.mark.parametrize("bad", [3, -1])
def test_labels_out_of_range(small, bad):
    train, val = small
    y = train.y.clone()
    y[5] = bad
    with pytest.raises(ValueError, match=rf"labels out of range \[0, 3\): e.g. \[{bad}\]"):
        run(train=TensorPairs(train.x, y), val=val)
    with pytest.raises(ValueError, match=r"labels out of range \[0, 3\)"):
        run(train=train, val=TensorPairs(val.x, val.y + 3))


def test_token_labels_out_of_range():
    """A sequence model (B, T, C logits): -100 is ignored, anything else outside [0, C) is an error
    (on CUDA it would be a device-side assert that kills the training process)."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 5)

        def forward(self, input_ids):
            return self.out(self.emb(input_ids))

    ids = torch.randint(0, 10, (6, 3), generator=torch.Generator().manual_seed(0))
    ok = [{"input_ids": ids[i], "labels": torch.tensor([1, -100, 4])} for i in range(6)]
    torch.manual_seed(0)
    result = audit(Tagger().double(), ok, ok, method="standard", params=["out.*"])
    assert torch.isfinite(result.influence).all()
    bad = [{**s, "labels": torch.tensor([1, 7, 4])} for s in ok]
    with pytest.raises(ValueError, match=r"token labels out of range \[0, 5\).*\[7"):
        audit(Tagger().double(), bad, ok, method="standard", params=["out.*"])


def test_float_labels_point_to_loss_fn(small):
    train, val = small
    # a model with no training_step to confirm a mean squared error: refused, naming loss_fn
    with pytest.raises(ValueError, match="targets are floats.*Pass loss_fn="):
        run(train=TensorPairs(train.x, train.y.double()), val=val)


@pytest.mark.parametrize("noisy, message", [
    (torch.zeros(11, dtype=torch.bool), r"one flag per training sample \(12\), got shape \(11,\)"),
    (torch.zeros(12, 1, dtype=torch.bool), r"one flag per training sample \(12\), got shape \(12, 1\)"),
    (torch.zeros(12), "must be booleans.*float32"),
    (torch.full((12,), 2), "must be booleans"),
])
def test_noisy_flags_wrong_length_or_dtype_fail_before_any_work(small, noisy, message):
    train, val = small
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(ValueError, match=message):
        run(train=train, val=val, noisy=noisy, loss_fn=loss_fn)
    assert not calls  # failed before the expensive stages


@pytest.mark.parametrize("kwargs, error, message", [
    ({"top_k": 0, "noisy": torch.zeros(12, dtype=torch.bool)}, ValueError, "top_k must be a positive integer"),
    ({"clean_labels": torch.zeros(5, dtype=torch.long)}, ValueError,
     r"clean_labels must be one integer label .*\(12\)"),
    ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ({"grad_dtype": "float8_e4m3fn"}, ValueError, "grad_dtype must be one of"),
    ({"grad_dtype": torch.int8}, ValueError, "grad_dtype must be one of"),
    ({"damping": float("inf")}, ValueError, "damping must be a finite number > 0"),
    ({"damping": float("nan")}, ValueError, "damping must be a finite number > 0"),
    ({"tuning": {"lr": float("nan")}}, ValueError, "tuning.lr must be a finite number > 0"),
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ({"method": "koh"}, ValueError, "unknown method"),
    ({"solver": "cholesky"}, ValueError, "unknown solver"),
    ({"params": ["nothing.*"]}, ValueError, "no parameter name matches"),
])
def test_bad_options_fail_before_any_work(small, kwargs, error, message):
    train, val = small
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(error, match=message):
        run(train=train, val=val, loss_fn=loss_fn, **kwargs)
    assert not calls


def test_frozen_model_is_a_clear_error(small):
    model = mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="selects no parameter"):
        run(model, *small)


def test_huge_seed_works(small):
    result = run(train=small[0], val=small[1], seed=2**62)
    assert torch.isfinite(result.influence).all()


# ----------------------------------------------------------------------------- data the pipeline can't use


@pytest.mark.parametrize("batch, described", [
    ({"x": torch.zeros(8)}, r"mapping with keys \['x'\]"),
    ((torch.zeros(8), torch.tensor(0), torch.tensor(1)), r"list of 3 \(Tensor, Tensor, Tensor\)"),
    (torch.zeros(8), "Tensor"),
])
def test_unknown_batch_format_names_it_and_loss_fn(batch, described):
    samples = [batch] * 4
    with pytest.raises(BatchFormatError, match=rf"batch of type {described}.*Pass loss_fn="):
        audit(mlp(), samples, samples, method="standard")


def test_model_output_without_logits_points_to_loss_fn(small):
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3).double()

        def forward(self, x):
            return {"scores": self.lin(x)}

    with pytest.raises(BatchFormatError, match="returned dict.*Pass loss_fn"):
        run(Weird(), *small, method="standard")


@pytest.mark.parametrize("reduce", [lambda losses: losses.mean(), lambda losses: losses.mean().unsqueeze(0),
                                    lambda losses: losses[:, None]])
def test_reduced_loss_fn_is_a_clear_error(small, reduce):
    """A mean loss (scalar, (1,), or (B, 1)) would misalign the per-sample rows: refused."""

    def loss_fn(model, batch):
        return reduce(F.cross_entropy(model(batch[0]), batch[1], reduction="none"))

    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        run(train=small[0], val=small[1], loss_fn=loss_fn, method="standard")


def test_iterable_dataset_is_a_clear_type_error(small):
    class Stream(IterableDataset):
        def __iter__(self):
            yield from small[0]

    for bad in (Stream(), DataLoader(Stream(), batch_size=4)):
        with pytest.raises(TypeError, match="map-style dataset.*Stream.*list or a map-style Dataset"):
            run(train=bad, val=small[1])
        with pytest.raises(TypeError, match="val_data must be a map-style dataset"):
            run(train=small[0], val=bad)
    with pytest.raises(TypeError, match="map-style"):
        run(train=iter(list(small[0])), val=small[1])


# ----------------------------------------------------------------------------- large values


def big_late_batch(n=12, scale=1e6):
    """Linear-model data whose per-sample gradients (= (p - y) x) overflow float16 (max 65504)
    only from the third batch of 4 on, after two batches were already stored in float16."""
    ds = data(n, d=8)
    x = ds.x.clone().float()
    x[8:] *= scale
    return TensorPairs(x, ds.y)


@pytest.mark.parametrize("spill", [False, True])
def test_float16_storage_overflow_upcasts_with_warning(small, tmp_path, spill):
    train, val = big_late_batch(), TensorPairs(small[1].x.float(), small[1].y)
    extra = {"max_memory": 1, "spill_dir": str(tmp_path)} if spill else {}

    def linear():
        torch.manual_seed(0)
        return nn.Linear(8, 3)

    reference = run(linear(), train, val, method="standard", solver="exact")
    with pytest.warns(RuntimeWarning, match=r"gradients of weight reach .*e\+0[67], beyond the range of "
                                            r"grad_dtype=torch.float16 .*storing them in float32"):
        result = run(linear(), train, val, method="standard", solver="exact", grad_dtype="float16", **extra)
    assert result.excluded == [] and torch.isfinite(result.influence).all()
    torch.testing.assert_close(result.influence, reference.influence, rtol=1e-2, atol=1e-6)  # fp16-rounded first rows
    assert os.listdir(tmp_path) == []  # the float16 store's spill files are gone too


def test_half_precision_linear_gradients_accumulate_in_float32():
    """A float16 layer applied to 100 tokens: each token adds 30 * 30 = 900 to a weight gradient,
    90000 in all, beyond float16's 65504. Accumulated in float32 it is exact."""
    layer = nn.Linear(4, 2).half()
    with torch.no_grad():
        layer.weight.fill_(0.01)
        layer.bias.zero_()
    blocks = select_blocks(layer, "trainable")
    x = torch.full((2, 100, 4), 30.0, dtype=torch.float16)
    loss_fn = lambda model, batch: (model(batch) * 30.0).sum((1, 2)).float()  # noqa: E731
    with gradient_mode(layer, blocks):
        grads, _ = per_sample_gradients(layer, blocks, x, loss_fn)
    assert grads["weight"].dtype == torch.float32
    assert torch.equal(grads["weight"], torch.full_like(grads["weight"], 90000.0))
    assert torch.equal(grads["bias"], torch.full_like(grads["bias"], 3000.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_on_cpu(small, dtype):
    def cast(ds, t):
        return TensorPairs(ds.x.to(t), ds.y)

    def linear(t):
        torch.manual_seed(0)
        return nn.Linear(8, 3).to(t)

    train, val = small
    half = run(linear(dtype), cast(train, dtype), cast(val, dtype), method="standard", solver="exact")
    full = run(linear(dtype).float(), cast(cast(train, dtype), torch.float32), cast(cast(val, dtype), torch.float32),
               method="standard", solver="exact")
    assert half.config["grad_dtype"] == "torch.float32" and torch.isfinite(half.influence).all()
    assert float((half.influence - full.influence).norm() / full.influence.norm()) < 0.05


# ----------------------------------------------------------------------------- solver convergence


@pytest.mark.parametrize("solver", ["hyperinf", "lissa"])
def test_unconverged_solver_warns_with_iterations_and_residual(small, solver):
    options = {"max_iter": 1, **({"form": "schulz"} if solver == "hyperinf" else {})}  # hyperinf's iteration
    with pytest.warns(RuntimeWarning, match=rf"{solver}.*did not converge: 1 iterations, residual"):
        result = run(train=small[0], val=small[1], solver=solver, curvature={"solver_options": options})
    assert result.solver_info["max_iterations"] == 1 and result.solver_info["max_residual"] > 1e-7


def test_converged_solver_is_quiet(small):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run(train=small[0], val=small[1], solver="hyperinf")
    assert result.solver_info["max_residual"] < 1e-6


# ----------------------------------------------------------------------------- cleanup


def model_state(model: nn.Module):
    """Everything about the user's model (and autograd) that an audit must leave as it was."""
    from torch.nn.modules import module as nn_module

    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "module_hooks": {n: tuple(list(getattr(m, attr)) for attr in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
            for n, m in model.named_modules()},
        "tensor_hooks": {n: (list(p._backward_hooks or {}), list(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
                         for n, p in model.named_parameters()},
        "global_hooks": (len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks),
                         len(nn_module._global_backward_hooks)),
        "grad_enabled": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
    }


def assert_state(before, after):
    assert before.keys() == after.keys()
    for key in ("state", "grads"):
        for name, value in before[key].items():
            other = after[key][name]
            assert (value is None) == (other is None), name
            assert value is None or (torch.equal(value, other) and value.dtype == other.dtype), name
    for key in before:
        if key not in ("state", "grads"):
            assert before[key] == after[key], key


def users_model():
    """A model with everything an audit could disturb: mixed train/eval modes, a frozen layer,
    batch-norm running statistics, dropout, .grad values, module and tensor hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3),
                          nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    model.train()
    model[3].eval()
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)  # audit the Linear layers only (one loss call per batch)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[4].register_forward_hook(lambda *a: None)
    model[4].register_forward_pre_hook(lambda *a: None)
    model[6].register_full_backward_hook(lambda *a: None)
    model[6].weight.register_hook(lambda g: g)
    return model


def test_full_backward_hook_with_non_linear_parameters(small):
    """A full backward hook (an autograd.Function) breaks torch.func's vmap and grad; the per-sample
    fallback uses plain autograd, so the audit still works and matches the model without the hook."""

    def model(hook: bool):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3)).double()
        if hook:
            m[1].register_full_backward_hook(lambda *a: None)
        return m

    plain = run(model(False), *small, method="standard", solver="exact")
    with pytest.warns(UserWarning, match="can't be vmapped.*falling back to one backward per sample"):
        hooked = run(model(True), *small, method="standard", solver="exact")
    torch.testing.assert_close(hooked.influence, plain.influence, rtol=1e-9, atol=1e-12)


class Boom(Exception):
    pass


def failing_loss(k: int, exc: BaseException):
    """A loss_fn that raises ``exc`` on its k-th call (1-based)."""
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        if calls[0] == k:
            raise exc
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    loss_fn.calls = calls
    return loss_fn


# n=12, m=6, batch 4, fvm with 2 SAM steps, noisy flags given (so the loss at θ* is computed for
# the baseline metrics): calls 1-3 the loss at θ*, then the tuning: the gradient yardstick (3
# batches of 2: it needs at least four batches or all samples in pairs; with m = 6 every sample is
# in its subset, so no other sample is forwarded for the loss at θ*), the lr probe's forward passes
# over those 3 batches reusing its gradient, and the one-pass SAM steps; then 2 validation
# (calls 24-25) and 3 training gradient batches (26-28). Without noisy flags the first 3 calls
# are not made.
STAGE_CALLS = {"loss_at_trained": 1, "tuning": 5, "val_gradients": 24, "train_gradients": 26}
LOSS_AT_TRAINED_CALLS = 3
# the pre-flight check before them: the loss, the per-sample gradients, the autograd reference
PREFLIGHT_CALLS = 3
FLAGS = torch.zeros(12, dtype=torch.bool)


def test_stage_call_map(small):
    # the map counts the pipeline's own calls: the pre-flight check (3 calls, tested below) is off
    counter = failing_loss(0, Boom())
    run(users_model(), *small, loss_fn=counter, max_memory=1, preflight=False, noisy=FLAGS)
    assert counter.calls[0] == 28
    counter = failing_loss(0, Boom())
    run(users_model(), *small, loss_fn=counter, max_memory=1, noisy=FLAGS)
    assert counter.calls[0] == 28 + PREFLIGHT_CALLS
    counter = failing_loss(0, Boom())  # no ranking uses the loss at θ*: its forward pass is skipped
    run(users_model(), *small, loss_fn=counter, max_memory=1, preflight=False)
    assert counter.calls[0] == 28 - LOSS_AT_TRAINED_CALLS


@pytest.mark.parametrize("exc", [Boom("injected"), KeyboardInterrupt()], ids=["exception", "keyboard_interrupt"])
@pytest.mark.parametrize("stage", sorted(STAGE_CALLS) + ["preflight"])
def test_model_and_files_restored_after_failure_in_loss(small, tmp_path, stage, exc):
    model = users_model()
    before = model_state(model)
    with torch.no_grad():  # the caller's autograd state must come back too
        with pytest.raises(type(exc)):
            if stage == "preflight":
                run(model, *small, loss_fn=failing_loss(1, exc), max_memory=1, spill_dir=str(tmp_path))
            else:
                run(model, *small, loss_fn=failing_loss(STAGE_CALLS[stage], exc), max_memory=1,
                    spill_dir=str(tmp_path), preflight=False, noisy=FLAGS)
        assert not torch.is_grad_enabled()
    assert_state(before, model_state(model))
    assert os.listdir(tmp_path) == []  # spilled gradient files removed


class FailingSolver(ExactSolver):
    def __init__(self, exc: BaseException = Boom("solver fit failed")) -> None:
        super().__init__()
        self.exc = exc

    def fit(self, grads, damping):
        raise self.exc


@pytest.mark.parametrize("exc", [Boom("solver fit failed"), KeyboardInterrupt()],
                         ids=["exception", "keyboard_interrupt"])
@pytest.mark.parametrize("method", ["fvm", "standard"])
def test_model_and_files_restored_after_solver_failure(small, tmp_path, method, exc):
    model = users_model()
    before = model_state(model)
    with pytest.raises(type(exc)):
        run(model, *small, method=method, solver=FailingSolver(exc), max_memory=1, spill_dir=str(tmp_path))
    assert_state(before, model_state(model))
    assert os.listdir(tmp_path) == []


def test_model_and_files_restored_after_metrics_failure(small, tmp_path, monkeypatch):
    import importlib

    ranking_module = importlib.import_module("lightning_influence.ranking")  # where the metrics stage calls it

    def broken(*args, **kwargs):
        raise Boom("metrics failed")

    monkeypatch.setattr(ranking_module, "detection_metrics", broken)
    model = users_model()
    before = model_state(model)
    with pytest.raises(Boom, match="metrics failed"):
        run(model, *small, noisy=torch.arange(12) % 4 == 0, max_memory=1, spill_dir=str(tmp_path))
    assert_state(before, model_state(model))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("method", ["fvm", "standard"])
def test_model_and_files_restored_after_success(small, tmp_path, method):
    model = users_model()
    before = model_state(model)
    result = run(model, *small, method=method, max_memory=1, spill_dir=str(tmp_path), per_validation=True)
    assert torch.isfinite(result.influence).all()
    assert_state(before, model_state(model))
    assert os.listdir(tmp_path) == []


def test_audit_inside_inference_mode(small):
    """Lightning runs validation/test hooks under torch.inference_mode(): the audit still works
    and leaves the mode on."""
    with torch.inference_mode():
        result = run(train=small[0], val=small[1])
        assert torch.is_inference_mode_enabled()
    assert torch.isfinite(result.influence).all()


# ----------------------------------------------------------------------------- files


@pytest.fixture
def result(small):
    return run(train=small[0], val=small[1], method="standard", noisy=torch.arange(12) % 4 == 0)


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("suffix", [".csv", ".json", ".pt"])
def test_unwritable_log_dir_is_a_clear_error_and_touches_nothing(result, tmp_path, suffix):
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "epoch=3.ckpt").write_bytes(b"weights")
    before = folder_bytes(tmp_path)
    with pytest.raises(OSError, match="can't save the audit result to .*not a writable directory"):
        result.save(str(tmp_path / "file.txt" / f"scores{suffix}"))
    with pytest.raises(OSError, match="can't save the audit result"):
        result.save(str(tmp_path / "file.txt" / "sub" / f"scores{suffix}"))
    assert folder_bytes(tmp_path) == before


def test_target_is_a_directory(result, tmp_path):
    (tmp_path / "scores.csv").mkdir()
    with pytest.raises(IsADirectoryError):
        result.save(str(tmp_path / "scores.csv"))
    assert os.listdir(tmp_path) == ["scores.csv"] and os.listdir(tmp_path / "scores.csv") == []


def _interrupt_fsync(monkeypatch):
    def fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_mid_csv(monkeypatch):
    real = csv.DictWriter.writerows

    def writerows(self, rows):
        real(self, rows[:3])  # some rows reach the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", writerows)


def _fail_mid_json(monkeypatch):
    def dump(obj, handle, **kw):
        handle.write('{"method": "fvm", "rows": [')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", dump)


def _fail_mid_torch_save(monkeypatch):
    def save(obj, handle, *a, **kw):
        handle.write(b"PK\x03\x04partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("suffix, inject", [(".csv", _interrupt_fsync), (".csv", _fail_mid_csv),
                                            (".json", _fail_mid_json), (".pt", _fail_mid_torch_save),
                                            (".json", _interrupt_fsync)])
def test_interrupted_write_never_leaves_a_truncated_file(result, tmp_path, monkeypatch, suffix, inject):
    path = tmp_path / f"scores{suffix}"
    result.save(str(path))  # a complete earlier file
    before = folder_bytes(tmp_path)
    inject(monkeypatch)
    with pytest.raises((KeyboardInterrupt, OSError)):
        result.save(str(path))
    assert folder_bytes(tmp_path) == before  # old file intact, no temp file left
    monkeypatch.undo()
    if suffix == ".csv":
        rows = list(csv.DictReader(open(path)))
        assert len(rows) == 12 and rows[0].keys() >= {"id", "score", "rank"}


def test_saved_files_are_complete_and_strict_json_with_excluded(small, tmp_path):
    quiet_result = quiet(run, train=with_nan_rows(small[0], [2]), val=small[1], method="standard")
    quiet_result.save(str(tmp_path / "s.json"))
    quiet_result.save(str(tmp_path / "s.csv"))
    quiet_result.save(str(tmp_path / "s.pt"))
    doc = json.loads((tmp_path / "s.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert doc["excluded"] == [2] and len(doc["rows"]) == 12 and doc["rows"][-1]["id"] == 2
    assert doc["rows"][-1]["score"] is None
    assert len(list(csv.DictReader(open(tmp_path / "s.csv")))) == 12
    loaded = AuditResult.from_dict(torch.load(tmp_path / "s.pt", weights_only=False))
    assert torch.equal(loaded.ranking, quiet_result.ranking)
    assert sorted(os.listdir(tmp_path)) == ["s.csv", "s.json", "s.pt"]


def test_saved_files_get_the_permissions_a_plain_open_gives(result, tmp_path):
    """The atomic write goes through mkstemp, which makes 0600 files: a new scores file must get
    0666 less the umask like any file the user's code writes, and an overwritten one keeps its
    own mode (a shared log folder stays readable by the team)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    result.save(str(tmp_path / "s.csv"))
    assert stat.S_IMODE(os.stat(tmp_path / "s.csv").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    os.chmod(tmp_path / "s.csv", 0o640)
    result.save(str(tmp_path / "s.csv"))
    assert stat.S_IMODE(os.stat(tmp_path / "s.csv").st_mode) == 0o640


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("method", ["fvm", "standard"])
def test_same_seed_and_data_give_bit_identical_scores(small, method):
    a = run(mlp(), *small, method=method, seed=3, per_validation=True)
    b = run(mlp(), *small, method=method, seed=3, per_validation=True)
    assert torch.equal(a.influence, b.influence) and torch.equal(a.ranking, b.ranking)
    assert torch.equal(a.per_validation, b.per_validation)


def test_global_rng_untouched(small):
    state = torch.get_rng_state()
    run(train=small[0], val=small[1], curvature={"fisher": "true"})
    assert torch.equal(state, torch.get_rng_state())


def test_float16_storage_of_gradients_below_its_range_upcasts_with_warning(small):
    """A well-fit model's per-sample gradients can lie below float16's normal range (6.1e-5), where
    they round coarsely or to 0: the store keeps float32 instead, and says so."""
    train, val = small
    torch.manual_seed(0)
    model = nn.Linear(train.x.shape[1], 3).to(train.x.dtype)
    scale = 1e-6  # gradients of the loss scaled down by a million: entries ~1e-7, float16 subnormals or 0

    def tiny(model, batch):
        x, y = batch
        return scale * nn.functional.cross_entropy(model(x), y, reduction="none")

    reference = run(model, train, val, method="standard", solver="exact", loss_fn=tiny, preflight=False)
    with pytest.warns(RuntimeWarning, match=r"lose up to .* of their norm in grad_dtype=torch.float16 .*storing "
                                            r"them in float32"):
        result = run(model, train, val, method="standard", solver="exact", loss_fn=tiny, preflight=False,
                     grad_dtype="float16")
    torch.testing.assert_close(result.influence, reference.influence, rtol=1e-2, atol=0)
