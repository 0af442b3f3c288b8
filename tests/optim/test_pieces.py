from __future__ import annotations

import torch

from sslprobe.optim import stepper as stepper_module
from sslprobe.optim._pieces import PieceCache, cut_alike
from sslprobe.optim.conditional_step import conditional_step
from sslprobe.optim.stepper import Stepper


def test_pieces_are_views_that_tile_each_tensor_the_same_way():
    big, other = torch.randn(100, 2048), torch.randn(100, 2048)
    small, strided = torch.randn(7), torch.randn(2048, 8).t()
    (a, b), counts = cut_alike([[big, small, strided], [other, small.clone(), strided.clone()]])
    assert counts == [32, 1, 1]  # the small tensor gains nothing; the transposed one is not contiguous
    assert [p.shape for p in a] == [q.shape for q in b]
    assert torch.equal(torch.cat(a[:32]), big.view(-1))
    assert all(p.data_ptr() % 16 == 0 for p in a[:32])  # vectorised loads stay possible
    a[0].fill_(3.0)  # views: writes reach the original
    assert bool((big.view(-1)[: a[0].numel()] == 3.0).all())
    assert a[32] is small and a[33] is strided


def test_the_cache_cuts_a_tensor_once_until_released():
    cache, w = PieceCache(), torch.zeros(100, 2048)
    (first,), _ = cut_alike([[w]], cache=cache)
    (again,), _ = cut_alike([[w]], cache=cache)
    assert all(x is y for x, y in zip(first, again))
    cache.release([w])
    (fresh,), _ = cut_alike([[w]], cache=cache)
    assert fresh[0] is not first[0] and torch.equal(torch.cat(fresh), w.view(-1))


def test_the_cache_cuts_again_when_a_tensor_gets_new_memory():
    cache, w = PieceCache(), torch.nn.Parameter(torch.zeros(100, 2048))
    first = cache.views(w, 6400)
    w.data = torch.ones(100, 2048)  # what a move or a cast of the module does to its parameters
    again = cache.views(w, 6400)
    assert again[0].data_ptr() == w.data_ptr() != first[0].data_ptr() and bool((again[0] == 1).all())


def test_the_cache_stays_bounded_when_tensors_are_never_released():
    cache = PieceCache()
    for _ in range(3 * PieceCache._LIMIT):
        cache.views(torch.zeros(8192), 2048)
    assert len(cache._views) <= PieceCache._LIMIT


def test_fused_adam_on_pieces_equals_torch_fused_adam_bit_for_bit():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(100, 2048)), torch.nn.Parameter(torch.randn(100))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, amsgrad=True, fused=True)
    theirs = torch.optim.AdamW(twins, lr=0.01, weight_decay=0.1, amsgrad=True, fused=True)
    cache = PieceCache()
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        conditional_step(ours, torch.tensor(0.0), cache)  # our direct call of the kernel, on pieces
        theirs.step()
        cache.release([p.grad for p in params])
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(ours.state[p][key], theirs.state[q][key]), key


def test_a_stepper_on_pieces_trains_exactly_as_one_on_whole_tensors(monkeypatch):
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(100, 2048) * 0.01) for _ in range(2)]
    weights[1].data.copy_(weights[0])
    steppers = []
    for w, cut in zip(weights, (True, False)):
        monkeypatch.setattr(stepper_module, "_cuts", lambda params, optimizer, cut=cut: cut)
        steppers.append(Stepper([w], torch.optim.AdamW([w], lr=0.01, fused=True)))
    x = torch.randn(8, 2048)
    for i in range(4):
        if i == 2:
            x[0, 0] = float("nan")  # one skipped batch
        for w, stepper in zip(weights, steppers):
            stepper.backward((x @ w.t()).pow(2).mean())
        x[0, 0] = 1.0
    assert torch.equal(weights[0], weights[1])
    assert int(steppers[0].skipped) == int(steppers[1].skipped) == 1


def test_the_stepper_finds_a_non_finite_value_in_the_last_piece_and_keeps_no_gradient(monkeypatch):
    w = torch.nn.Parameter(torch.zeros(100, 2048))
    monkeypatch.setattr(stepper_module, "_cuts", lambda params, optimizer: True)  # as on a GPU
    stepper = Stepper([w], torch.optim.AdamW([w], lr=0.1, fused=True))
    stepper.backward((w[0, 0] - 1.0) ** 2)  # the first step creates Adam's state (the regular path)
    # A finite loss (0) whose gradient is 3e38 + 3e38 = inf at the very last element of the weight only.
    before = w.detach().clone()
    loss = w[-1, -1] * 3e38 + w[-1, -1] * 3e38
    stepper.backward(loss)
    assert torch.isfinite(loss) and int(stepper.skipped) == 1 and torch.equal(w, before)
    stepper.backward((w[0, 0] - 1.0) ** 2)
    assert int(stepper.skipped) == 1 and float(w[0, 0].detach()) > float(before[0, 0])
    state = stepper.optimizer.state[w]
    kept = {id(entry[0]) for entry in stepper._pieces._views.values()}
    buffer = stepper._grad_buffers[0]  # the gradient is copied into a long-lived buffer, cut once
    assert kept == {id(w), id(state["exp_avg"]), id(state["exp_avg_sq"]), id(buffer)}  # long-lived tensors only
