"""Every private name of torch, torchmetrics and Lightning that sslprobe uses, checked against what it must do.

An upgrade that renames or changes one of them fails here, by name, rather than as a wrong number elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from sslprobe import _internals
from sslprobe._metrics import Top1Accuracy
from tests.conftest import dict_loader, make_module, make_trainer


@pytest.mark.parametrize("decoupled", [False, True])
def test_the_fused_adam_kernel_steps_as_the_fused_optimizer(decoupled):
    torch.manual_seed(0)
    w = torch.randn(5, 3)
    g = torch.randn(5, 3)
    reference = nn.Parameter(w.clone())
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([reference], lr=0.1, weight_decay=0.01, fused=True)
    reference.grad = g.clone()
    opt.step()
    param, exp_avg, exp_avg_sq, step = w.clone(), torch.zeros(5, 3), torch.zeros(5, 3), torch.ones(())
    _internals.fused_adam_kernel(decoupled)(
        [param], [g.clone()], [exp_avg], [exp_avg_sq], [], [step],
        amsgrad=False, lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, maximize=False,
        grad_scale=None, found_inf=None,
    )  # fmt: skip
    assert torch.equal(param, reference.detach())
    assert torch.equal(exp_avg, opt.state[reference]["exp_avg"])


def test_the_non_finite_check_flags_and_unscales():
    found = torch.zeros(())
    tensors = [torch.tensor([2.0, 4.0]), torch.tensor([8.0])]
    _internals.non_finite_check_and_unscale_(tensors, found, torch.tensor(0.5))
    assert float(found) == 0.0 and tensors[0].tolist() == [1.0, 2.0] and tensors[1].tolist() == [4.0]
    _internals.non_finite_check_and_unscale_([torch.tensor([1.0, math.nan])], found, torch.tensor(1.0))
    assert float(found) == 1.0
    _internals.non_finite_check_and_unscale_([torch.tensor([1.0])], found, torch.tensor(1.0))
    assert float(found) == 1.0  # set, never cleared


def test_the_loss_scale_backs_off_on_overflow_and_grows_after_clean_steps():
    scale, tracker = torch.tensor(8.0), torch.zeros((), dtype=torch.int32)
    _internals.update_loss_scale_(scale, tracker, torch.tensor(1.0), interval=2)
    assert float(scale) == 4.0 and int(tracker) == 0
    for _ in range(2):
        _internals.update_loss_scale_(scale, tracker, torch.tensor(0.0), interval=2)
    assert float(scale) == 8.0


def test_the_version_counter_moves_at_in_place_changes_only():
    t = torch.zeros(3)
    before = _internals.tensor_version(t)
    _ = t + 1
    assert _internals.tensor_version(t) == before
    t.add_(1)
    assert _internals.tensor_version(t) == before + 1
    assert _internals.tensor_version(t.detach()) == before + 1  # a detached view shares the counter


def test_tensor_tables_are_a_modules_own_parameters_and_buffers():
    bn = nn.BatchNorm1d(3)
    parameters, buffers = _internals.tensor_tables(bn)
    assert parameters["weight"] is bn.weight and buffers["running_mean"] is bn.running_mean
    assert set(_internals.tensor_tables(nn.Sequential(bn))[0]) == set()  # not the children's


def test_metric_states_and_update_counters():
    metric = Top1Accuracy()
    assert _internals.metric_state_names(metric) == ["correct", "total"]
    counters = _internals.metric_counters(metric)
    metric.correct.add_(1)
    metric.total.add_(2)
    _internals.record_metric_update(metric)
    assert metric.update_called and float(metric.compute()) == 0.5
    _internals.restore_metric_counters(metric, counters)
    assert not metric.update_called


def test_logs_this_step_follows_the_logger_cadence():
    seen = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(_internals.logs_this_step(trainer))

    model = make_module()
    make_trainer(max_epochs=1, callbacks=[Spy()], log_every_n_steps=2).fit(model, dict_loader())
    assert seen == [False, True, False, True, False, True]  # steps 2, 4, 6 (1-based)


def test_the_foreach_kernels_do_their_math_on_lists():
    a, b = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [torch.tensor([4.0, 5.0]), torch.tensor([6.0])]
    assert [t.tolist() for t in _internals.foreach_add(a, b)] == [[5.0, 7.0], [9.0]]
    assert [t.tolist() for t in _internals.foreach_mul(a, 2.0)] == [[2.0, 4.0], [6.0]]
    assert [t.tolist() for t in _internals.foreach_div(b, a)] == [[4.0, 2.5], [2.0]]
    assert [float(n) for n in _internals.foreach_norm(a)] == pytest.approx([5**0.5, 3.0])
    c = [t.clone() for t in a]
    _internals.foreach_add_(c, b, alpha=2.0)
    _internals.foreach_sub_(c, a)
    _internals.foreach_mul_(c, 0.5)
    assert [t.tolist() for t in c] == [[4.0, 5.0], [6.0]]
    _internals.foreach_copy_(c, a)
    assert [t.tolist() for t in c] == [t.tolist() for t in a]


def test_batch_norm_types_cover_batch_norms_and_not_instance_norm():
    kinds = _internals.batch_norm_types()
    for layer in (
        torch.nn.BatchNorm1d(3),
        torch.nn.BatchNorm2d(3),
        torch.nn.SyncBatchNorm(3),
        torch.nn.LazyBatchNorm1d(),
    ):
        assert isinstance(layer, kinds), type(layer).__name__
    assert not isinstance(torch.nn.InstanceNorm1d(3), kinds) and not isinstance(torch.nn.LayerNorm(3), kinds)
