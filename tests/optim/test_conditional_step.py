from __future__ import annotations

import math

import pytest
import torch

from sslprobe.optim import LARS, conditional_step


def pair(make_opt):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    return a, make_opt([a]), b, make_opt([b])


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
        lambda p: torch.optim.AdamW(p, lr=0.1, foreach=False),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.RMSprop(p, lr=0.01),
        lambda p: LARS(p, lr=0.1, momentum=0.9),
    ],
    ids=["adamw-fused", "sgd-fused", "adamw", "sgd-momentum", "rmsprop", "lars"],
)
def test_skipped_steps_leave_no_trace(make_opt):
    a, opt_a, b, opt_b = pair(make_opt)
    for i in range(4):
        grad = torch.randn(4, 3)
        if i in (0, 2):  # a sees two extra NaN steps, masked on the device
            a.grad = torch.full((4, 3), math.nan)
            conditional_step(opt_a, torch.tensor(1.0))
        a.grad, b.grad = grad.clone(), grad.clone()
        conditional_step(opt_a, torch.tensor(0.0))
        opt_b.step()
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()
