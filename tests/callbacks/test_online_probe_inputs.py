"""What OnlineProbe makes of the data it is given: targets, batch sizes, shapes, several loaders, bad batches.

Each test is a situation a user meets on the first day, where a wrong number must never be logged silently.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from sslprobe import Module
from sslprobe.callbacks import OnlineProbe, ProbeSweep
from sslprobe.probes import LinearProbe, MLPProbe
from tests.conftest import D_EMB, NUM_CLASSES, DictDataset, dict_loader, make_module, make_trainer, make_xy


class PoisonFirst(Callback):
    """NaN features in the very first training batch (a lazy probe materialises on it)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 0:
            outputs["embedding"] = torch.full_like(outputs["embedding"], math.nan)


def labelled_loader(y: torch.Tensor, n: int = 48, batch_size: int = 8, seed: int = 0) -> DataLoader:
    x, _ = make_xy(n, seed)
    return DataLoader(DictDataset(x, y), batch_size=batch_size)


def eval_accuracy_by_hand(model: Module, name: str, loader: DataLoader) -> float:
    """The probe's top-1 over the labelled samples of ``loader``, computed outside the callback."""
    probe = model.callbacks_modules[name].eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            preds = probe(model.backbone(batch["x"]))
            preds = preds[0] if preds.ndim == 3 else preds
            labelled = batch["label"] != -100
            correct += int((preds.argmax(-1) == batch["label"])[labelled].sum())
            total += int(labelled.sum())
    return correct / total


@pytest.mark.parametrize("kind", ["linear", "mlp", "sweep"])
def test_a_lazy_probe_whose_first_batch_is_not_finite_keeps_clean_statistics(kind):
    model = make_module(optim=None)
    if kind == "sweep":
        probe = ProbeSweep(model, kind, "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01], weight_decays=[0.0])
    else:
        module = LinearProbe(NUM_CLASSES) if kind == "linear" else MLPProbe(NUM_CLASSES, hidden=16)
        probe = OnlineProbe(model, kind, "embedding", "label", probe=module)
    trainer = make_trainer(max_epochs=3, callbacks=[PoisonFirst(), probe])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dict_loader(), dict_loader(seed=0))
    assert probe.skipped_batches == 1
    for buffer in model.callbacks_modules[kind].buffers():
        assert torch.isfinite(buffer).all()
    logged = float(trainer.callback_metrics[f"eval/{kind}_top1"])
    assert logged > 0.8  # separable data: a NaN normalisation would read chance (1/3)
    assert logged == pytest.approx(eval_accuracy_by_hand(model, kind, dict_loader(seed=0)))


def test_a_last_batch_of_one_sample_is_skipped_and_said_once():
    model = make_module(optim=None)
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    trainer = make_trainer(max_epochs=2, callbacks=[probe])
    with pytest.warns(UserWarning, match=r"OnlineProbe\(name='linear'\): skipped 1 training batch.*single sample"):
        trainer.fit(model, dict_loader(n=17), dict_loader(n=17))  # batches of 8, 8 and 1
    assert probe.stepper.steps == 4  # two of three batches in each epoch
    assert "eval/linear_top1" in trainer.callback_metrics


def test_ignored_targets_are_left_out_of_the_accuracy():
    y = torch.arange(48) % NUM_CLASSES
    y_half = y.clone()
    y_half[1::2] = -100  # half the samples unlabelled
    model = make_module(optim=None)
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    trainer = make_trainer(max_epochs=3, callbacks=[probe])
    trainer.fit(model, labelled_loader(y_half), labelled_loader(y_half))
    expected = eval_accuracy_by_hand(model, "linear", labelled_loader(y_half))
    assert float(trainer.callback_metrics["eval/linear_top1"]) == pytest.approx(expected)
    assert expected > 0.8  # counting the unlabelled half as wrong would read at most 0.5


def test_a_batch_with_no_label_is_skipped_and_said_as_such():
    y = torch.arange(48) % NUM_CLASSES
    y[8:16] = -100  # the second batch is wholly unlabelled
    model = make_module(optim=None)
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES, in_features=D_EMB))
    trainer = make_trainer(max_epochs=1, callbacks=[probe])
    with pytest.warns(RuntimeWarning, match=r"1 training batch\(es\) with no labelled sample.*ignore_index=-100") as w:
        trainer.fit(model, labelled_loader(y))
    assert not any("NaN/Inf" in str(m.message) for m in w)
    assert probe.skipped_batches == 1 and probe.stepper.steps == 6


def test_an_evaluation_without_any_label_logs_no_number():
    model = make_module(optim=None)
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    trainer = make_trainer(max_epochs=1, callbacks=[probe])
    with pytest.warns(UserWarning, match=r"eval/linear_top1 is not logged: no sample"):
        trainer.fit(model, dict_loader(), labelled_loader(torch.full((48,), -100)))
    assert "eval/linear_top1" not in trainer.callback_metrics


def test_soft_targets_are_scored_by_their_most_likely_class():
    x, y = make_xy()
    soft = torch.nn.functional.one_hot(y, NUM_CLASSES).float() * 0.8 + 0.2 / NUM_CLASSES  # smoothed labels
    model = make_module(optim=None)
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    trainer = make_trainer(max_epochs=4, callbacks=[probe])
    trainer.fit(model, DataLoader(DictDataset(x, soft), batch_size=8))
    assert float(trainer.callback_metrics["train/linear_top1"]) > 0.8  # logits against probabilities read 0.0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels_are_converted(dtype):
    y = (torch.arange(48) % NUM_CLASSES).to(dtype)
    model = make_module(optim=None)
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    trainer = make_trainer(max_epochs=2, callbacks=[probe])
    trainer.fit(model, labelled_loader(y), labelled_loader(y))
    assert float(trainer.callback_metrics["eval/linear_top1"]) > 0.8


def test_several_validation_loaders_each_get_their_own_number():
    y = torch.arange(48) % NUM_CLASSES
    shuffled = y[torch.randperm(48, generator=torch.Generator().manual_seed(1))]
    model = make_module(optim=None)
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    sweep = ProbeSweep(model, "sweep", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1])
    trainer = make_trainer(max_epochs=3, callbacks=[probe, sweep])
    in_domain, shifted = labelled_loader(y), labelled_loader(shuffled)
    trainer.fit(model, labelled_loader(y), [in_domain, shifted])
    metrics = trainer.callback_metrics
    assert "eval/linear_top1" not in metrics
    first, second = (
        float(metrics["eval/linear_top1/dataloader_idx_0"]),
        float(metrics["eval/linear_top1/dataloader_idx_1"]),
    )
    assert first == pytest.approx(eval_accuracy_by_hand(model, "linear", in_domain))
    assert second == pytest.approx(eval_accuracy_by_hand(model, "linear", shifted))
    assert first > 0.8 and second < 0.7
    assert {"eval/sweep_top1/dataloader_idx_0", "eval/sweep_top1/dataloader_idx_1"} <= set(metrics)
    # test() with one loader keeps the plain names
    trainer.test(model, in_domain)
    assert float(trainer.callback_metrics["test/linear_top1"]) == pytest.approx(first)


def conv_forward(self, batch, stage):
    return {"embedding": self.backbone(batch["x"]).view(-1, 4, 2, 2)}  # a conv feature map (B, C, H, W)


@pytest.mark.parametrize("kind", ["linear", "mlp", "sweep"])
def test_feature_maps_are_flattened_in_every_stage(kind):
    torch.manual_seed(0)
    model = Module(forward=conv_forward, backbone=nn.Linear(8, 16))
    if kind == "sweep":
        probe = ProbeSweep(model, kind, "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01], weight_decays=[0.0])
    else:
        module = LinearProbe(NUM_CLASSES) if kind == "linear" else MLPProbe(NUM_CLASSES, hidden=8)
        probe = OnlineProbe(model, kind, "embedding", "label", probe=module)
    trainer = make_trainer(max_epochs=2, callbacks=[probe])
    trainer.fit(model, dict_loader(), dict_loader())
    trainer.validate(model, dict_loader())
    assert model.callbacks_modules[kind].in_features == 16
    assert float(trainer.callback_metrics[f"eval/{kind}_top1"]) > 0.5


def test_token_features_into_a_plain_linear_layer_say_to_pool():
    model = Module(
        forward=lambda self, b, stage: {"tokens": self.backbone(b["x"]).view(-1, 4, 4)}, backbone=nn.Linear(8, 16)
    )
    probe = OnlineProbe(model, "linear", "tokens", "label", probe=nn.Linear(4, NUM_CLASSES))
    with pytest.raises(RuntimeError, match=r"one per token or position.*pool the features.*AttentiveProbe"):
        make_trainer(callbacks=[probe]).fit(model, dict_loader())


def test_two_views_against_one_label_each_say_so():
    def two_views(self, batch, stage):
        h = self.backbone(batch["x"])
        return {"embedding": torch.cat([h, h])}

    model = Module(forward=two_views, backbone=nn.Linear(8, D_EMB))
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES))
    with pytest.raises(RuntimeError, match=r"16 rows but the target 'label' has 8 labels \(2 views") as error:
        make_trainer(callbacks=[probe]).fit(model, dict_loader())
    assert ".view(-1)" not in str(error.value)


def test_a_scalar_input_is_refused_clearly():
    model = make_module(optim=None)
    probe = OnlineProbe(model, "linear", "loss", "label", probe=LinearProbe(NUM_CLASSES))
    with pytest.raises(TypeError, match=r"input 'loss' is a scalar.*'embedding'"):
        make_trainer(callbacks=[probe]).fit(model, dict_loader())


def test_a_one_head_sweep_validates_and_logs():
    model = make_module(optim=None)
    sweep = ProbeSweep(model, "sweep", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.1], weight_decays=[0.0])
    trainer = make_trainer(max_epochs=2, callbacks=[sweep])
    trainer.fit(model, dict_loader(), dict_loader())
    metrics = trainer.callback_metrics
    assert float(metrics["eval/sweep_top1"]) == float(metrics["eval/sweep_lr0.1_wd0_top1"])
    assert float(metrics["eval/sweep_best_lr"]) == pytest.approx(0.1)


class Drift(Callback):
    """Moves the encoder's features between validations: a shift and a scale that change every epoch."""

    def on_train_epoch_start(self, trainer, pl_module):
        g = torch.Generator().manual_seed(trainer.current_epoch)
        with torch.no_grad():
            pl_module.shift.copy_(torch.randn(D_EMB, generator=g) * 4 * trainer.current_epoch)
            pl_module.scale.copy_(torch.rand(D_EMB, generator=g) * 3 * trainer.current_epoch + 1)


def drifting_forward(self, batch, stage):
    # BatchNorm makes training and evaluation features differ, as in most encoders.
    return {"embedding": self.backbone(batch["x"]) * self.scale + self.shift}


class ExactReference(Callback):
    """After each validation: the probe's weights scored on the validation features with their exact statistics."""

    def __init__(self, loader):
        self.loader, self.logged, self.exact = loader, [], []

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        probe = pl_module.callbacks_modules["linear"]
        with torch.no_grad():
            batch = next(iter(self.loader))
            feats = drifting_forward(pl_module, batch, "validate")["embedding"].double()
            z = (feats - feats.mean(0)) / torch.sqrt(feats.var(0, unbiased=False) + probe.norm.eps)
            preds = probe.linear(z.float()).argmax(1)
        self.exact.append(float((preds == batch["label"]).float().mean()))
        self.logged.append(float(trainer.callback_metrics["eval/linear_top1"]))


def test_eval_normalisation_follows_an_encoder_that_moves():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, D_EMB), nn.BatchNorm1d(D_EMB), nn.ReLU())
    model = Module(
        forward=drifting_forward,
        backbone=backbone,
        shift=nn.Parameter(torch.zeros(D_EMB), requires_grad=False),
        scale=nn.Parameter(torch.ones(D_EMB), requires_grad=False),
    )
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    val = dict_loader(n=48, batch_size=48)
    reference = ExactReference(val)
    trainer = make_trainer(max_epochs=4, callbacks=[Drift(), probe, reference])
    trainer.fit(model, dict_loader(batch_size=16), val)
    assert len(reference.logged) == 4
    assert reference.logged == pytest.approx(reference.exact, abs=1e-6)
    assert min(reference.logged) > 0.6


@pytest.mark.parametrize("kind", ["linear", "plain"])
def test_features_made_under_inference_mode_train_the_probe(kind):
    def frozen_forward(self, batch, stage):
        with torch.inference_mode():
            return {"embedding": self.backbone(batch["x"])}

    torch.manual_seed(0)
    model = Module(forward=frozen_forward, backbone=nn.Sequential(nn.Linear(8, D_EMB), nn.ReLU()))
    module = LinearProbe(NUM_CLASSES) if kind == "linear" else nn.Linear(D_EMB, NUM_CLASSES)
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=module, optimizer={"type": "AdamW", "lr": 0.05})
    trainer = make_trainer(max_epochs=3, callbacks=[probe])
    trainer.fit(model, dict_loader(), dict_loader())
    assert probe.stepper.steps == 18
    assert float(trainer.callback_metrics["eval/linear_top1"]) > 0.8
