from __future__ import annotations

import math

import pytest
from torch.utils.data import DataLoader, IterableDataset

from sslprobe.callbacks import OnlineProbe
from sslprobe.probes import LinearProbe
from tests.conftest import NUM_CLASSES, make_module, make_trainer, make_xy


class Stream(IterableDataset):
    """A streaming data set: no __len__, as a WebDataset or a generator."""

    def __init__(self, n: int = 48) -> None:
        self.x, self.y = make_xy(n)

    def __iter__(self):
        for x, y in zip(self.x, self.y):
            yield {"x": x, "label": y}


def stream_loader() -> DataLoader:
    return DataLoader(Stream(), batch_size=8)


def probe_with(model, scheduler):
    return OnlineProbe(
        model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES), optimizer="SGD", scheduler=scheduler
    )


def test_an_unsized_loader_without_max_steps_names_the_fix_instead_of_a_one_step_schedule():
    model = make_module()
    probe = probe_with(model, "CosineAnnealingLR")
    with pytest.raises(TypeError, match=r"max_steps=N.*T_max"):
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, stream_loader())
    assert probe.stepper is None or probe.stepper.optimizer.param_groups[0]["lr"] > 0


def test_an_unsized_loader_with_max_steps_schedules_over_those_steps():
    model = make_module()
    probe = probe_with(model, "CosineAnnealingLR")
    make_trainer(max_epochs=-1, max_steps=5, callbacks=[probe]).fit(model, stream_loader())
    assert probe.stepper.scheduler.T_max == 5
    # After 5 of 5 cosine steps the rate is at its end, having followed the curve (not one step).
    assert probe.stepper.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_the_default_constant_schedule_trains_on_an_unsized_loader():
    model = make_module()
    probe = probe_with(model, None)
    make_trainer(max_epochs=2, callbacks=[probe]).fit(model, stream_loader())
    assert probe.stepper.steps == 12
    assert probe.stepper.optimizer.param_groups[0]["lr"] == 1e-3  # SGD's own default, never decayed


def test_main_scheduler_of_module_on_an_unsized_loader():
    optim = {"optimizer": {"type": "SGD", "lr": 0.1}, "scheduler": "CosineAnnealingLR"}
    with pytest.raises(TypeError, match="max_steps=N"):
        make_trainer(max_epochs=1).fit(make_module(optim=optim), stream_loader())
    model = make_module(optim=optim)
    trainer = make_trainer(max_epochs=-1, max_steps=4)
    trainer.fit(model, stream_loader())
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.T_max == 4
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 * (1 + math.cos(math.pi * 4 / 4)) / 2, abs=1e-12)
