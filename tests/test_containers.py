"""CallbackModuleDict: probes move with the model, but are neither its parameters nor in its state_dict."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from sslprobe._containers import CallbackModuleDict
from sslprobe.callbacks import OnlineProbe, ProbeSweep
from sslprobe.probes import LinearProbe
from tests.conftest import D_EMB, D_IN, NUM_CLASSES, dict_loader, make_module, make_trainer


def probes_of(model: pl.LightningModule) -> list:
    return [
        OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES)),
        ProbeSweep(model, "sweep", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1], weight_decays=[0]),
    ]


def test_probes_move_with_the_model_but_are_neither_its_parameters_nor_its_state():
    model = make_module()
    OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    assert isinstance(model.callbacks_modules, CallbackModuleDict)
    probe = model.callbacks_modules["linear"]
    own = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in model.parameters()} == own
    assert all(m is not probe for m in model.modules())
    assert {id(p) for p in model.callbacks_modules.parameters()} == {id(p) for p in probe.parameters()}
    assert "callbacks_modules.linear.weight" not in model.state_dict()  # in the callback's checkpoint state
    assert "linear.weight" in model.callbacks_modules.state_dict()
    model.to(torch.float64)
    assert probe.weight.dtype == torch.float64
    model.eval()
    assert not probe.training


@pytest.mark.parametrize("how", ["freeze", "requires_grad_", "backbone"])
def test_a_frozen_model_still_trains_its_probes(how):
    # Linear evaluation's habit: model.freeze() (requires_grad_(False) on every parameter, and eval mode), here on
    # a model with optim=None (a frozen backbone); the probes, lazy ones included, train as on an unfrozen model.
    reference = make_module(optim=None)
    reference_probes = probes_of(reference)
    make_trainer(max_epochs=2, callbacks=reference_probes).fit(reference, dict_loader(), dict_loader(seed=0))

    model = make_module(optim=None)
    probes = probes_of(model)
    if how == "freeze":
        model.freeze()
    elif how == "requires_grad_":
        model.requires_grad_(False)
    else:
        model.backbone.requires_grad_(False)
    before = [p.clone() for p in model.backbone.parameters()]
    trainer = make_trainer(max_epochs=2, callbacks=probes)
    trainer.fit(model, dict_loader(), dict_loader(seed=0))
    assert probes[0].stepper.steps == probes[1].stepper.steps == 12
    for key, value in model.callbacks_modules.state_dict().items():
        assert torch.equal(value, reference.callbacks_modules.state_dict()[key]), key
    assert float(trainer.callback_metrics["eval/linear_top1"]) == pytest.approx(
        float(reference.trainer.callback_metrics["eval/linear_top1"])
    )
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))
    assert not any(p.requires_grad for p in model.backbone.parameters())


class Frozen(pl.LightningModule):
    """A plain LightningModule for linear evaluation: a frozen backbone, no optimizer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # nothing of its own to optimize
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(D_IN, D_EMB), nn.ReLU())

    def training_step(self, batch, batch_idx):
        return {"embedding": self.backbone(batch["x"])}

    def validation_step(self, batch, batch_idx):
        return {"embedding": self.backbone(batch["x"])}

    def configure_optimizers(self):
        return None


def test_a_plain_lightning_module_that_froze_itself_still_trains_its_probes():
    model = Frozen()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    model.freeze()
    trainer = make_trainer(max_epochs=2, callbacks=[probe])
    trainer.fit(model, dict_loader(), dict_loader(seed=0))
    assert probe.stepper.steps == 12
    assert float(trainer.callback_metrics["eval/linear_top1"]) > 0.8
