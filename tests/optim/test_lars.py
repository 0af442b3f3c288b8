from __future__ import annotations

import math

import pytest
import torch

from sslprobe.optim import LARS


def manual_lars(
    params,
    grads,
    bufs,
    *,
    lr,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    eta=1e-3,
    clip_lr=False,
    exclude_bias_n_norm=False,
    eps=1e-8,
):
    """The SPEC's LARS update written out in float64, one parameter at a time."""
    new_params, new_bufs = [], []
    for p, g, buf in zip(params, grads, bufs):
        p, g = p.double(), g.double()
        adapted = p.ndim > 1 or not exclude_bias_n_norm
        p_norm, g_norm = float(p.norm()), float(g.norm())
        if adapted and p_norm > 0 and g_norm > 0:
            t = eta * p_norm / (g_norm + weight_decay * p_norm + eps)
            if clip_lr:
                t = min(t / lr, 1.0)
            d = (g + weight_decay * p) * t
        else:
            d = g
        if momentum:
            buf = d.clone() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        new_params.append(p - lr * d)
        new_bufs.append(buf)
    return new_params, new_bufs


CONFIGS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "eta": 0.02},
    {"lr": 0.1, "clip_lr": True, "eta": 0.02, "exclude_bias_n_norm": True},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    {"lr": 0.5, "momentum": 0.8, "dampening": 0.3, "clip_lr": True, "eta": 1.0},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_manual_computation(config):
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, generator=g, dtype=torch.float64),
        torch.zeros(2, 2, dtype=torch.float64),
    ]
    params = [torch.nn.Parameter(p) for p in params]
    opt = LARS(params, **config)
    expected = [p.detach().clone() for p in params]
    bufs = [None] * len(params)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        expected, bufs = manual_lars(expected, grads, bufs, **config)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-12)


def test_zero_gradient_and_zero_weight_use_plain_gradient():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    opt = LARS([w], lr=1.0, eta=0.5, weight_decay=0.1)
    w.grad = torch.ones(3, 3)
    opt.step()
    assert torch.equal(w.detach(), -torch.ones(3, 3))  # ||p|| = 0: d = g, no weight decay, no scaling


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dampening", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_found_inf_masks_the_step_exactly(momentum, dampening, dtype):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 4, dtype=dtype))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = LARS([a], lr=0.1, momentum=momentum, dampening=dampening, eta=0.02)
    opt_b = LARS([b], lr=0.1, momentum=momentum, dampening=dampening, eta=0.02)
    grads = [torch.randn(5, 4, dtype=dtype) for _ in range(3)]
    # a: skipped NaN step first, then the real ones (device-masked); b: only the real ones (plain path)
    a.grad = torch.full((5, 4), math.nan, dtype=dtype)
    opt_a.step(found_inf=torch.tensor(1.0))
    assert torch.equal(a, b)
    for grad in grads:
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step(found_inf=torch.tensor(0.0))
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, r"LARS: lr must be a positive number, got 0.0"),
        ({"lr": 0.1, "momentum": -1}, r"momentum must be >= 0"),
        ({"lr": 0.1, "weight_decay": -1}, r"weight_decay must be >= 0"),
        ({"lr": 0.1, "eta": 0}, r"eta must be > 0"),
        ({"lr": 0.1, "nesterov": True}, r"nesterov needs momentum > 0"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LARS([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_state_dict_round_trip():
    w = torch.nn.Parameter(torch.randn(3, 3))
    opt = LARS([w], lr=0.1, momentum=0.9)
    w.grad = torch.randn(3, 3)
    opt.step()
    other = LARS([torch.nn.Parameter(w.detach().clone())], lr=0.1, momentum=0.9)
    other.load_state_dict(opt.state_dict())
    torch.testing.assert_close(next(iter(other.state.values()))["momentum_buffer"], opt.state[w]["momentum_buffer"])


def test_clipped_lars_steps_at_a_learning_rate_of_zero():
    # A schedule that reached 0, then a second fit or a resume with more epochs: no ZeroDivisionError, no change,
    # and the momentum buffer follows the gradient (the limit of min(t / lr, 1) as lr -> 0 is 1).
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = LARS([w], lr=0.1, momentum=0.9, eta=0.02, clip_lr=True, weight_decay=1e-4)
    opt.param_groups[0]["lr"] = 0.0
    before = w.detach().clone()
    w.grad = torch.randn(3, 4)
    opt.step()
    assert torch.equal(w.detach(), before)
    expected = w.grad + 1e-4 * before
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], expected)
    opt.param_groups[0]["lr"] = 0.05  # and it steps again once the rate is back
    opt.step()
    assert not torch.equal(w.detach(), before)
