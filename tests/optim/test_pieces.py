from __future__ import annotations

import torch

from sslprobe.optim import LARS
from sslprobe.optim._pieces import cut_alike
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


def test_fused_adam_on_pieces_equals_torch_fused_adam_bit_for_bit():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(100, 2048)), torch.nn.Parameter(torch.randn(100))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, amsgrad=True, fused=True)
    theirs = torch.optim.AdamW(twins, lr=0.01, weight_decay=0.1, amsgrad=True, fused=True)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        conditional_step(ours, torch.tensor(0.0))  # our direct call of the kernel, on pieces
        theirs.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(ours.state[p][key], theirs.state[q][key]), key


def test_lars_on_pieces_equals_lars_on_whole_tensors(monkeypatch):
    from sslprobe.optim import lars

    results = []
    for cut in (lars.cut_alike, lambda lists, pieces=32: ([list(x) for x in lists], [1] * len(lists[0]))):
        monkeypatch.setattr(lars, "cut_alike", cut)
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(100, 2048))
        opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=1e-4)
        for _ in range(3):
            w.grad = torch.randn_like(w)
            conditional_step(opt, torch.tensor(0.0))
        results.append(w.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)  # norms summed in another order


def test_lars_norms_from_pieces_equal_the_float64_norms():
    from sslprobe.optim.lars import _norms

    torch.manual_seed(0)
    weight, grad, small = torch.randn(100, 2048), torch.randn(100, 2048) * 1e-3, torch.randn(7)
    for tensors in ([weight, grad], [weight, small]):  # cut alike, and the fallback for uneven pieces
        expected = torch.stack([t.double().norm() for t in tensors]).float()
        torch.testing.assert_close(_norms(tensors), expected, rtol=1e-6, atol=0)


def test_a_non_finite_value_in_the_last_piece_is_found():
    w = torch.nn.Parameter(torch.zeros(100, 2048))
    stepper = Stepper([w], torch.optim.SGD([w], lr=0.1))
    # A finite loss (0) whose gradient is 3e38 + 3e38 = inf at the very last element of the weight only.
    loss = w[-1, -1] * 3e38 + w[-1, -1] * 3e38
    stepper.backward(loss)
    assert torch.isfinite(loss) and int(stepper.skipped) == 1
    assert torch.equal(w, torch.zeros(100, 2048))
    stepper.backward((w[0, 0] - 1.0) ** 2)  # a finite one steps
    assert int(stepper.skipped) == 1 and float(w[0, 0]) > 0
