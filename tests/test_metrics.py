from __future__ import annotations

import pytest
import torch
import torchmetrics

from sslprobe._internals import record_metric_update
from sslprobe._metrics import (
    Top1Accuracy,
    capturable_metric,
    metric_states,
    normalize_metrics,
    snake_case,
)


def test_top1_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    preds, target = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    ours, theirs = Top1Accuracy(), torchmetrics.classification.MulticlassAccuracy(7, average="micro")
    for i in range(0, 50, 16):
        ours.update(preds[i : i + 16], target[i : i + 16])
        theirs.update(preds[i : i + 16], target[i : i + 16])
    torch.testing.assert_close(ours.compute(), theirs.compute())


def test_forms():
    acc = torchmetrics.classification.MulticlassAccuracy
    single = normalize_metrics(acc(3), "p")
    assert list(single["train"]) == ["multiclass_accuracy"]
    assert single["train"]["multiclass_accuracy"] is not single["val"]["multiclass_accuracy"]
    split = normalize_metrics({"train": acc(3), "val": {"top1": acc(3), "top2": acc(3, top_k=2)}}, "p")
    assert list(split["train"]) == ["multiclass_accuracy"] and list(split["test"]) == ["top1", "top2"]
    listed = normalize_metrics((acc(3), acc(3), torchmetrics.MeanMetric()), "p")
    assert list(listed["val"]) == ["multiclass_accuracy", "multiclass_accuracy_2", "mean_metric"]
    assert normalize_metrics(None, "p", {"top1": Top1Accuracy()})["train"].keys() == {"top1"}
    assert normalize_metrics(None, "p")["val"] == {}


def test_errors():
    with pytest.raises(TypeError, match=r"p: metric 'x' must be a torchmetrics.Metric, got int"):
        normalize_metrics({"x": 1}, "p")
    with pytest.raises(TypeError, match=r"p: metrics must be a torchmetrics.Metric"):
        normalize_metrics(3, "p")


def test_snake_case():
    assert snake_case("MulticlassAccuracy") == "multiclass_accuracy"
    assert snake_case("MeanSquaredError") == "mean_squared_error"


def test_top1_reset_keeps_its_state_tensors():
    # A CUDA graph that updates the counts writes to their memory: a reset must zero them where they are.
    metric = Top1Accuracy()
    correct, total = metric.correct, metric.total
    metric.update(torch.tensor([[0.1, 0.9]]), torch.tensor([1]))
    assert metric.compute() == 1.0
    metric.reset()
    assert metric.correct is correct and metric.total is total
    assert int(correct) == 0 and int(total) == 0 and not metric.update_called
    metric.update(torch.tensor([[0.9, 0.1]]), torch.tensor([1]))
    assert metric.compute() == 0.0


def test_capturable_metrics_and_marked_updates():
    assert capturable_metric(Top1Accuracy())
    # torchmetrics' classes replace their state tensors at each update (`self.tp = self.tp + tp`).
    assert not capturable_metric(torchmetrics.classification.MulticlassAccuracy(num_classes=3))

    class InPlaceCat(torchmetrics.CatMetric):
        updates_in_place = True

    assert not capturable_metric(InPlaceCat())  # a list state grows on the host whatever it says
    assert not capturable_metric(Top1Accuracy(compute_on_cpu=True))
    metric = Top1Accuracy()
    assert [t is s for t, s in zip(metric_states(metric), (metric.correct, metric.total))] == [True, True]
    metric.correct.add_(3)
    metric.total.add_(4)
    assert not metric.update_called
    record_metric_update(metric)  # what a replay of a captured update records
    assert metric.update_called and metric.compute() == 0.75
