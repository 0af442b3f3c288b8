"""The examples run as written: probes declared in a LightningCLI config and in a Hydra config."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from sslprobe.callbacks import OnlineKNN, OnlineProbe
from sslprobe.probes import LinearProbe
from tests.conftest import D_EMB, D_IN, NUM_CLASSES, dict_loader, make_trainer

pytest.importorskip("sklearn")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_lightning_cli_config_declares_probes_that_serve_fit_validate_and_test(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning_cli import main

    config = EXAMPLES / "lightning_cli.yaml"
    cli = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)])
    trainer = cli.trainer
    probes = [c for c in trainer.callbacks if isinstance(c, (OnlineProbe, OnlineKNN))]
    assert [p.name for p in probes] == ["linear", "sweep", "knn"]
    fitted = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
    assert fitted["eval/linear_top1"] > 0.5 and fitted["eval/knn_top1"] > 0.8
    # The same callback objects, bound once, serve validate and test.
    trainer.validate(cli.model, datamodule=cli.datamodule)
    assert float(trainer.callback_metrics["eval/linear_top1"]) == pytest.approx(fitted["eval/linear_top1"])
    trainer.test(cli.model, datamodule=cli.datamodule)
    assert float(trainer.callback_metrics["test/linear_top1"]) == pytest.approx(fitted["eval/linear_top1"])
    assert [c for c in trainer.callbacks if isinstance(c, (OnlineProbe, OnlineKNN))] == probes


def test_hydra_config_declares_probes():
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from hydra_train import run

    with initialize_config_dir(config_dir=str(EXAMPLES / "hydra"), version_base=None):
        cfg = compose(config_name="config", overrides=["trainer.max_epochs=2"])
    trainer = run(cfg)
    assert float(trainer.callback_metrics["eval/linear_top1"]) > 0.5
    assert float(trainer.callback_metrics["eval/knn_top1"]) > 0.8


class ProbedInConfigure(pl.LightningModule):
    """Probes returned by configure_callbacks(), made anew at every fit / validate / test, as Lightning calls it."""

    def __init__(self, bind_at_setup: bool = True) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(D_IN, D_EMB), nn.ReLU()).requires_grad_(False)
        self.bind_at_setup = bind_at_setup
        self.anchor = nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return {"loss": self.anchor * 0.0, "embedding": self.backbone(batch["x"])}

    def validation_step(self, batch, batch_idx):
        return {"embedding": self.backbone(batch["x"])}

    def configure_optimizers(self):
        return torch.optim.SGD([self.anchor], lr=0.0)

    def configure_callbacks(self):
        module = None if self.bind_at_setup else self
        return [OnlineProbe(module, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))]


def test_probes_from_configure_callbacks_survive_every_entry_point():
    torch.manual_seed(0)
    model = ProbedInConfigure()
    trainer = make_trainer(max_epochs=3)
    trainer.fit(model, dict_loader(), dict_loader())
    after_fit = float(trainer.callback_metrics["eval/linear_top1"])
    weight = model.callbacks_modules["linear"].linear.weight.detach().clone()
    trainer.validate(model, dict_loader())  # a new callback object finds the trained probe
    assert float(trainer.callback_metrics["eval/linear_top1"]) == pytest.approx(after_fit)
    assert torch.equal(model.callbacks_modules["linear"].linear.weight, weight)
    assert after_fit > 0.8


def test_a_module_given_in_configure_callbacks_says_to_bind_at_setup():
    model = ProbedInConfigure(bind_at_setup=False)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, dict_loader(), dict_loader())
    with pytest.raises(ValueError, match=r"already used.*module=None"):
        trainer.validate(model, dict_loader())


def test_required_arguments_are_named_when_missing():
    with pytest.raises(TypeError, match="name is required"):
        OnlineProbe(None)
    with pytest.raises(TypeError, match="probe is required"):
        OnlineProbe(None, "linear", "embedding", "label")
    with pytest.raises(TypeError, match=r"input must be a key"):
        OnlineProbe(None, "linear", None, "label", probe=LinearProbe(NUM_CLASSES))
