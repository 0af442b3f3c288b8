"""CUDA-only behaviour: no host sync in the probe step, fp16 loss scaling. Skipped without a GPU."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from sslprobe.callbacks import OnlineKNN, OnlineProbe, ProbeSweep
from sslprobe.probes import LinearProbe, MLPProbe
from tests.callbacks.test_online_probe import FeatureSpy, reference_probe
from tests.conftest import D_EMB, NUM_CLASSES, dict_loader, make_module, make_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class SyncGuard(Callback):
    """Turns CUDA's sync debug mode to "error" for the callbacks placed between `arm` and `disarm`."""

    def __init__(self, arm: bool, after: int = 2) -> None:
        self.arm, self.after, self.guarded = arm, after, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.arm and batch_idx >= self.after:  # the first batches check targets once (one deliberate sync)
            torch.cuda.set_sync_debug_mode("error")
            self.guarded += 1
        else:
            torch.cuda.set_sync_debug_mode(0)


def test_probe_step_makes_no_host_device_sync():
    model = make_module(optim={"type": "SGD", "lr": 1e-3})
    probes = [
        OnlineProbe(model, "lars", "embedding", "label", probe=LinearProbe(NUM_CLASSES)),
        OnlineProbe(
            model,
            "adamw",
            "embedding",
            "label",
            probe=nn.Linear(D_EMB, NUM_CLASSES),
            optimizer="AdamW",
            accumulate_grad_batches=2,
            gradient_clip_val=1.0,
            scheduler="CosineAnnealingLR",
        ),
        OnlineProbe(
            model,
            "sgd",
            "embedding",
            "label",
            probe=MLPProbe(NUM_CLASSES, 8, dropout=0.1),
            optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9},
            gradient_clip_val=0.1,
            gradient_clip_algorithm="value",
        ),
        ProbeSweep(model, "sweep", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1], weight_decays=[0.0]),
        # Large enough (16 x 300) for the fused AdamW step to run on flat pieces of a gradient buffer.
        OnlineProbe(model, "pieces", "embedding", "label", probe=nn.Linear(D_EMB, 300), optimizer="AdamW"),
        OnlineKNN(model, "knn", "embedding", "label", k=3),
    ]
    arm, disarm = SyncGuard(True), SyncGuard(False)
    trainer = make_trainer(accelerator="gpu", max_epochs=2, callbacks=[arm, *probes, disarm], log_every_n_steps=1)
    try:
        trainer.fit(model, dict_loader(n=64), dict_loader(n=24))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert arm.guarded == 12, arm.guarded  # batches 2..7 of each of the two epochs ran in "error" mode
    assert [p.stepper.steps for p in probes[:5]] == [16, 8, 16, 16, 16]
    assert probes[4].stepper._pieces is not None and probes[4].stepper._grad_buffers
    assert "eval/knn_top1" in trainer.callback_metrics


def test_16_mixed_probe_is_exact_and_independent_of_the_main_loss_scale():
    model = make_module(optim={"type": "SGD", "lr": 1e-3})
    torch.manual_seed(1)
    initial = nn.Linear(D_EMB, NUM_CLASSES)
    make_opt = functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9)
    probe = OnlineProbe(
        model, "linear", "embedding", "label", probe=copy.deepcopy(initial), optimizer=make_opt, gradient_clip_val=0.05
    )
    spy = FeatureSpy()
    make_trainer(accelerator="gpu", precision="16-mixed", max_epochs=2, callbacks=[spy, probe]).fit(
        model, dict_loader()
    )
    assert spy.seen[0][0].dtype == torch.float16  # features come from autocast
    seen = [(f.float().cpu(), y.cpu()) for f, y in spy.seen]
    expected = reference_probe(initial, seen, make_opt, clip_val=0.05)
    for got, want in zip(model.callbacks_modules["linear"].parameters(), expected.parameters()):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    assert model.callbacks_modules["linear"].weight.dtype == torch.float32


def test_16_true_probe_trains_with_its_own_loss_scale():
    model = make_module(optim={"type": "SGD", "lr": 1e-3})
    probe = OnlineProbe(
        model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES), optimizer={"type": "SGD", "lr": 0.5}
    )
    trainer = make_trainer(accelerator="gpu", precision="16-true", max_epochs=3, callbacks=[probe])
    trainer.fit(model, dict_loader(), dict_loader(n=24))
    weight = model.callbacks_modules["linear"].weight
    assert weight.dtype == torch.float16 and torch.isfinite(weight).all()
    assert probe.stepper._scaling and probe.stepper.steps == 18
    assert trainer.callback_metrics["eval/linear_top1"] > 0.5
