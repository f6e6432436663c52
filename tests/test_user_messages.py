"""Messages a user reads when a set-up is refused or a result is summarised: they name what to do."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, SubsetRandomSampler, WeightedRandomSampler

import hf_models as hf
from helpers import digits_mlp
from lightning_influence import audit
from lightning_influence.data import selected_ids
from lightning_influence.params import select_blocks
from lightning_influence.reporting.summary import summary_text
from tasks import noisy_digits

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*did not reach a validation minimum")]


def test_a_tied_parameter_selected_by_its_other_name_is_named_by_the_one_to_use():
    model = hf.gpt2(tie=True)
    assert "lm_head.weight" not in dict(model.named_parameters())  # listed once, under the embedding's name
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to \(the same tensor as\) transformer.wte.weight: "
                                         r"select transformer.wte.weight"):
        select_blocks(model, ["lm_head.weight"])
    with pytest.raises(ValueError, match="names look like: transformer.wte.weight"):  # no alias: a sample of names
        select_blocks(model, ["*.nothing_like_this"])
    assert [b.name for b in select_blocks(model, ["transformer.wte.weight"])] == ["transformer.wte.weight"]


def test_a_sampler_that_draws_other_samples_each_pass_is_refused_naming_the_callbacks_way_out():
    split = noisy_digits(rate=0.2, seed=0)
    weights = torch.ones(len(split.train))
    loader = DataLoader(split.train, batch_size=32, sampler=WeightedRandomSampler(weights, 100, replacement=False))
    with pytest.raises(ValueError, match=r"different set of samples on each pass.*cb.run\(trainer, train_data="):
        selected_ids(loader, "train_data")


def test_the_summary_says_how_many_samples_the_sampler_selected_and_counts_the_flags_among_them():
    split = noisy_digits(rate=0.2, seed=0)
    model = digits_mlp(split)
    picked = list(range(0, len(split.train), 2))
    loader = DataLoader(split.train, batch_size=64, sampler=SubsetRandomSampler(picked))
    result = audit(model, loader, split.val, method="fvm", params="trainable", noisy=split.noisy,
                   tuning={"steps": 4}, batch_size=64)
    head = summary_text(result).splitlines()[0]
    flagged = int(torch.as_tensor(split.noisy)[picked].sum())
    assert f"{len(split.train)} training samples ({len(picked)} audited, the ones the loader's sampler selects)" in head
    assert f"{flagged} of them flagged noisy" in head


@pytest.mark.parametrize("bad, says", [("", "a folder path"), ("FILE", "is a file, not a folder"),
                                       ("FILE/below", "is a file, not a folder")])
def test_a_spill_dir_that_cannot_hold_files_is_refused_before_any_work(tmp_path, bad, says):
    from lightning_influence import InfluenceCallback

    (tmp_path / "FILE").write_text("mine")
    spill = bad.replace("FILE", str(tmp_path / "FILE")) if bad else bad
    calls = []
    split = noisy_digits(rate=0.2, seed=0)
    model = digits_mlp(split)

    def loss(model, batch):
        calls.append(1)
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none")

    with pytest.raises(ValueError, match=f"spill_dir.*{says}"):
        audit(model, split.train, split.val, loss_fn=loss, max_memory=1, spill_dir=spill)
    assert not calls  # refused before the first forward pass
    with pytest.raises(ValueError, match=f"spill_dir.*{says}"):
        InfluenceCallback(max_memory=1, spill_dir=spill)  # the callback: when it is made, before training
    assert (tmp_path / "FILE").read_text() == "mine"


def test_a_spill_dir_the_audit_created_is_removed_with_its_files(tmp_path):
    split = noisy_digits(rate=0.2, seed=0)
    model = digits_mlp(split)
    spill = tmp_path / "new" / "deeper"
    audit(model, split.train, split.val, method="standard", max_memory=1, spill_dir=str(spill))
    assert not (tmp_path / "new").exists()  # both folders it made, now empty, are gone
    kept = tmp_path / "mine"
    kept.mkdir()
    audit(model, split.train, split.val, method="standard", max_memory=1, spill_dir=str(kept))
    assert kept.is_dir() and not list(kept.iterdir())  # the user's own folder stays, emptied of the audit's files
