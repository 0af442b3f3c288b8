"""Mistyped arguments fail at construction, with a message naming the callback, the argument and the fix."""

from __future__ import annotations

import math

import pytest
import torch
import torchmetrics
from torch import nn

from sslprobe import Module
from sslprobe.callbacks import OnlineKNN, OnlineProbe, ProbeSweep
from sslprobe.probes import LinearProbe
from tests.conftest import D_EMB, NUM_CLASSES, dict_loader, forward, make_module, make_trainer

CALLBACKS = {
    "OnlineProbe": lambda m, name, **kw: OnlineProbe(m, name, "embedding", "label", probe=nn.Linear(D_EMB, 3), **kw),
    "ProbeSweep": lambda m, name, **kw: ProbeSweep(m, name, "embedding", "label", num_classes=NUM_CLASSES, **kw),
    "OnlineKNN": lambda m, name, **kw: OnlineKNN(m, name, "embedding", "label", **kw),
}


def accuracy() -> torchmetrics.Metric:
    return torchmetrics.classification.MulticlassAccuracy(num_classes=NUM_CLASSES)


@pytest.mark.parametrize("name", ["eval", "train", "keys", "forward"])
@pytest.mark.parametrize("kind", sorted(CALLBACKS))
def test_a_name_that_nn_module_dict_reserves(kind, name):
    model = make_module()
    match = rf"{kind}\(name='{name}'\): the name '{name}' is an attribute of nn.ModuleDict.*name='{name}_probe'"
    with pytest.raises(ValueError, match=match):
        CALLBACKS[kind](model, name)
    assert len(model.callbacks_modules) == len(model.callbacks_metrics) == 0  # nothing was registered


def test_the_stage_names_test_val_and_predict_are_fine_names():
    model = make_module()
    probes = [CALLBACKS["OnlineProbe"](model, name) for name in ("test", "val", "predict")]
    trainer = make_trainer(max_epochs=1, callbacks=probes)
    trainer.fit(model, dict_loader(), dict_loader())
    assert {"eval/test_top1", "eval/val_top1", "eval/predict_top1"} <= set(trainer.callback_metrics)
    trainer.test(model, dict_loader())
    assert {"test/test_top1", "test/val_top1", "test/predict_top1"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"eval": accuracy()}, r"the metric name 'eval' is an attribute of nn.ModuleDict.*\{'eval_top1': \.\.\.\}"),
        ({"val": {"keys": accuracy()}}, r"the metric name 'keys' is an attribute of nn.ModuleDict"),
        ({"train": accuracy(), "eval": accuracy()}, r"mixes the split keys \['train'\] with other keys \['eval'\]"),
    ],
)
@pytest.mark.parametrize("kind", ["OnlineProbe", "ProbeSweep", "OnlineKNN"])
def test_a_metric_name_that_nn_module_dict_reserves(kind, metrics, match):
    with pytest.raises(ValueError, match=rf"{kind}\(name='p'\): .*" + match):
        CALLBACKS[kind](make_module(), "p", metrics=metrics)


@pytest.mark.parametrize(
    ("probe", "match"),
    [
        (
            nn.Linear,
            r"probe is the class nn.Linear, not a module, and it needs arguments \(in_features, out_features\)"
            r".*probe=nn.Linear\(in_features=\.\.\., out_features=\.\.\.\)",
        ),
        (LinearProbe, r"probe is the class LinearProbe.*probe=functools.partial\(LinearProbe, num_classes=\.\.\.\)"),
    ],
)
def test_a_probe_given_as_a_class(probe, match):
    with pytest.raises(TypeError, match=r"OnlineProbe\(name='p'\): " + match):
        OnlineProbe(make_module(), "p", "embedding", "label", probe=probe)


def test_a_probe_class_that_needs_no_argument_is_a_factory():
    class Small(nn.Linear):
        def __init__(self, in_features: int = D_EMB, out_features: int = NUM_CLASSES) -> None:
            super().__init__(in_features, out_features)

    model = make_module()
    OnlineProbe(model, "p", "embedding", "label", probe=Small)
    assert isinstance(model.callbacks_modules["p"], Small)


def test_a_loss_given_as_a_class():
    match = r"OnlineProbe\(name='p'\): loss_fn is the class nn.CrossEntropyLoss, not a loss.*loss_fn=nn.CrossEntropyLoss\(\)"
    with pytest.raises(TypeError, match=match):
        CALLBACKS["OnlineProbe"](make_module(), "p", loss_fn=nn.CrossEntropyLoss)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lrs": 0.1}, TypeError, r"lrs must be a list of numbers, got the single number 0.1.*lrs=\[0.1\]"),
        ({"lrs": "0.1"}, TypeError, r"lrs must be a list of numbers, got '0.1' \(str\)"),
        ({"lrs": ["0.1"]}, TypeError, r"lrs must hold numbers, got '0.1' \(str\) at index 0"),
        ({"lrs": [0.1, True]}, TypeError, r"lrs must hold numbers, got True \(bool\) at index 1"),
        (
            {"lrs": [math.nan]},
            ValueError,
            r"learning rates must be > 0 and weight decays >= 0, all finite; lrs holds nan",
        ),
        ({"lrs": [0.1, math.inf]}, ValueError, r"all finite; lrs holds inf at index 1"),
        ({"lrs": [0.0]}, ValueError, r"learning rates must be > 0"),
        ({"lrs": [0.1, 0.1]}, ValueError, r"lrs holds 0.1 more than once"),
        ({"lrs": []}, ValueError, r"lrs and weight_decays must each hold at least one value; lrs is empty"),
        ({"weight_decays": 0.0}, TypeError, r"weight_decays must be a list of numbers.*weight_decays=\[0.0\]"),
        ({"weight_decays": ["0"]}, TypeError, r"weight_decays must hold numbers, got '0' \(str\)"),
        ({"weight_decays": [math.nan]}, ValueError, r"all finite; weight_decays holds nan at index 0"),
        ({"weight_decays": [-1e-4]}, ValueError, r"weight decays >= 0.*weight_decays holds -0.0001"),
    ],
)
def test_sweep_grid_errors(kwargs, error, match):
    with pytest.raises(error, match=r"ProbeSweep\(name='s'\): .*" + match):
        CALLBACKS["ProbeSweep"](make_module(), "s", **kwargs)


def test_sweep_grids_take_tuples_and_tensors():
    sweep = CALLBACKS["ProbeSweep"](
        make_module(), "s", lrs=torch.tensor([0.01, 0.1], dtype=torch.float64), weight_decays=(0, 5e-4)
    )
    assert sweep.lrs == [0.01, 0.1] and all(type(v) is float for v in sweep.lrs + sweep.weight_decays)
    assert sweep.head_labels == ["lr0.01_wd0", "lr0.01_wd0.0005", "lr0.1_wd0", "lr0.1_wd0.0005"]


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        (
            {"type": "AdamW", "lr": 1e-3},
            r"sets 'lr'=0.001, but every head takes its own from the grid: pass "
            r"lrs=\[0.001\]",
        ),
        ({"type": "SGD", "weight_decay": 1e-4}, r"sets 'weight_decay'=0.0001.*pass weight_decays=\[0.0001\]"),
        (
            {"type": "SGD", "betas": (0.9, 0.99)},
            r"the SGD sweep takes no 'betas'; its optimizer dict accepts 'momentum'",
        ),
        ({"type": "AdamW", "momentum": 0.9}, r"the AdamW sweep takes no 'momentum'.* accepts 'betas', 'eps'"),
        (
            {"type": "LARS", "nesterov": True},
            r"the LARS sweep takes no 'nesterov'.*'momentum', 'eta', 'clip_lr', 'eps'",
        ),
    ],
)
def test_sweep_optimizer_dict_errors(optimizer, match):
    with pytest.raises(TypeError, match=r"ProbeSweep\(name='s'\): .*" + match):
        CALLBACKS["ProbeSweep"](make_module(), "s", optimizer=optimizer)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"optimizer": {"type": "SGD", "betaz": 0.9}},
            TypeError,
            r"could not build SGD\(\{'betaz': 0.9\}\): it takes no keyword argument 'betaz'. It accepts: lr, momentum, "
            r"dampening, weight_decay, nesterov",
        ),
        (
            {"optimizer": {"type": "AdamW", "lr": 1e-3, "betaz": (0.9, 0.99)}},
            TypeError,
            r"AdamW.*no keyword argument 'betaz' \(did you mean 'betas'\?\). It accepts: lr, betas, eps",
        ),
        ({"optimizer": {"type": "LARS", "moment": 0.9}}, TypeError, r"'moment' \(did you mean 'momentum'\?\)"),
        (
            {"scheduler": {"type": "StepLR", "step": 2, "interval": "epoch"}},
            TypeError,
            r"StepLR.*no keyword argument 'step' \(did you mean 'step_size'\?\). It accepts: step_size, gamma",
        ),
        ({"optimizer": "Adamw2"}, ValueError, r"unknown optimizer 'Adamw2'. Did you mean 'AdamW'"),
        ({"scheduler": "Cosine"}, ValueError, r"unknown scheduler 'Cosine'"),
    ],
)
def test_probe_optimizer_and_scheduler_errors_come_at_construction(kwargs, error, match):
    with pytest.raises(error, match=r"OnlineProbe\(name='p'\): .*" + match):
        CALLBACKS["OnlineProbe"](make_module(), "p", **kwargs)


def test_the_main_optimizer_dict_is_checked_at_construction_too():
    with pytest.raises(TypeError, match=r"Module: could not build SGD.*no keyword argument 'betaz'"):
        Module(forward=forward, backbone=nn.Linear(2, 2), optim={"type": "SGD", "lr": 0.1, "betaz": 0.9})
