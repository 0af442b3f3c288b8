from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from sslprobe.callbacks import OnlineProbe, TrainableCallback
from tests.conftest import D_EMB, NUM_CLASSES, dict_loader, make_module, make_trainer


class RegressionProbe(TrainableCallback):
    """A new kind of probe written against the base: only its module and its loss."""

    def select_inputs(self, trainer, pl_module, outputs, batch, batch_idx):
        return outputs["embedding"], batch["x"][:, :2]  # regress two input coordinates from the embedding

    def compute_loss(self, module, features, target):
        assert not features.requires_grad  # detached by the base: the loss cannot reach the main model
        return F.mse_loss(module(features), target)


def test_a_subclass_needs_only_its_module_and_loss(tmp_path):
    model = make_module(optim=None)
    probe = RegressionProbe(
        model,
        "regression",
        nn.Linear(D_EMB, 2),
        optimizer={"type": "SGD", "lr": 0.05},
        accumulate_grad_batches=2,
        scheduler="CosineAnnealingLR",
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(max_epochs=4, callbacks=[probe, ckpt], enable_checkpointing=True, log_every_n_steps=1)
    first = None

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            nonlocal first
            if first is None and "train/regression_loss" in trainer.callback_metrics:
                first = float(trainer.callback_metrics["train/regression_loss"])

    trainer.callbacks.append(Record())
    trainer.fit(model, dict_loader())
    assert probe.stepper.steps == 12
    assert float(trainer.callback_metrics["train/regression_loss"]) < first
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][probe.state_key]
    assert state["steps"] == 12 and "scheduler" in state


def test_the_main_loss_the_user_sees_is_untouched_by_probes():
    seen = {}

    class LossSpy(Callback):
        def __init__(self, key):
            self.key = key

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault(self.key, []).append(float(outputs["loss"]))

    for with_probes in (False, True):
        model = make_module()
        callbacks = (
            [OnlineProbe(model, "p", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))] if with_probes else []
        )
        make_trainer(max_epochs=1, callbacks=[*callbacks, LossSpy(with_probes)]).fit(model, dict_loader())
    assert seen[True] == seen[False]
    # and it is the main loss itself: the mean squared embedding of the first batch
    model = make_module()
    batch = next(iter(dict_loader()))
    assert seen[True][0] == float(model(batch, "fit")["loss"])


def test_state_key_is_unique_per_name():
    model = make_module()
    a = OnlineProbe(model, "a", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    b = OnlineProbe(model, "b", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    assert a.state_key != b.state_key and "a" in a.state_key
