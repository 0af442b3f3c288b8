from __future__ import annotations

import pytest
import torch
from torch import nn

from sslprobe.probes import AttentiveProbe, LinearProbe, MLPProbe


def test_linear_probe_normalises_without_affine_and_starts_at_zero():
    probe = LinearProbe(num_classes=4, in_features=6)
    assert not list(probe.norm.parameters())
    assert torch.equal(probe.linear.weight, torch.zeros(4, 6))
    x = torch.randn(32, 6) * 100 + 50
    probe.train()
    normed = probe.norm(x)
    torch.testing.assert_close(normed.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    assert isinstance(LinearProbe(3, 6, norm=False).norm, nn.Identity)


def test_lazy_linear_probe_infers_size_and_loads_into_fresh_probe():
    probe = LinearProbe(num_classes=3)
    assert probe.in_features is None
    probe(torch.randn(4, 7))
    assert probe.in_features == 7 and torch.equal(probe.linear.weight, torch.zeros(3, 7))
    fresh = LinearProbe(num_classes=3)
    fresh.load_state_dict(probe.state_dict())
    assert fresh.in_features == 7


def test_mlp_probe_shapes_and_errors():
    assert MLPProbe(3, hidden=[8, 4])(torch.randn(5, 6)).shape == (5, 3)
    with pytest.raises(ValueError, match="MLPProbe: hidden must be a positive int"):
        MLPProbe(3, hidden=0)
    with pytest.raises(ValueError, match=r"MLPProbe: dropout must be in \[0, 1\)"):
        MLPProbe(3, hidden=4, dropout=1.5)


def test_attentive_probe_matches_a_reference_attention():
    torch.manual_seed(0)
    probe = AttentiveProbe(num_classes=3, in_features=8, num_heads=2, norm=False)
    with torch.no_grad():
        probe.head_weight.normal_()
    tokens = torch.randn(4, 5, 8)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(probe.in_proj_weight)
        mha.in_proj_bias.copy_(probe.in_proj_bias)
        mha.out_proj.weight.copy_(probe.out_proj_weight)
        mha.out_proj.bias.copy_(probe.out_proj_bias)
    pooled, _ = mha(probe.query.expand(4, -1, -1), tokens, tokens)
    expected = pooled.mean(1) @ probe.head_weight.T + probe.head_bias
    torch.testing.assert_close(probe(tokens), expected, rtol=1e-5, atol=1e-5)


def test_attentive_probe_lazy_and_errors():
    probe = AttentiveProbe(num_classes=3, num_heads=4)
    with pytest.raises(ValueError, match=r"token size 6 is not divisible by num_heads=4"):
        probe(torch.randn(2, 3, 6))
    probe = AttentiveProbe(num_classes=3, num_heads=2, num_queries=4)
    assert probe(torch.randn(2, 3, 6)).shape == (2, 3)
    assert probe(torch.randn(2, 6)).shape == (2, 3)  # (B, D) is one token
    fresh = AttentiveProbe(num_classes=3, num_heads=2, num_queries=4)
    fresh.load_state_dict(probe.state_dict())
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(fresh(x), probe(x))


@pytest.mark.parametrize("in_features", [5, 3], ids=["D!=C", "D==C"])
def test_head_bank_loads_its_state_also_as_a_plain_dict(in_features):
    from sslprobe.probes.linear_bank import LinearHeadBank

    torch.manual_seed(0)
    bank = LinearHeadBank(num_heads=2, num_classes=3, in_features=in_features)
    with torch.no_grad():
        bank.weight.normal_()
    x = torch.randn(4, in_features)
    bank.train()(x)
    bank.eval()
    expected = bank(x)
    # A plain dict (no torch metadata), as a checkpoint's probe state or a test's copy is.
    plain = {key: value.clone() for key, value in bank.state_dict().items()}
    fresh = LinearHeadBank(num_heads=2, num_classes=3, in_features=in_features)
    fresh.load_state_dict(plain)
    torch.testing.assert_close(fresh.eval()(x), expected)
