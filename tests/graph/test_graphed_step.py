"""The probe's training step as a graph: the host-side logic, on the CPU with a stand-in that re-runs the body.

The CUDA capture itself is tested on a GPU in tests/test_cuda.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from sslprobe._metrics import Top1Accuracy
from sslprobe.callbacks import OnlineProbe, ProbeSweep
from sslprobe.graph import GraphedStep, StepGraph
from sslprobe.graph.rollback import Rollback
from sslprobe.probes import FeatureNorm, LinearProbe
from tests.conftest import D_EMB, NUM_CLASSES, dict_loader, make_module, make_trainer


class ReplayingGraph(StepGraph):
    """A CPU stand-in for the CUDA graph: ``capture`` keeps the body and its static inputs (running nothing, as a
    capture does); ``replay`` copies the inputs in, runs the body and writes into the same output tensors each
    time. Set ``fail`` to make that many captures raise."""

    def __init__(self, fail: int = 0) -> None:
        super().__init__()
        self.fail, self.captures, self.replays = fail, 0, 0

    def capture(self, body, inputs, held, settings=None):
        self.drop()
        if self.fail:
            self.fail -= 1
            raise RuntimeError("operation not permitted when stream is capturing")
        self._graph, self._inputs = body, tuple(x.detach().clone() for x in inputs)
        self._held, self._key, self._settings = list(held), tuple(t.data_ptr() for t in held), settings
        self.captures += 1

    def replay(self, inputs):
        for static, x in zip(self._inputs, inputs):
            static.copy_(x)
        self.replays += 1
        outputs = self._graph(*self._inputs)
        if self._outputs is None:
            self._outputs = outputs
        else:  # as a graph's outputs: the same tensors, overwritten at every replay
            _copy_into(self._outputs, outputs)
        return self._outputs

    def drop(self):
        self._graph, self._inputs, self._outputs = None, (), None
        self._held, self._key, self._settings = [], (), None


def _copy_into(kept, new):
    if isinstance(kept, torch.Tensor):
        kept.copy_(new)
    elif isinstance(kept, (tuple, list)):
        for k, n in zip(kept, new):
            _copy_into(k, n)


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """Let the graph path run on the CPU: every other reason to run eagerly still holds."""
    original = GraphedStep._reason

    def blocker(self, parts):
        reason = original(self, parts)
        return None if reason is not None and "CUDA" in reason else reason

    monkeypatch.setattr(GraphedStep, "_reason", blocker)


class Poison(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 4:
            outputs["embedding"] = torch.full_like(outputs["embedding"], math.nan)


class Interrupt(Callback):
    """Stops after the first epoch, as if the job were killed after its checkpoint."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _probes(model, cuda_graph):
    torch.manual_seed(3)
    return [
        OnlineProbe(
            model,
            "adamw",
            "embedding",
            "label",
            probe=nn.Linear(D_EMB, NUM_CLASSES),
            optimizer="AdamW",
            cuda_graph=cuda_graph,
        ),
        # BatchNorm (running statistics undone on a non-finite batch) and the default LARS.
        OnlineProbe(
            model,
            "lars",
            "embedding",
            "label",
            probe=LinearProbe(NUM_CLASSES, in_features=D_EMB),
            cuda_graph=cuda_graph,
        ),
        # A torchmetrics metric: updated after each replay (it replaces its state tensors at each update).
        OnlineProbe(
            model,
            "metric",
            "embedding",
            "label",
            probe=nn.Linear(D_EMB, NUM_CLASSES),
            optimizer="AdamW",
            metrics={"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=NUM_CLASSES)},
            cuda_graph=cuda_graph,
        ),
    ]


def fit_three_probes(cuda_graph, graphs=None, epochs=2, callbacks=(), ckpt_path=None, **trainer_kw):
    """Three probes (fused AdamW; LARS over BatchNorm; a torchmetrics metric) with a NaN batch in the first epoch."""
    model = make_module(optim={"type": "SGD", "lr": 0.05})
    probes = _probes(model, cuda_graph)
    for probe, graph in zip(probes, graphs or []):
        probe._graphed.graph = graph
    trainer = make_trainer(max_epochs=epochs, callbacks=[Poison(), *probes, *callbacks], **trainer_kw)
    # 52 samples in batches of 8: the last batch (4) has another shape and runs eagerly.
    trainer.fit(model, dict_loader(n=52), dict_loader(n=24), ckpt_path=ckpt_path)
    return model, probes, trainer


def test_graph_path_trains_and_measures_exactly_as_the_eager_step(graphs_on_cpu):
    eager_model, eager_probes, eager_trainer = fit_three_probes(False)
    graphs = [ReplayingGraph() for _ in range(3)]
    model, probes, trainer = fit_three_probes(None, graphs)
    # Per epoch of 7 batches: 2 eager warm-up batches (first epoch), 4 replays, and the last, smaller batch eagerly.
    assert [g.replays for g in graphs] == [p.graphed_steps for p in probes] == [4 + 6, 4 + 6, 4 + 6]
    assert [g.captures for g in graphs] == [1, 1, 1]
    for (key, a), b in zip(eager_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key
    for key, value in eager_trainer.callback_metrics.items():
        assert torch.equal(trainer.callback_metrics[key], value), key
    assert [p.skipped_batches for p in probes] == [p.skipped_batches for p in eager_probes] == [1, 1, 1]
    assert [p.stepper.steps for p in probes] == [14, 14, 14]
    assert len(probes[0]._in_step) == 1 and probes[2]._in_step == {}  # top-1 inside the graph
    assert not any(g.captured for g in graphs)  # released when the fit ended, with the memory they kept alive


def test_predictions_outlive_the_next_replay(graphs_on_cpu):
    class Keep(Callback):
        def __init__(self):
            self.preds = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.preds.append((batch["adamw_preds"], batch["adamw_preds"].clone()))

    keep = Keep()
    fit_three_probes(None, [ReplayingGraph()], epochs=1, callbacks=[keep])
    assert all(torch.allclose(kept, copy, rtol=0, atol=0, equal_nan=True) for kept, copy in keep.preds)


def test_a_failed_capture_runs_the_step_eagerly_and_says_so(graphs_on_cpu):
    _, _, eager_trainer = fit_three_probes(False)
    failing, fine, failing_too = ReplayingGraph(fail=1), ReplayingGraph(), ReplayingGraph(fail=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, probes, trainer = fit_three_probes(True, [failing, fine, failing_too], epochs=2)
    failed = [str(w.message) for w in caught if "capturing the training step" in str(w.message)]
    # Said once per probe whose capture failed (cuda_graph=True), which then runs eagerly for good.
    assert sorted(m.split(":")[0] for m in failed) == ["OnlineProbe(name='adamw')", "OnlineProbe(name='metric')"]
    assert all("runs eagerly" in m and "HINT" in m for m in failed)
    assert failing.captures == failing_too.captures == 0 and failing.replays == 0
    assert fine.captures == 1 and fine.replays == 4 + 6
    assert [p.graphed_steps for p in probes] == [0, 4 + 6, 0]
    for key, value in eager_trainer.callback_metrics.items():
        assert torch.equal(trainer.callback_metrics[key], value), key


def test_a_loaded_checkpoint_is_captured_again_and_continues_exactly(graphs_on_cpu, tmp_path):
    eager_model, _, _ = fit_three_probes(False, epochs=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit_three_probes(
        None, [ReplayingGraph() for _ in range(3)], epochs=3, callbacks=[ckpt, Interrupt()], enable_checkpointing=True
    )
    graphs = [ReplayingGraph() for _ in range(3)]
    model, _, _ = fit_three_probes(None, graphs, epochs=3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert all(g.replays > 0 for g in graphs)
    for (key, a), b in zip(eager_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key


def test_asking_for_a_graph_where_there_can_be_none_says_why():
    model = make_module()
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES), cuda_graph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    messages = [str(w.message) for w in caught if "cuda_graph=True" in str(w.message)]
    assert len(messages) == 1 and "not on a CUDA device" in messages[0]
    assert probe.stepper.steps == 6  # it trained eagerly


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"accumulate_grad_batches": 2}, "accumulates"),
        ({"scheduler": "CosineAnnealingLR"}, "scheduler"),
        ({"probe": nn.Sequential(nn.Dropout(0.1), nn.Linear(D_EMB, NUM_CLASSES))}, "dropout"),
        ({"optimizer": {"type": "SGD", "lr": 0.1}}, "optimizer (SGD)"),
    ],
)
def test_steps_a_graph_cannot_replay_run_eagerly_and_say_why(graphs_on_cpu, kwargs, reason):
    model = make_module()
    options = {"probe": nn.Linear(D_EMB, NUM_CLASSES), "optimizer": "AdamW", **kwargs}
    probe = OnlineProbe(model, "linear", "embedding", "label", cuda_graph=True, **options)
    probe._graphed.graph = graph = ReplayingGraph()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    assert any(reason in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert graph.captures == 0 and probe.stepper.steps == 6 // options.get("accumulate_grad_batches", 1)


def test_fits_and_current():
    graph = StepGraph()
    x, y, w = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(2)
    assert not graph.fits((x, y)) and not graph.captured
    graph._inputs, graph._key = (x.clone(), y.clone()), (w.data_ptr(),)
    assert graph.fits((torch.ones(4, 3), y))
    assert not graph.fits((x.bfloat16(), y))  # the static copies keep the dtype the step was captured with
    assert not graph.fits((torch.zeros(2, 3), y[:2]))
    assert not graph.fits((x, y.int())) and not graph.fits((x,))
    assert graph.current([w]) and not graph.current([w.clone()]) and not graph.current([w, w])


@pytest.mark.parametrize("value", ["yes", 0, 1])
def test_cuda_graph_argument_is_checked(value):
    with pytest.raises(TypeError, match="cuda_graph must be None"):
        OnlineProbe(make_module(), "linear", "embedding", "label", probe=nn.Linear(D_EMB, 3), cuda_graph=value)


def fit_with_changing_rate(change, cuda_graph, graph=None, **trainer_kw):
    """One AdamW probe whose learning rate halves at each epoch end (a scheduler) or at batch 4 (by hand)."""
    model = make_module(optim={"type": "SGD", "lr": 0.05})
    torch.manual_seed(3)
    scheduler = {"type": "StepLR", "step_size": 1, "gamma": 0.5, "interval": "epoch"}
    probe = OnlineProbe(
        model,
        "linear",
        "embedding",
        "label",
        probe=nn.Linear(D_EMB, NUM_CLASSES),
        optimizer="AdamW",
        scheduler=scheduler if change == "epoch scheduler" else None,
        cuda_graph=cuda_graph,
    )
    if graph is not None:
        probe._graphed.graph = graph

    class ByHand(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if change == "by hand" and batch_idx == 4:
                probe.stepper.optimizer.param_groups[0]["lr"] *= 0.5

    make_trainer(max_epochs=3, callbacks=[ByHand(), probe], **trainer_kw).fit(model, dict_loader())
    return model, probe


@pytest.mark.parametrize(("change", "captures"), [("epoch scheduler", 3), ("by hand", 4)])
def test_a_new_learning_rate_is_captured_again_and_used(graphs_on_cpu, change, captures):
    eager, eager_probe = fit_with_changing_rate(change, False)
    graph = ReplayingGraph()
    model, probe = fit_with_changing_rate(change, None, graph)
    # Epoch scheduler: one capture per epoch. By hand: the first capture, then one after each change (batch 4).
    assert graph.captures == captures and graph.replays == 3 * 6 - 2  # a capture's batch is replayed too
    assert probe.stepper.optimizer.param_groups[0]["lr"] == eager_probe.stepper.optimizer.param_groups[0]["lr"]
    for (key, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key


class L1Probe(OnlineProbe):
    """A subclass that adds a penalty to the loss: code sslprobe does not know, captured only when asked."""

    def compute_step(self, probe, features, target):
        loss, extras = super().compute_step(probe, features, target)
        return loss + 0.5 * probe.weight.abs().sum(), extras


def test_a_subclass_with_its_own_step_is_captured_only_when_asked(graphs_on_cpu):
    def run(cuda_graph):
        model = make_module(optim={"type": "SGD", "lr": 0.05})
        torch.manual_seed(3)
        probe = L1Probe(
            model, "l1", "embedding", "label", probe=nn.Linear(D_EMB, 3), optimizer="AdamW", cuda_graph=cuda_graph
        )
        probe._graphed.graph = graph = ReplayingGraph()
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
        return model.callbacks_modules["l1"].weight, graph, probe

    eager, _, _ = run(False)
    weight, graph, probe = run(None)
    assert graph.captures == 0 and torch.equal(weight, eager)
    assert "its own training step" in probe._graphed.blocker and "cuda_graph=True" in probe._graphed.blocker
    weight, graph, _ = run(True)  # the penalty is part of the captured step: the same numbers
    assert graph.captures == 1 and graph.replays == 4 and torch.equal(weight, eager)


class RunningCenter(nn.Module):
    """Centres features with a running mean that its forward rebinds (not in place), and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D_EMB, NUM_CLASSES)
        self.register_buffer("mean", torch.zeros(D_EMB))
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
            self.calls += 1
        return self.linear(x - self.mean)


class TracingGraph(ReplayingGraph):
    """As a CUDA capture: the body's Python runs once at capture (here its kernels run too, on scratch values)."""

    def capture(self, body, inputs, held, settings=None):
        super().capture(body, inputs, held, settings)
        body(*self._inputs)


def test_a_failed_capture_puts_back_what_it_rebound(graphs_on_cpu):
    model = make_module(optim={"type": "SGD", "lr": 0.05})
    probe = OnlineProbe(
        model, "center", "embedding", "label", probe=RunningCenter(), optimizer="AdamW", cuda_graph=True
    )
    probe._graphed.graph = graph = TracingGraph()
    module = model.callbacks_modules["center"]
    seen = []

    class Watch(Callback):  # after each probe step: the buffer object, and the call count
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((module.mean, module.calls))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=1, callbacks=[probe, Watch()]).fit(model, dict_loader())
    # Batch 2 tried to capture and failed; it then ran eagerly from the state before the capture, as all others.
    assert graph.captures == 1 and graph.replays == 0
    assert [calls for _, calls in seen] == [1, 2, 3, 4, 5, 6]  # the captures' own calls were undone
    assert len({id(mean) for mean, _ in seen}) == 6  # the eager forward rebinds it each time, as it should
    failed = [str(w.message) for w in caught if "capturing the training step" in str(w.message)]
    assert len(failed) == 1 and "module.mean" in failed[0] and "module.calls" in failed[0] and "HINT" in failed[0]


def test_a_rebuilt_optimizer_warms_up_and_is_captured_again(graphs_on_cpu):
    model = make_module(optim={"type": "SGD", "lr": 0.05})
    probe = OnlineProbe(
        model, "p", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES), optimizer="AdamW", cuda_graph=True
    )
    probe._graphed.graph = graph = ReplayingGraph()
    make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    model.callbacks_modules["p"].bias.requires_grad_(False)  # a new set of parameters: a new optimizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
    assert graph.captures == 2 and graph.replays == 2 * (6 - 2)
    assert not [w for w in caught if "cuda_graph" in str(w.message)]


def test_by_default_only_known_layers_are_captured(graphs_on_cpu):
    def run(cuda_graph):
        model = make_module(optim={"type": "SGD", "lr": 0.05})
        probe = OnlineProbe(model, "p", "embedding", "label", probe=Custom(), optimizer="AdamW", cuda_graph=cuda_graph)
        probe._graphed.graph = graph = ReplayingGraph()
        make_trainer(max_epochs=1, callbacks=[probe]).fit(model, dict_loader())
        return graph, probe

    class Custom(nn.Module):  # a forward sslprobe cannot vouch for
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(D_EMB, NUM_CLASSES)

        def forward(self, x):
            return self.linear(x)

    graph, probe = run(None)
    assert graph.captures == 0 and "Custom" in probe._graphed.blocker and "cuda_graph=True" in probe._graphed.blocker
    graph, _ = run(True)
    assert graph.captures == 1


def test_a_changed_layer_setting_is_captured_again(graphs_on_cpu):
    model = make_module(optim={"type": "SGD", "lr": 0.05})
    probe = OnlineProbe(model, "p", "embedding", "label", probe=LinearProbe(NUM_CLASSES, in_features=D_EMB))
    probe._graphed.graph = graph = ReplayingGraph()

    class Slower(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 4:
                next(m for m in model.callbacks_modules["p"].modules() if isinstance(m, FeatureNorm)).eps = 1e-3

    make_trainer(max_epochs=1, callbacks=[Slower(), probe]).fit(model, dict_loader())
    assert graph.captures == 2


def fit_sweep(cuda_graph, graph=None, **trainer_kw):
    """A 4-head AdamW ProbeSweep for two epochs, with a NaN batch and a smaller last batch."""
    model = make_module(optim={"type": "SGD", "lr": 0.05})
    torch.manual_seed(3)
    sweep = ProbeSweep(
        model, "sweep", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1], cuda_graph=cuda_graph
    )
    if graph is not None:
        sweep._graphed.graph = graph
    trainer = make_trainer(max_epochs=2, callbacks=[Poison(), sweep], **trainer_kw)
    trainer.fit(model, dict_loader(n=52), dict_loader(n=24))
    return model, sweep, trainer


def test_the_sweep_step_is_replayed_exactly_as_the_eager_step(graphs_on_cpu):
    eager_model, eager_sweep, eager_trainer = fit_sweep(False)
    graph = ReplayingGraph()
    model, sweep, trainer = fit_sweep(None, graph)
    # The bank is lazy: its first batch builds it, two more warm up. One capture serves both epochs: the top-1
    # counts and the per-head loss sums are reset in place.
    assert graph.captures == 1 and graph.replays == 3 + 6 and len(sweep._in_step) == 1
    for (key, a), b in zip(eager_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key
    assert eager_trainer.callback_metrics.keys() == trainer.callback_metrics.keys()
    for key, value in eager_trainer.callback_metrics.items():  # per-head losses and accuracies, the best head
        assert torch.equal(trainer.callback_metrics[key], value), key
    assert sweep.best_head == eager_sweep.best_head and sweep.skipped_batches == eager_sweep.skipped_batches == 1


def test_a_fit_that_fails_releases_its_graph(graphs_on_cpu):
    class Fail(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 4:
                raise RuntimeError("the job failed")  # Lightning calls every callback's on_exception

    model = make_module(optim={"type": "SGD", "lr": 0.05})
    probe = OnlineProbe(model, "p", "embedding", "label", probe=nn.Linear(D_EMB, NUM_CLASSES), optimizer="AdamW")
    probe._graphed.graph = graph = ReplayingGraph()
    with pytest.raises(RuntimeError, match="the job failed"):
        make_trainer(max_epochs=1, callbacks=[probe, Fail()]).fit(model, dict_loader())
    assert graph.replays == 3 and not graph.captured and probe._graphed.blocker is None


def test_rollback_puts_back_module_optimizer_metric_and_owner_tensors():
    linear = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9)
    metric = Top1Accuracy()

    class Owner:
        def __init__(self):
            self.total = torch.zeros(())

    owner = Owner()
    before = (linear.weight, metric.correct, owner.total)
    rollback = Rollback({"probe": linear}, optimizer, {"top1": metric}, owner=owner)
    # What a capture's Python might do: rebind tensors, create state, count an update.
    linear.weight = nn.Parameter(torch.zeros(2, 2))
    optimizer.state[linear.bias]["momentum_buffer"] = torch.zeros(2)
    metric.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    metric.correct = metric.correct + 1
    owner.total = owner.total + 1
    replaced = rollback.restore(keep=False)
    assert (linear.weight, metric.correct, owner.total) == before  # identity
    assert linear.bias not in optimizer.state and not metric.update_called
    assert set(replaced) == {"probe.weight", "optimizer state", "metric top1.correct", "Owner.total"}
