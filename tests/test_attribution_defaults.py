"""The attribution defaults (``per_validation=True`` with no method and no solver), the
``kronecker`` solver and ``normalize="unit"``, each against a dense hand computation from
autograd's per-sample gradients of a tiny bias-free linear classifier."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import audit
from lightning_influence.config import ATTRIBUTION_DEFAULTS, AuditOptions
from lightning_influence.solvers import KroneckerSolver, make_solver

N, M, D_IN, C = 24, 6, 5, 3


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, xv = (torch.randn(N, D_IN, generator=g, dtype=torch.float64),
             torch.randn(M, D_IN, generator=g, dtype=torch.float64))
    y, yv = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (M,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, C, bias=False)).double()
    return model, TensorDataset(x, y), TensorDataset(xv, yv)


def _grads(model: nn.Module, ds: TensorDataset) -> torch.Tensor:
    """Per-sample gradients of the weight ``(n, C, D_IN)``, one autograd call per sample."""
    out = []
    for x, y in ds:
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), y[None]).backward()
        out.append(model[0].weight.grad.detach().clone())
    return torch.stack(out)


def _kronecker_dense(G: torch.Tensor, V: torch.Tensor, factor: float, balance: bool = True) -> torch.Tensor:
    """``− V_j`` through ``s (L + dλ I)^{-1} · (R + rλ I)^{-1}``, dotted with ``G_i``: ``(m, n)``."""
    n, r, d = G.shape
    lam = factor * G.pow(2).mean()
    left = sum(g @ g.T for g in G) / n
    right = sum(g.T @ g for g in G) / n
    mean_sq = G.pow(2).sum((1, 2)).mean()
    scale = 1 / mean_sq if balance else mean_sq
    u = torch.stack([scale * torch.linalg.solve(left + d * lam * torch.eye(r, dtype=G.dtype), v)
                     @ torch.linalg.inv(right + r * lam * torch.eye(d, dtype=G.dtype)) for v in V])
    return -torch.einsum("mrd,nrd->mn", u, G)


# --------------------------------------------------------------------------- resolution

def test_per_validation_without_method_or_solver_uses_the_attribution_defaults():
    o = AuditOptions(per_validation=True)
    assert (o.method, o.solver, o.normalize) == ("standard", "kronecker", "centered")
    assert o.curvature.damping == ATTRIBUTION_DEFAULTS["damping"] == 1e-4


@pytest.mark.parametrize("given, expected", [
    (dict(method="fvm"), ("fvm", "hyperinf", "none", 0.1)),
    (dict(method="standard"), ("standard", "hyperinf", "none", 0.1)),
    (dict(solver="exact"), ("fvm", "exact", "none", 0.1)),
    (dict(method="vm", solver="identity"), ("vm", "identity", "none", 0.1)),
    (dict(method="standard", normalize="unit"), ("standard", "hyperinf", "unit", 0.1)),
])
def test_a_given_method_or_solver_is_used_as_given(given, expected):
    o = AuditOptions(per_validation=True, **given)
    assert (o.method, o.solver, o.normalize, o.curvature.damping) == expected


def test_without_per_validation_nothing_changes():
    o = AuditOptions()
    assert (o.method, o.solver, o.normalize, o.curvature.damping) == ("fvm", "hyperinf", "none", 0.1)


def test_a_given_damping_or_curvature_wins_over_the_default_damping():
    assert AuditOptions(per_validation=True, damping=0.5).curvature.damping == 0.5
    assert AuditOptions(per_validation=True, curvature={"damping": 0.2}).curvature.damping == 0.2
    assert AuditOptions(per_validation=True, curvature={"damping_rule": "absolute"}).curvature.damping == 0.1


def test_resolution_is_stable_under_copies_and_checks_the_option():
    from dataclasses import replace

    o = replace(AuditOptions(per_validation=True), n=N)
    assert (o.method, o.solver, o.normalize, o.curvature.damping) == ("standard", "kronecker", "centered", 1e-4)
    with pytest.raises(ValueError, match="normalize"):
        AuditOptions(normalize="cosine")


def test_callback_resolves_alike():
    from lightning_influence import InfluenceCallback

    cb = InfluenceCallback(per_validation=True)
    assert (cb.options.method, cb.options.solver, cb.options.normalize) == ("standard", "kronecker", "centered")
    cb = InfluenceCallback(per_validation=True, method="fvm")
    assert (cb.options.method, cb.options.solver, cb.options.normalize) == ("fvm", "hyperinf", "none")


def test_a_lora_model_is_explained_by_its_b_matrices_unless_params_is_given():
    """Under the attribution defaults ``params="auto"`` becomes ``"auto_lora_B"``: a LoRA model's B
    matrices (found through PEFT's layers), a plain model's trainable weights; a given
    ``params`` (or a given method) keeps its own."""
    from lightning_influence.params import select_blocks

    assert AuditOptions(per_validation=True).params == ATTRIBUTION_DEFAULTS["params"] == "auto_lora_B"
    assert AuditOptions(per_validation=True, params="lora").params == "lora"
    assert AuditOptions(per_validation=True, method="standard").params == "auto"
    assert AuditOptions().params == "auto"
    lora = _lora_mlp()
    both = [b.name for b in select_blocks(lora, "lora")]
    b_only = [b.name for b in select_blocks(lora, "auto_lora_B")]
    assert len(both) == 4 and b_only == [n for n in both if ".lora_B." in n] and len(b_only) == 2
    assert [b.name for b in select_blocks(lora, "lora_B")] == b_only
    plain, _, _ = _data()
    assert [b.name for b in select_blocks(plain, "auto_lora_B")] == ["0.weight"]  # no LoRA: its weights
    # a plain model with biases and a norm: its weight matrices and kernels only (1-D parameters left out)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LayerNorm(8),
                              torch.nn.Linear(8, 3))
    assert [b.name for b in select_blocks(net, "auto_lora_B")] == ["0.weight", "3.weight"]
    assert len(select_blocks(net, "auto")) == 6  # "auto" (vm/fvm, standard): every trainable parameter
    only_biases = torch.nn.Linear(4, 2)
    only_biases.weight.requires_grad_(False)
    assert [b.name for b in select_blocks(only_biases, "auto_lora_B")] == ["bias"]  # nothing 2-D: as "auto"
    with pytest.raises(ValueError, match="params='lora_B' but the model has no PEFT LoRA layers"):
        select_blocks(plain, "lora_B")


def test_the_defaults_on_a_lora_model_equal_the_explicit_b_only_audit():
    lora = _lora_mlp()
    _, train, val = _data()
    defaults = audit(lora, train, val, per_validation=True, preflight=False)
    explicit = audit(lora, train, val, per_validation=True, preflight=False, method="standard", solver="kronecker",
                     damping=1e-4, normalize="centered", params=["*lora_B*"])
    assert defaults.config["params"] == "auto_lora_B" and defaults.config["blocks"] == 2
    torch.testing.assert_close(defaults.per_validation, explicit.per_validation, rtol=1e-12, atol=0)


def _lora_mlp() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, C)).double()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)  # LoRA B starts at zero: make every gradient non-trivial
    return model


# --------------------------------------------------------------------------- against dense computations

@pytest.mark.parametrize("balance", [True, False])
def test_kronecker_solver_against_dense_and_streams(balance):
    g = torch.Generator().manual_seed(1)
    G, V = (torch.randn(30, 3, 7, generator=g, dtype=torch.float64),
            torch.randn(4, 3, 7, generator=g, dtype=torch.float64))
    lam = 0.01 * float(G.pow(2).mean())
    solver = KroneckerSolver(balance=balance).fit(G, lam)
    dense = _kronecker_dense(G, V, 0.01, balance)
    got = -torch.einsum("mrd,nrd->mn", solver.apply(V), G)
    torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-12)
    # two chunks' statistics summed give the same solver (streaming / DDP)
    s1, s2 = solver.statistics(G[:11]), solver.statistics(G[11:])
    streamed = make_solver("kronecker", balance=balance).fit_statistics({k: s1[k] + s2[k] for k in s1}, 30, lam)
    torch.testing.assert_close(streamed.apply(V), solver.apply(V), rtol=1e-10, atol=0)


def test_audit_defaults_match_the_dense_hand_computation():
    model, train, val = _data()
    result = audit(model, train, val, per_validation=True, params="trainable", batch_size=8)
    assert (result.method, result.solver) == ("standard", "kronecker")
    assert result.config["normalize"] == "centered" and result.config["curvature"]["damping"] == 1e-4
    G, V = _grads(model, train), _grads(model, val)
    centred = V - G.mean(0, keepdim=True)  # the queries centred on the mean training gradient
    dense = _kronecker_dense(G, centred, 1e-4)
    dense = dense / G.flatten(1).norm(dim=1)[None] / centred.flatten(1).norm(dim=1)[:, None]
    torch.testing.assert_close(result.per_validation, dense, rtol=1e-7, atol=1e-10)


def test_unit_normalisation_is_the_gradient_cosine():
    model, train, val = _data(3)
    result = audit(model, train, val, per_validation=True, method="standard", solver="identity", normalize="unit",
                   params="trainable", batch_size=8)
    G, V = _grads(model, train).flatten(1), _grads(model, val).flatten(1)
    cosine = (V / V.norm(dim=1, keepdim=True)) @ (G / G.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(result.per_validation, -cosine, rtol=1e-8, atol=1e-11)
    raw = audit(model, train, val, per_validation=True, method="standard", solver="identity", params="trainable",
                batch_size=8)
    assert raw.config["normalize"] == "none"
    torch.testing.assert_close(raw.per_validation, -(V @ G.T), rtol=1e-8, atol=1e-11)


def test_centered_uses_the_mean_of_the_valid_training_gradients():
    model, train, val = _data(5)
    x = train.tensors[0].clone()
    x[2] = float("nan")  # sample 2: a non-finite loss, excluded (its stored gradient is zero)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = audit(model, TensorDataset(x, train.tensors[1]), val, per_validation=True, method="standard",
                       solver="identity", normalize="centered", params="trainable", batch_size=8)
    keep = [i for i in range(N) if i != 2]
    G, V = _grads(model, train)[keep].flatten(1), _grads(model, val).flatten(1)
    centred = V - G.mean(0, keepdim=True)
    dense = -(centred / centred.norm(dim=1, keepdim=True)) @ (G / G.norm(dim=1, keepdim=True)).T
    assert torch.isnan(result.per_validation[:, 2]).all()
    torch.testing.assert_close(result.per_validation[:, keep], dense, rtol=1e-8, atol=1e-11)
