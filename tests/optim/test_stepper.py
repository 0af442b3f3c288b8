from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sslprobe.optim import LARS
from sslprobe.optim.stepper import Stepper


def linear():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_a_non_finite_batch_does_not_count_toward_the_window():
    a, b = linear(), linear()
    stepper = Stepper(list(a.parameters()), torch.optim.SGD(a.parameters(), lr=0.5), accumulate_grad_batches=3)
    xs = [torch.randn(4, 3) for _ in range(3)]
    before = [p.detach().clone() for p in a.parameters()]
    for x in (xs[0], torch.full((4, 3), math.nan), xs[1]):
        stepper.backward(a(x).pow(2).mean())
    # three batches seen, but only two finite: the window is still open and the weights have not moved
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    stepper.backward(a(xs[2]).pow(2).mean())
    assert int(stepper.skipped) == 1
    # reference: one step on the mean gradient of the three finite batches
    grads = [torch.autograd.grad(b(x).pow(2).mean(), list(b.parameters())) for x in xs]
    with torch.no_grad():
        for i, p in enumerate(b.parameters()):
            p -= 0.5 * (grads[0][i] + grads[1][i] + grads[2][i]) / 3
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_window_without_finite_batch_changes_nothing():
    a = linear()
    before = [p.detach().clone() for p in a.parameters()]
    opt = torch.optim.SGD(a.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    stepper = Stepper(list(a.parameters()), opt, accumulate_grad_batches=2)
    for _ in range(2):
        stepper.backward(a(torch.full((4, 3), math.inf)).sum())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert int(stepper.skipped) == 2
    assert all(p.grad is None for p in a.parameters())


def test_float16_parameters_get_their_own_loss_scale():
    a = linear().half()
    stepper = Stepper(list(a.parameters()), torch.optim.SGD(a.parameters(), lr=0.1))
    assert float(stepper.state_dict()["scale"]) == 2.0**16
    big = torch.full((4, 3), 1000.0, dtype=torch.float16)
    before = [p.detach().clone() for p in a.parameters()]
    stepper.backward(a(big).float().pow(2).mean())  # scaled gradient overflows fp16: skipped, scale backs off
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert float(stepper.state_dict()["scale"]) == 2.0**15
    small = torch.randn(4, 3, dtype=torch.float16) * 0.01
    stepper.backward(a(small).float().pow(2).mean())
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), before))


class GradSpy(torch.optim.SGD):
    """Records the gradients it is asked to step on."""

    def __init__(self, params, **kw):
        params = list(params)
        super().__init__(params, **kw)
        self.seen = []

    def step(self, closure=None):
        self.seen.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
        return super().step(closure)


@pytest.mark.parametrize(("algorithm", "value"), [("norm", 1e-3), ("value", 1e-4)])
def test_clipping_by_norm_and_value(algorithm, value):
    a = linear()
    opt = GradSpy(a.parameters(), lr=0.1)
    stepper = Stepper(list(a.parameters()), opt, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
    stepper.backward(a(torch.randn(4, 3)).pow(2).sum())
    grad = opt.seen[0]
    if algorithm == "norm":
        assert grad.norm().item() == pytest.approx(value, rel=1e-3)
    else:
        assert grad.abs().max().item() == pytest.approx(value)


def test_state_dict_round_trip_keeps_the_partial_window():
    a, b = linear(), linear()
    s1 = Stepper(list(a.parameters()), torch.optim.Adam(a.parameters(), lr=0.1), accumulate_grad_batches=4)
    s2 = Stepper(list(b.parameters()), torch.optim.Adam(b.parameters(), lr=0.1), accumulate_grad_batches=4)
    xs = [torch.randn(4, 3) for _ in range(6)]
    for x in xs[:2]:
        s1.backward(a(x).sum())
    s2.load_state_dict(copy.deepcopy(s1.state_dict()))  # as a checkpoint would: no tensor shared with s1
    b.load_state_dict(a.state_dict())
    for x in xs[2:]:
        s1.backward(a(x).sum())
        s2.backward(b(x).sum())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert s1.steps == s2.steps == 1 and s1.batches == s2.batches == 2


@pytest.mark.parametrize("clip", [None, 0.05])
def test_device_step_is_all_the_device_work_and_end_step_the_host_counters(clip):
    # The split a CUDA graph captures (device half, replayed) and repeats on the host (end_step), against a plain
    # AdamW loop that leaves the non-finite batch out.
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    x = torch.randn(6, 8, 4)
    x[2, 0, 0] = math.nan  # one non-finite batch, skipped
    lin = copy.deepcopy(base)
    stepper = Stepper(list(lin.parameters()), torch.optim.AdamW(lin.parameters(), lr=0.01), gradient_clip_val=clip)
    reference = copy.deepcopy(base)
    opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    flags = []
    for i, batch in enumerate(x):
        found = stepper.device_step(lin(batch).pow(2).mean())
        assert found is stepper.last_found  # the same tensor at every step (a graph writes it in place)
        flags.append(float(found))
        assert stepper.steps == i and stepper.batches == 0  # nothing on the host yet
        assert stepper.end_step()
        if i != 2:
            opt.zero_grad()
            reference(batch).pow(2).mean().backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
            opt.step()
    assert flags == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert int(stepper.skipped) == 1 and stepper.steps == 6
    for a, b in zip(lin.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_capturable_needs_a_direct_step_a_fixed_rate_and_an_in_place_optimizer():
    lin = nn.Linear(2, 2)
    params = list(lin.parameters())
    sgd = Stepper(params, torch.optim.SGD(params, lr=0.1))
    assert not sgd.capturable  # the generic step rebuilds its state
    lars = Stepper(params, LARS(params, lr=0.1))
    assert lars.capturable
    assert not Stepper(params, LARS(params, lr=0.1, momentum=0.9, dampening=0.1)).capturable
    assert not Stepper(params, LARS(params, lr=0.1), accumulate_grad_batches=2).capturable
    moving = LARS(params, lr=0.1)
    assert not Stepper(params, moving, torch.optim.lr_scheduler.StepLR(moving, 1)).capturable
    fixed = LARS(params, lr=0.1)
    assert Stepper(params, fixed, torch.optim.lr_scheduler.ConstantLR(fixed, factor=1.0)).capturable


def test_tensors_are_every_tensor_a_step_touches():
    lin = nn.Linear(2, 2)
    stepper = Stepper(list(lin.parameters()), torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True))
    stepper.backward(lin(torch.ones(1, 2)).sum())
    held = {id(t) for t in stepper.tensors()}
    state = [v for s in stepper.optimizer.state.values() for v in s.values()]
    assert {id(p) for p in lin.parameters()} <= held
    assert {id(t) for t in state} <= held  # moments and step counts
    assert {id(stepper.loss_scale), id(stepper._skipped)} <= held


def test_to_moves_every_state_tensor_but_the_host_step_counts_of_torch_adam():
    from sslprobe.optim.sweep_optimizer import SweepOptimizer

    bank = nn.Parameter(torch.ones(2, 3))
    sweep = Stepper([bank], SweepOptimizer([bank], lrs=[0.1, 0.2], weight_decays=[0.0, 0.0]))
    lin = nn.Linear(2, 2)
    adam = Stepper(list(lin.parameters()), torch.optim.Adam(lin.parameters(), lr=0.1, foreach=True))
    for stepper, loss in ((sweep, bank.pow(2).sum()), (adam, lin(torch.ones(1, 2)).sum())):
        stepper.backward(loss)
        stepper.to(torch.device("meta"))
    # The sweep's step counts are device tensors its fused kernel reads with the bank: they move with it.
    assert all(v.device.type == "meta" for s in sweep.optimizer.state.values() for v in s.values())
    # Non-fused Adam reads its step count on the host: it stays there, the moments move.
    for state in adam.optimizer.state.values():
        assert state["step"].device.type == "cpu" and state["exp_avg"].device.type == "meta"


def test_a_loss_that_only_sums_a_parameter_steps():
    # Its gradient is an expanded tensor (stride 0), which the in-place non-finite check cannot write into.
    w = nn.Parameter(torch.ones(2, 3))
    stepper = Stepper([w], torch.optim.SGD([w], lr=0.5))
    stepper.backward(w.sum())
    assert torch.equal(w.detach(), torch.full((2, 3), 0.5))


def test_a_float16_autocast_forward_gets_a_loss_scale_and_skips_an_overflow():
    lin = nn.Linear(4, 2)
    stepper = Stepper(list(lin.parameters()), torch.optim.SGD(lin.parameters(), lr=0.1), scale_loss=True)
    before = [p.detach().clone() for p in lin.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = lin(torch.full((3, 4), 3e4)).float().pow(2).mean() * 1e3  # finite, but its scaled gradient is not
    assert torch.isfinite(loss)
    stepper.backward(loss)
    assert int(stepper.skipped) == 1 and float(stepper.loss_scale) == 2.0**15  # backed off, nothing changed
    assert all(torch.equal(p, b) for p, b in zip(lin.parameters(), before))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = lin(torch.ones(3, 4)).float().pow(2).mean()
    stepper.backward(loss)
    assert int(stepper.skipped) == 1 and not torch.equal(lin.weight, before[0])


def test_use_loss_scale_switches_the_scale_on_and_off_but_never_for_float16_parameters():
    weight = torch.nn.Parameter(torch.ones(3))
    stepper = Stepper([weight], torch.optim.SGD([weight], lr=0.1))
    assert not stepper.scaling and float(stepper.loss_scale) == 1.0
    stepper.use_loss_scale(True)
    assert stepper.scaling and float(stepper.loss_scale) == 2.0**16
    stepper.use_loss_scale(False)
    assert not stepper.scaling and float(stepper.loss_scale) == 1.0
    half = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    half_stepper = Stepper([half], torch.optim.SGD([half], lr=0.1))
    half_stepper.use_loss_scale(False)
    assert half_stepper.scaling  # float16 parameters always keep theirs
