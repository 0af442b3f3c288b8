"""Mistyped arguments fail at construction, with a message naming the callback, the argument and the fix."""

from __future__ import annotations

import pytest
import torchmetrics
from torch import nn

from sslprobe.callbacks import OnlineKNN, OnlineProbe, ProbeSweep
from sslprobe.probes import LinearProbe
from tests.conftest import D_EMB, NUM_CLASSES, dict_loader, make_module, make_trainer

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
