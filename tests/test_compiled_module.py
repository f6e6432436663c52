"""``trainer.fit(torch.compile(module))``: Lightning compiles the module's own methods in place
(``from_compiled``); the audit's copy must compute with its own parameters, and the user's
module (weights and ``.grad``) must come out of the audit untouched."""
from __future__ import annotations

import pytest
import torch

from lightning_influence import InfluenceCallback
from test_callback import FAST, NoisyBlobs, TinyClassifier, make_trainer

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
              pytest.mark.filterwarnings("ignore:.*did not reach a validation minimum")]


def _fit(tmp_path, compiled: bool):
    torch.manual_seed(0)
    module, dm = TinyClassifier(), NoisyBlobs(shuffle=False)
    cb = InfluenceCallback(method="fvm", params="trainable", tuning=FAST, noisy=dm.noisy, run_on_fit_end=False,
                           scores_filename=None, verbose=False, on_error="raise")
    trainer = make_trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(torch.compile(module, backend="eager") if compiled else module, datamodule=dm)
    return trainer, module, cb


def test_a_module_lightning_compiled_is_audited_as_the_same_module_uncompiled(tmp_path):
    trainer_p, module_p, cb_p = _fit(tmp_path / "p", compiled=False)
    expected = cb_p.run(trainer_p, module_p)
    trainer, module, cb = _fit(tmp_path / "c", compiled=True)
    assert getattr(module, "_compiler_ctx", None) is not None  # Lightning compiled the module's own forward
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}
    result = cb.run(trainer, module)
    assert float(result.influence.abs().max()) > 0  # the copy's own parameters carry the gradients
    assert torch.allclose(result.influence, expected.influence, rtol=1e-5, atol=0)
    assert result.tuning["val_loss_tuned"] < result.tuning["val_loss_trained"]  # tuning moved the copy
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())
    for n, p in module.named_parameters():  # no gradient left on the user's weights
        assert (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n])
    assert getattr(module, "_compiler_ctx", None) is not None  # the user's module stays compiled
