"""CUDA-only behaviour: no host sync in the probe step, fp16 loss scaling. Skipped without a GPU."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from sslprobe._metrics import Top1Accuracy
from sslprobe.callbacks import OnlineKNN, OnlineProbe, ProbeSweep
from sslprobe.probes import LinearProbe, MLPProbe
from tests.callbacks.test_online_probe import FeatureSpy, fit_under_mixed, reference_probe
from tests.conftest import D_EMB, NUM_CLASSES, dict_loader, make_module, make_trainer
from tests.graph.test_graphed_step import Interrupt, fit_sweep, fit_three_probes, fit_with_changing_rate

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
    # Flat pieces for the fused AdamW step; the long-lived gradient buffers dropped before the capture (the
    # graph's pool holds the captured step's gradients).
    assert probes[4].stepper._pieces is not None and not probes[4].stepper._grad_buffers
    # The LARS and the AdamW probe replayed their steps from CUDA graphs, captured in "error" mode.
    assert probes[0].graphed_steps > 0 and probes[4].graphed_steps > 0 and probes[3].graphed_steps > 0
    assert probes[1].graphed_steps == probes[2].graphed_steps == 0  # accumulation; dropout
    assert "eval/knn_top1" in trainer.callback_metrics


def test_16_mixed_probe_in_float32_is_exact_and_independent_of_the_main_loss_scale():
    model = make_module(optim={"type": "SGD", "lr": 1e-3})
    torch.manual_seed(1)
    initial = nn.Linear(D_EMB, NUM_CLASSES)
    make_opt = functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9)
    probe = OnlineProbe(
        model,
        "linear",
        "embedding",
        "label",
        probe=copy.deepcopy(initial),
        optimizer=make_opt,
        gradient_clip_val=0.05,
        precision="32",  # the forward in float32: the hand-written float32 loop is the exact reference
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


def test_under_16_mixed_the_probe_runs_under_float16_autocast_with_its_own_loss_scale():
    weight, autocasts, stored, probe = fit_under_mixed(None, "16-mixed", accelerator="gpu")
    reference, reference_autocasts, _, reference_probe_ = fit_under_mixed("32", "16-mixed", accelerator="gpu")
    assert autocasts == {torch.float16} and reference_autocasts == {None} and stored == {torch.float32}
    assert probe.stepper.scaling and not reference_probe_.stepper.scaling  # float32 weights need no scale
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
    assert not torch.equal(weight, reference)
    torch.testing.assert_close(weight, reference, rtol=0, atol=5e-2 * float(reference.abs().max()))


def test_16_true_probe_trains_with_its_own_loss_scale():
    model = make_module(optim={"type": "SGD", "lr": 1e-3})
    probe = OnlineProbe(
        model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES), optimizer={"type": "SGD", "lr": 0.5}
    )
    trainer = make_trainer(accelerator="gpu", precision="16-true", max_epochs=3, callbacks=[probe])
    trainer.fit(model, dict_loader(), dict_loader(n=24))
    weight = model.callbacks_modules["linear"].weight
    assert weight.dtype == torch.float16 and torch.isfinite(weight).all()
    assert probe.stepper.scaling and probe.stepper.steps == 18
    assert trainer.callback_metrics["eval/linear_top1"] > 0.5


# ---------------------------------------------------------------------------------------------- CUDA graphs


def _assert_same_run(a, b):
    (model_a, probes_a, trainer_a), (model_b, probes_b, trainer_b) = a, b
    for (key, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(x, y), key
    assert trainer_a.callback_metrics.keys() == trainer_b.callback_metrics.keys()
    for key, value in trainer_a.callback_metrics.items():
        assert torch.equal(trainer_b.callback_metrics[key], value), key
    assert [p.skipped_batches for p in probes_a] == [p.skipped_batches for p in probes_b]
    assert [p.stepper.steps for p in probes_a] == [p.stepper.steps for p in probes_b]


@pytest.mark.parametrize("precision", ["32-true", "16-true", "bf16-mixed", "16-mixed"])
def test_graph_replays_are_bit_identical_to_eager_steps(precision):
    # Under a mixed precision the probes' forward runs under the step's autocast, captured with the step.
    # Fused AdamW, LARS over BatchNorm and a torchmetrics metric; a NaN batch, a smaller last batch, validation.
    eager = fit_three_probes(False, accelerator="gpu", precision=precision)
    graphed = fit_three_probes(None, accelerator="gpu", precision=precision)
    assert all(p.graphed_steps == 4 + 6 for p in graphed[1]) and not any(p.graphed_steps for p in eager[1])
    _assert_same_run(eager, graphed)


def test_graph_resumes_from_a_checkpoint_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    eager = fit_three_probes(False, epochs=3, accelerator="gpu")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit_three_probes(None, epochs=3, callbacks=[ckpt, Interrupt()], enable_checkpointing=True, accelerator="gpu")
    resumed = fit_three_probes(None, epochs=3, ckpt_path=str(tmp_path / "last.ckpt"), accelerator="gpu")
    assert all(p.graphed_steps > 0 for p in resumed[1])
    for (key, x), y in zip(eager[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(x, y), key


class SyncingTop1(Top1Accuracy):
    """Says it updates in place, but reads a value on the host: a graph cannot hold it."""

    def update(self, preds, target):
        if int(target.min()) < 0:
            raise ValueError("negative label")
        super().update(preds, target)


class ReplacingTop1(Top1Accuracy):
    """Says it updates in place, but replaces its state tensors: a replay would write to the old ones."""

    def update(self, preds, target):
        self.correct = self.correct + (preds.argmax(-1) == target).sum()
        self.total = self.total + target.numel()


@pytest.mark.parametrize("metric", [SyncingTop1, ReplacingTop1])
def test_a_metric_a_graph_cannot_hold_leaves_the_step_eager(metric):
    def run(cuda_graph):
        model = make_module(optim={"type": "SGD", "lr": 0.05})
        torch.manual_seed(3)
        probe = OnlineProbe(
            model,
            "linear",
            "embedding",
            "label",
            probe=nn.Linear(D_EMB, NUM_CLASSES),
            optimizer="AdamW",
            metrics={"top1": metric()},
            cuda_graph=cuda_graph,
        )
        trainer = make_trainer(accelerator="gpu", max_epochs=2, callbacks=[probe])
        trainer.fit(model, dict_loader(n=64), dict_loader(n=24))
        return model, probe, trainer

    model, probe, trainer = run(None)
    # The capture fails (a host sync, or rebound states), is undone, and the step runs eagerly for good.
    assert probe.graphed_steps == 0 and probe.stepper.steps == 2 * 8
    reference, _, reference_trainer = run(False)
    for (key, x), y in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(x, y), key
    for key in ("train/linear_top1", "eval/linear_top1"):
        assert torch.equal(trainer.callback_metrics[key], reference_trainer.callback_metrics[key]), key


@pytest.mark.parametrize("change", ["epoch scheduler", "by hand"])
def test_a_graph_follows_a_new_learning_rate(change):
    eager, _ = fit_with_changing_rate(change, False, accelerator="gpu")
    model, probe = fit_with_changing_rate(change, None, accelerator="gpu")
    assert probe.graphed_steps == 3 * 6 - 2
    for (key, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key


def test_the_sweep_replays_exactly_as_its_eager_steps():
    (eager_model, eager, eager_trainer), (model, graphed, trainer) = (
        fit_sweep(c, accelerator="gpu") for c in (False, None)
    )
    assert graphed.graphed_steps == 3 + 6 and eager.graphed_steps == 0
    _assert_same_run((eager_model, [eager], eager_trainer), (model, [graphed], trainer))
    assert graphed.best_head == eager.best_head


def test_a_sweep_fitted_on_the_cpu_then_on_the_gpu():
    model = make_module(optim={"type": "SGD", "lr": 0.05})
    sweep = ProbeSweep(model, "sweep", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1])
    make_trainer(max_epochs=1, callbacks=[sweep]).fit(model, dict_loader())
    trainer = make_trainer(accelerator="gpu", max_epochs=2, callbacks=[sweep])
    trainer.fit(model, dict_loader())
    assert sweep.graphed_steps > 0 and sweep._head_loss_sum.device.type == "cuda"
    assert torch.isfinite(trainer.callback_metrics["train/sweep_lr0.1_wd0_loss"])
