from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from sslprobe import Module
from sslprobe.callbacks import OnlineProbe
from tests.conftest import D_EMB, D_IN, NUM_CLASSES, dict_loader, forward, make_module, make_trainer


class Subclassed(Module):
    def forward(self, batch, stage):
        emb = self.backbone(batch["x"])
        return {"embedding": emb, "loss": emb.pow(2).mean()} if stage == "fit" else {"embedding": emb}


def test_forward_passed_or_subclassed_give_the_same_training():
    torch.manual_seed(0)
    a = Module(forward=forward, backbone=nn.Linear(D_IN, D_EMB), optim={"type": "SGD", "lr": 0.1})
    torch.manual_seed(0)
    b = Subclassed(backbone=nn.Linear(D_IN, D_EMB), optim={"type": "SGD", "lr": 0.1})
    for model in (a, b):
        make_trainer(max_epochs=1).fit(model, dict_loader())
    assert torch.equal(a.backbone.weight, b.backbone.weight)
    assert isinstance(a.backbone, nn.Module) and "backbone.weight" in a.state_dict()


def test_constructor_errors():
    with pytest.raises(TypeError, match=r"Module: there is no forward. Pass forward=fn"):
        Module(backbone=nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Module: 'callbacks_modules' is reserved"):
        Module(forward=forward, callbacks_modules=nn.ModuleDict())
    with pytest.raises(ValueError, match=r"Module: unknown optim keys \['lr'\]"):
        Module(forward=forward, optim={"optimizer": "SGD", "lr": 0.1})
    with pytest.raises(ValueError, match=r"Module: interval must be one of"):
        Module(forward=forward, optim={"optimizer": "SGD", "scheduler": "StepLR", "interval": "batch"})


@pytest.mark.parametrize(
    ("optim", "kind"),
    [
        ("AdamW", torch.optim.AdamW),
        ({"type": "SGD", "lr": 0.1, "momentum": 0.9}, torch.optim.SGD),
        (functools.partial(torch.optim.Adam, lr=1e-3), torch.optim.Adam),
        (torch.optim.RMSprop, torch.optim.RMSprop),
        ({"optimizer": "SGD", "scheduler": "CosineAnnealingLR"}, torch.optim.SGD),
        (
            {
                "optimizer": {"type": "SGD", "lr": 1.0},
                "scheduler": {"type": "StepLR", "step_size": 1},
                "interval": "epoch",
            },
            torch.optim.SGD,
        ),
    ],
)
def test_optim_forms_and_probes_excluded(optim, kind):
    model = make_module(optim=optim)
    OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    trainer = make_trainer(max_epochs=2, callbacks=[])
    trainer.fit(model, dict_loader())
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, kind)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.backbone.parameters()}
    if isinstance(optim, dict) and optim.get("interval") == "epoch":
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # StepLR(gamma=0.1) stepped twice
    if isinstance(optim, dict) and optim.get("scheduler") == "CosineAnnealingLR":
        assert trainer.lr_scheduler_configs[0].scheduler.T_max == 12


def test_frozen_model_counts_steps_and_stops_at_max_steps():
    model = make_module(optim=None)
    before = model.backbone[0].weight.detach().clone()
    seen = []

    class Spy(OnlineProbe):
        def compute_loss(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["embedding"].requires_grad)
            return super().compute_loss(trainer, pl_module, outputs, batch, batch_idx)

    probe = Spy(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    trainer = make_trainer(max_steps=9, max_epochs=-1, callbacks=[probe])
    trainer.fit(model, dict_loader())
    assert trainer.global_step == 9
    assert probe.stepper.steps == 9
    assert torch.equal(model.backbone[0].weight, before)
    assert seen and not any(seen)  # the frozen forward builds no graph


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_frozen_model_under_reduced_precision(precision):
    model = make_module(optim=None)
    trainer = make_trainer(max_steps=3, max_epochs=-1, precision=precision)
    trainer.fit(model, dict_loader())
    assert trainer.global_step == 3


def test_missing_loss_and_non_dict_errors():
    model = Module(forward=lambda self, b, stage: {"embedding": self.net(b["x"])}, net=nn.Linear(D_IN, 2), optim="SGD")
    with pytest.raises(RuntimeError, match=r"forward returned no 'loss' in stage 'fit', but optim= was given"):
        make_trainer(max_epochs=1).fit(model, dict_loader())
    model = Module(forward=lambda self, b, stage: self.net(b["x"]), net=nn.Linear(D_IN, 2))
    with pytest.raises(TypeError, match=r"forward must return a dict in stage 'validate', got Tensor"):
        make_trainer().validate(model, dict_loader())


def test_containers_move_with_the_module_but_stay_out_of_its_state():
    model = make_module()
    OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    # A checkpoint of the model loads strictly into the model built without probes (the probe's weights travel in
    # its callback's checkpoint state).
    assert sorted(model.state_dict()) == sorted(make_module().state_dict())
    model.to(torch.float64)
    assert model.callbacks_modules["linear"].weight.dtype == torch.float64
    assert model.main_parameters() == list(model.backbone.parameters())


def test_stage_names_reach_forward():
    stages = []

    def record(self, batch, stage):
        stages.append(stage)
        emb = self.net(batch["x"])
        return {"embedding": emb, "loss": emb.sum()}

    model = Module(forward=record, net=nn.Linear(D_IN, 2), optim="SGD")
    trainer = make_trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, limit_test_batches=1, limit_predict_batches=1
    )
    trainer.fit(model, dict_loader(), dict_loader())
    trainer.test(model, dict_loader())
    trainer.predict(model, dict_loader())
    assert stages == ["fit", "validate", "test", "predict"]
