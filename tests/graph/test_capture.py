"""The capture engine's shared parts: static inputs shared by the graphs that read the same features."""

from __future__ import annotations

import torch

from sslprobe.graph.capture import _Shared


def test_graphs_reading_the_same_features_share_one_static_copy_filled_once():
    shared = _Shared()
    features = torch.randn(4, 3)
    a, b = shared.static(-1, features), shared.static(-1, features)  # two graphs, one input shape and dtype
    assert a is b
    shared.fill(a, features)
    assert torch.equal(a, features)
    a.zero_()  # (a marker: a second fill of the very same, unchanged tensor copies nothing)
    shared.fill(b, features)
    assert not a.any()
    features.mul_(2)  # changed in place since: copied again
    shared.fill(b, features)
    assert torch.equal(b, features)
    other = features.clone()  # another tensor (the next batch) with the same values: copied, by identity
    a.zero_()
    shared.fill(a, other)
    assert torch.equal(a, other)


def test_a_freed_source_is_never_taken_for_a_new_tensor_and_the_copy_goes_with_its_last_graph():
    shared = _Shared()
    static = shared.static(-1, torch.zeros(2, 2))
    shared.fill(static, torch.ones(2, 2))  # a temporary: freed at once
    fresh = torch.full((2, 2), 3.0)
    shared.fill(static, fresh)
    assert torch.equal(static, fresh)
    assert shared.static(-1, torch.zeros(2, 2)) is static and shared.inputs
    shared.release(static)
    assert shared.inputs  # one graph still reads it
    shared.release(static)
    assert not shared.inputs
    assert shared.static(-1, torch.zeros(2, 2, dtype=torch.float64)) is not static  # another dtype, another copy
