from __future__ import annotations

import torch

from sslprobe._batch import MISSING, available_keys, describe, locate, lookup


def test_lookup_forms():
    batch = {"views": [torch.zeros(1), torch.ones(1)], "meta": {"label": 3}, "a.b": 5}
    assert lookup(batch, "views.1") is batch["views"][1]
    assert lookup(batch, "meta.label") == 3
    assert lookup(batch, "a.b") == 5  # a literal key with a dot wins over the path
    assert lookup(batch, "views.7") is MISSING
    assert lookup((1, 2), -1) == 2 and lookup((1, 2), 2) is MISSING
    assert lookup(None, "x") is MISSING


def test_locate_order_and_callables():
    outputs, batch = {"x": 1}, {"x": 2, "y": 3}
    assert locate("x", [outputs, batch], outputs, batch) == 1
    assert locate("x", [batch, outputs], outputs, batch) == 2
    assert locate("y", [outputs, batch], outputs, batch) == 3
    assert locate(lambda o, b: o["x"] + b["y"], [], outputs, batch) == 4
    assert locate("z", [outputs, batch], outputs, batch) is MISSING


def test_descriptions():
    assert available_keys({"a": 1, "b": 2}) == ["a", "b"]
    assert describe((1, 2)) == "indices 0, 1 of a tuple"
    assert describe(torch.zeros(2, 3)) == "a single tensor of shape (2, 3)"
