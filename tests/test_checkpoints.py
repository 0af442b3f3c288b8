"""Checkpoints and probes: the model loads without them, resumed runs add, drop and rename them."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from sslprobe.callbacks import OnlineKNN, OnlineProbe, RefitProbe
from sslprobe.probes import LinearProbe
from tests.conftest import D_EMB, D_IN, NUM_CLASSES, dict_loader, make_module, make_trainer


class PlainModel(pl.LightningModule):
    """A user's own LightningModule, probed by returning its features."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(D_IN, D_EMB), nn.ReLU())

    def training_step(self, batch, batch_idx):
        h = self.backbone(batch["x"])
        return {"loss": h.pow(2).mean(), "embedding": h}

    def validation_step(self, batch, batch_idx):
        return {"embedding": self.backbone(batch["x"])}

    def configure_optimizers(self):
        return torch.optim.SGD(self.backbone.parameters(), lr=0.01)


def fit_with_checkpoint(tmp_path, model, callbacks, epochs=1):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(max_epochs=epochs, callbacks=[*callbacks, ckpt], enable_checkpointing=True)
    trainer.fit(model, dict_loader(), dict_loader())
    return tmp_path / "last.ckpt"


def test_a_plain_module_loads_its_checkpoint_without_any_probe(tmp_path):
    torch.manual_seed(0)
    model = PlainModel()
    probes = [
        OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES)),
        OnlineKNN(model, "knn", "embedding", "label", k=3),
        RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES),
    ]
    path = fit_with_checkpoint(tmp_path, model, probes)
    refit_state = torch.load(path, weights_only=True)["callbacks"]["RefitProbe{'name': 'refit'}"]
    assert refit_state["fit"]["weight"].shape == (D_EMB, NUM_CLASSES)  # beside the model's weights, not inside
    loaded = PlainModel.load_from_checkpoint(path)  # strict, for inference
    assert torch.equal(loaded.backbone[0].weight, model.backbone[0].weight)
    plain = PlainModel()
    plain.load_state_dict(torch.load(path, weights_only=True)["state_dict"])  # strict too


def test_validate_from_a_checkpoint_evaluates_the_trained_probe(tmp_path):
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    path = fit_with_checkpoint(tmp_path, model, [probe], epochs=2)
    trained = model.callbacks_modules["linear"].linear.weight.detach().clone()
    fresh = make_module(seed=5)
    again = OnlineProbe(fresh, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    trainer = make_trainer(callbacks=[again])
    trainer.validate(fresh, dict_loader(), ckpt_path=path)
    assert torch.equal(fresh.callbacks_modules["linear"].linear.weight, trained)
    assert "eval/linear_top1" in trainer.callback_metrics


def test_a_resumed_run_adds_drops_and_renames_probes(tmp_path, caplog):
    model = make_module()
    kept = OnlineProbe(model, "kept", "embedding", "label", probe=LinearProbe(NUM_CLASSES), optimizer="AdamW")
    gone = OnlineProbe(model, "gone", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    path = fit_with_checkpoint(tmp_path, model, [kept, gone])
    kept_weight = model.callbacks_modules["kept"].linear.weight.detach().clone()

    resumed = make_module()
    kept_again = OnlineProbe(resumed, "kept", "embedding", "label", probe=LinearProbe(NUM_CLASSES), optimizer="AdamW")
    new = OnlineProbe(resumed, "renamed", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    fresh_weight = resumed.callbacks_modules["renamed"].weight.detach().clone()

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.kept = pl_module.callbacks_modules["kept"].linear.weight.detach().clone()
            self.renamed = pl_module.callbacks_modules["renamed"].weight.detach().clone()

    spy = Spy()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(max_epochs=2, callbacks=[kept_again, new, spy]).fit(
            resumed, dict_loader(), dict_loader(), ckpt_path=path
        )
    assert torch.equal(spy.kept, kept_weight)  # the kept probe continues from its checkpoint
    assert torch.equal(spy.renamed, fresh_weight)  # the new one starts fresh
    assert kept_again.stepper.steps == 12
    said = caplog.text
    assert "OnlineProbe(name='renamed'): the checkpoint holds no state for this probe; it starts fresh." in said
    assert said.count("which this run does not have") == 1 and "OnlineProbe{'name': 'gone'}" in said


def test_an_older_checkpoint_with_probes_inside_the_model_state_still_loads_into_them():
    model = make_module()
    OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    old_state = {**model.state_dict(), "callbacks_modules.linear.weight": torch.ones(NUM_CLASSES, D_EMB)}
    old_state["callbacks_modules.linear.bias"] = torch.zeros(NUM_CLASSES)
    model.load_state_dict(old_state, strict=True)
    assert torch.equal(model.callbacks_modules["linear"].weight, torch.ones(NUM_CLASSES, D_EMB))


@pytest.mark.parametrize("strict", [True, False])
def test_the_model_state_never_holds_probes(strict):
    model = make_module()
    OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    OnlineKNN(model, "knn", "embedding", "label")
    RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES)
    assert not [k for k in model.state_dict() if "callbacks_" in k]
    result = model.load_state_dict(make_module().state_dict(), strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
