from __future__ import annotations

import pytest
import torch
import torchmetrics

from sslprobe._metrics import Top1Accuracy, normalize_metrics, snake_case


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
