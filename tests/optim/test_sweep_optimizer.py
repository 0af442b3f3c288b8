from __future__ import annotations

import pytest
import torch
from torch import nn

from sslprobe.optim import sweep_optimizer
from sslprobe.optim.sweep_optimizer import SweepOptimizer

LRS, WDS = [0.1, 0.02, 0.3], [0.0, 0.1, 0.2]


def bank(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Parameter(torch.randn(3, 4, 5, dtype=dtype)), nn.Parameter(torch.randn(3, 4, dtype=dtype))


def sweep(weight, bias, kind="AdamW"):
    groups = [{"params": [weight]}, {"params": [bias], "decay": False, "adapt": False}]
    return SweepOptimizer(groups, lrs=LRS, weight_decays=WDS, kind=kind)


@pytest.mark.parametrize("kind", ["AdamW", "SGD", "LARS"])
def test_a_skipped_step_changes_nothing_bit_for_bit(kind):
    w, b = bank()
    w2, b2 = (nn.Parameter(t.detach().clone()) for t in (w, b))
    masked, plain = sweep(w, b, kind), sweep(w2, b2, kind)
    w.grad, b.grad = torch.full_like(w, float("nan")), torch.full_like(b, float("inf"))
    masked.step(found_inf=torch.tensor(1.0))
    for _ in range(3):
        gw, gb = torch.randn_like(w), torch.randn_like(b)
        w.grad, b.grad, w2.grad, b2.grad = gw.clone(), gb.clone(), gw.clone(), gb.clone()
        masked.step(found_inf=torch.tensor(0.0))
        plain.step()
    assert torch.equal(w, w2) and torch.equal(b, b2), kind
    for p, q in ((w, w2), (b, b2)):
        for key, value in plain.state[q].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(masked.state[p][key], value), (kind, key)


def test_every_adamw_head_equals_torch_adamw_on_that_head_alone():
    w, b = bank(torch.float64)
    heads = [(nn.Parameter(w[h].detach().clone()), nn.Parameter(b[h].detach().clone())) for h in range(3)]
    opt = sweep(w, b)
    refs = [
        torch.optim.AdamW([{"params": [hw], "weight_decay": wd}, {"params": [hb], "weight_decay": 0.0}], lr=lr)
        for (hw, hb), lr, wd in zip(heads, LRS, WDS)
    ]
    for _ in range(5):
        gw, gb = torch.randn_like(w), torch.randn_like(b)
        w.grad, b.grad = gw, gb
        opt.step(found_inf=torch.tensor(0.0, dtype=torch.float64))
        for h, ((hw, hb), ref) in enumerate(zip(heads, refs)):
            hw.grad, hb.grad = gw[h].clone(), gb[h].clone()
            ref.step()
    for h, (hw, hb) in enumerate(heads):
        torch.testing.assert_close(w[h], hw, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b[h], hb, rtol=1e-12, atol=1e-14)


def test_fused_and_tensor_op_adamw_agree(monkeypatch):
    results = []
    for devices in (sweep_optimizer._FUSED_DEVICES, ()):
        monkeypatch.setattr(sweep_optimizer, "_FUSED_DEVICES", devices)
        w, b = bank()
        opt = sweep(w, b)
        torch.manual_seed(1)
        for i in range(4):
            w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
            opt.step(found_inf=torch.tensor(1.0 if i == 1 else 0.0))
        results.append((w.detach().clone(), b.detach().clone(), opt.state[w]["step"].clone()))
    (w1, b1, s1), (w2, b2, s2) = results
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-6)
    assert float(s1) == float(s2) == 3.0


def test_a_skipped_adamw_step_keeps_even_the_sign_of_zero():
    w, b = bank()
    with torch.no_grad():
        w.view(-1)[::2] = -0.0
        b.view(-1)[::3] = -0.0
    before = [w.detach().clone(), b.detach().clone()]
    opt = sweep(w, b)
    w.grad, b.grad = torch.full_like(w, float("nan")), torch.full_like(b, float("nan"))
    opt.step(found_inf=torch.tensor(1.0))
    for now, then in zip((w, b), before):
        assert torch.equal(now, then) and torch.equal(torch.signbit(now), torch.signbit(then))


@pytest.mark.parametrize("kind", ["SGD", "AdamW"])
def test_rates_edited_in_place_take_effect(kind):
    w = nn.Parameter(torch.ones(2, 3))
    opt = SweepOptimizer([w], lrs=[0.1, 0.2], weight_decays=[0.0, 0.0], kind=kind, momentum=0.0)
    w.grad = torch.ones(2, 3)
    opt.step()
    first = 1.0 - w.detach().clone()  # each head's step: its rate (SGD) or about its rate (AdamW's first step)
    opt.param_groups[0]["lrs"].mul_(10)
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(before - w.detach(), 10 * first, rtol=1e-5, atol=0)


def test_graph_tensors_are_the_scratch_and_device_copies():
    w = nn.Parameter(torch.ones(2, 3))
    opt = SweepOptimizer([w], lrs=[0.1, 0.2], weight_decays=[0.0, 1e-2], kind="AdamW")
    assert opt.graph_tensors() == []
    w.grad = torch.ones(2, 3)
    opt.step()
    held = {id(t) for t in opt.graph_tensors()}
    assert {id(t) for t in opt.__dict__["_scratch_buffers"].values()} <= held
    assert len(held) >= 1 + 2  # a scratch update, the rates, the decay terms
