from __future__ import annotations

import copy
import math

import pytest
import torch

from sslprobe.optim import LARS, conditional_step
from sslprobe.optim._pieces import PieceCache
from sslprobe.optim.conditional_step import captures_safely


def pair(make_opt, shape=(4, 3)):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(*shape))
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
@pytest.mark.parametrize("shape", [(4, 3), (100, 2048)], ids=["small", "cut-into-pieces"])
def test_skipped_steps_leave_no_trace(make_opt, shape):
    a, opt_a, b, opt_b = pair(make_opt, shape)
    pieces = PieceCache() if shape[0] > 4 else None  # fused Adam(W) then steps on 32 flat pieces of the weight
    for i in range(4):
        grad = torch.randn(*shape)
        if i in (0, 2):  # a sees two extra NaN steps, masked on the device
            a.grad = torch.full(shape, math.nan)
            conditional_step(opt_a, torch.tensor(1.0), pieces)
        a.grad, b.grad = grad.clone(), grad.clone()
        conditional_step(opt_a, torch.tensor(0.0), pieces)
        opt_b.step()
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "weight_decay": 0.1}, {"maximize": True}])
def test_fused_adam_fast_path_is_the_optimizers_own_step(kind, options):
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = kind([{"params": a[:1]}, {"params": a[1:], "weight_decay": 0.0}], lr=0.1, fused=True, **options)
    opt_b = kind([{"params": b[:1]}, {"params": b[1:], "weight_decay": 0.0}], lr=0.1, fused=True, **options)
    for i in range(5):
        grads = [torch.randn_like(p) for p in a]
        skip = torch.tensor(1.0 if i == 2 else 0.0)
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        conditional_step(opt_a, skip)  # the fast path from the second step on
        opt_b.found_inf, opt_b.grad_scale = skip, None
        opt_b.step()
        opt_a.param_groups[0]["lr"] *= 0.5  # a scheduler's change is seen
        opt_b.param_groups[0]["lr"] *= 0.5
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    for p, q in zip(a, b):
        for key in opt_b.state[q]:
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key


def test_fused_adam_plan_follows_a_loaded_state():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    ours = torch.optim.AdamW([a], lr=0.1, fused=True)
    for _ in range(2):  # the first step builds the state, the second uses (and caches) the direct kernel call
        a.grad = torch.randn(4, 3)
        conditional_step(ours, torch.tensor(0.0))
    # Another run's state, loaded into ours and into a plain twin: the next step must use the loaded moments.
    donor_param = torch.nn.Parameter(torch.randn(4, 3))
    donor = torch.optim.AdamW([donor_param], lr=0.1, fused=True)
    for _ in range(3):
        donor_param.grad = torch.randn(4, 3)
        donor.step()
    twin = torch.nn.Parameter(a.detach().clone())
    twin_opt = torch.optim.AdamW([twin], lr=0.1, fused=True)
    ours.load_state_dict(copy.deepcopy(donor.state_dict()))  # a state_dict shares the live tensors
    twin_opt.load_state_dict(copy.deepcopy(donor.state_dict()))
    grad = torch.randn(4, 3)
    a.grad, twin.grad = grad.clone(), grad.clone()
    conditional_step(ours, torch.tensor(0.0))
    twin_opt.step()
    assert torch.equal(a, twin)
    assert torch.equal(ours.state[a]["exp_avg"], twin_opt.state[twin]["exp_avg"])
    assert float(ours.state[a]["step"]) == 4.0


def test_fused_adam_plan_follows_a_new_param_group():
    torch.manual_seed(0)
    a, c = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    a2, c2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(c.detach().clone())
    ours, theirs = torch.optim.AdamW([a], lr=0.1, fused=True), torch.optim.AdamW([a2], lr=0.1, fused=True)
    for step in range(5):
        if step == 2:  # a group added after the plan was made
            ours.add_param_group({"params": [c]})
            theirs.add_param_group({"params": [c2]})
        grads = [torch.randn(3), torch.randn(3)]
        a.grad, a2.grad = grads[0].clone(), grads[0].clone()
        c.grad, c2.grad = grads[1].clone(), grads[1].clone()
        conditional_step(ours, torch.tensor(0.0))
        theirs.step()
    assert torch.equal(a, a2) and torch.equal(c, c2) and not torch.equal(c, c.detach() * 0)


def test_captures_safely_only_for_steps_that_change_state_in_place():
    w = torch.nn.Parameter(torch.ones(4))
    fused = torch.optim.AdamW([w], lr=0.1, fused=True)
    assert not captures_safely(fused)  # no state yet: the first step creates it
    w.grad = torch.ones(4)
    conditional_step(fused, torch.tensor(0.0))
    assert captures_safely(fused)
    fused.param_groups[0]["lr"] = torch.tensor(0.1)
    assert not captures_safely(fused)  # a tensor rate goes through Optimizer.step
    assert not captures_safely(torch.optim.AdamW([w], lr=0.1, foreach=True))
    assert not captures_safely(torch.optim.SGD([w], lr=0.1, momentum=0.9))
    lars = LARS([w], lr=0.1, momentum=0.9)
    assert not captures_safely(lars)  # its momentum buffers are made at the first step
    conditional_step(lars, torch.tensor(1.0))  # even a skipped one
    assert captures_safely(lars)
    damped = LARS([w], lr=0.1, momentum=0.9, dampening=0.5)
    conditional_step(damped, torch.tensor(0.0))
    assert not captures_safely(damped)
    assert captures_safely(LARS([w], lr=0.1, momentum=0.0, dampening=0.5))
