from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from sslprobe.optim import LARS, create_optimizer, create_scheduler
from sslprobe.optim.factories import DEFAULT_PROBE_LARS, split_interval


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


@pytest.mark.parametrize("spec", ["LARS", "lars", {"type": "LARS"}, LARS, None])
def test_lars_forms_give_the_probe_default(spec):
    opt = create_optimizer(spec, net().parameters())
    assert isinstance(opt, LARS)
    assert {k: opt.defaults[k] for k in DEFAULT_PROBE_LARS} == DEFAULT_PROBE_LARS


def test_dict_overrides_and_own_defaults():
    opt = create_optimizer({"type": "LARS", "lr": 0.3}, net().parameters())
    assert opt.defaults["lr"] == 0.3 and opt.defaults["eta"] == 0.02
    sgd = create_optimizer("SGD", net().parameters())
    assert sgd.defaults["lr"] == 1e-3 and not sgd.defaults["fused"]  # torch's own default lr
    assert create_optimizer("AdamW", net().parameters()).defaults["fused"] is True
    adam = create_optimizer({"type": "Adam", "foreach": True}, net().parameters())
    assert adam.defaults["foreach"] is True and not adam.defaults["fused"]


def test_weight_decay_skips_biases_and_norms_and_frozen_params():
    model = net()
    model[0].weight.requires_grad_(False)
    opt = create_optimizer({"type": "AdamW", "weight_decay": 0.05}, model.parameters())
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(2, 3)]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"])


def test_callables_and_instances():
    model = net()
    opt = create_optimizer(functools.partial(torch.optim.SGD, lr=0.2), model.parameters())
    assert opt.defaults["lr"] == 0.2
    inst = torch.optim.SGD(model.parameters(), lr=0.1)
    assert create_optimizer(inst, model.parameters()) is inst
    with pytest.raises(ValueError, match=r"X: the optimizer SGD was built over other parameters"):
        create_optimizer(torch.optim.SGD(net().parameters(), lr=0.1), model.parameters(), owner="X")
    with pytest.raises(TypeError, match=r"returned int, expected a torch.optim.Optimizer"):
        create_optimizer(lambda params: 3, model.parameters())


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("AdamWW", ValueError, r"unknown optimizer 'AdamWW'. Did you mean 'AdamW'"),
        ({"lr": 0.1}, ValueError, r"needs a 'type' key"),
        ({"type": "SGD", "lrr": 0.1}, TypeError, r"could not build SGD"),
        (3.0, TypeError, r"optimizer must be None, a name"),
    ],
)
def test_optimizer_errors(spec, error, match):
    with pytest.raises(error, match=match):
        create_optimizer(spec, net().parameters())


def test_no_trainable_parameters():
    model = net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_optimizer(None, model.parameters())


def sgd():
    return torch.optim.SGD(net().parameters(), lr=1.0)


@pytest.mark.parametrize(
    ("spec", "attr", "value"),
    [
        (None, "factor", 1.0),
        ("CosineAnnealingLR", "T_max", 90),
        ("cosineannealinglr", "T_max", 90),
        ("StepLR", "step_size", 30),
        ("LinearLR", "total_iters", 90),
        ({"type": "StepLR", "step_size": 7}, "step_size", 7),
        (torch.optim.lr_scheduler.PolynomialLR, "total_iters", 90),
        ("OneCycleLR", "total_steps", 90),
    ],
)
def test_scheduler_forms_and_defaults(spec, attr, value):
    assert getattr(create_scheduler(spec, sgd(), total=90), attr) == value


def test_exponential_default_decays_to_one_percent():
    opt = sgd()
    sched = create_scheduler("ExponentialLR", opt, total=10)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_scheduler_errors():
    opt = sgd()
    with pytest.raises(ValueError, match=r"unknown scheduler 'Cosine'. Did you mean"):
        create_scheduler("Cosine", opt)
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau needs a monitored metric"):
        create_scheduler("ReduceLROnPlateau", opt)
    with pytest.raises(ValueError, match=r"bound to another optimizer"):
        create_scheduler(torch.optim.lr_scheduler.StepLR(sgd(), 1), opt)
    with pytest.raises(TypeError, match=r"could not build CosineAnnealingLR.*length is unknown"):
        create_scheduler("CosineAnnealingLR", opt, total=float("inf"))
    with pytest.raises(ValueError, match=r"scheduler interval must be one of"):
        split_interval({"type": "StepLR", "interval": "batch"})


def test_scheduler_callable_and_instance():
    opt = sgd()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    assert create_scheduler(sched, opt) is sched
    made = create_scheduler(functools.partial(torch.optim.lr_scheduler.StepLR, step_size=5), opt)
    assert made.step_size == 5
