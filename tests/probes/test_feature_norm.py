from __future__ import annotations

import pytest
import torch
from torch import nn

from sslprobe.probes import FeatureNorm, LinearProbe


def exact_stats(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = rows.double()
    return rows.mean(0), rows.var(0, unbiased=False)


def test_training_output_is_batchnorm_without_affine():
    torch.manual_seed(0)
    x = torch.randn(16, 5) * 3 + 2
    reference = nn.BatchNorm1d(5, eps=1e-6, affine=False)
    torch.testing.assert_close(FeatureNorm(5, eps=1e-6)(x), reference(x), rtol=0, atol=0)


def test_evaluation_uses_the_exact_statistics_of_the_rows_since_the_last_evaluation():
    torch.manual_seed(0)
    norm = FeatureNorm(4, eps=1e-6)
    # An encoder that moves: each window's features have another mean and scale.
    for shift, scale in ((0.0, 1.0), (5.0, 3.0), (-2.0, 0.5)):
        batches = [torch.randn(7, 4) * scale + shift for _ in range(3)]
        norm.train()
        for b in batches:
            norm(b)
        norm.eval()
        probe_rows = torch.randn(5, 4) * scale + shift
        mean, var = exact_stats(torch.cat(batches))
        expected = (probe_rows.double() - mean) / torch.sqrt(var + 1e-6)
        torch.testing.assert_close(norm(probe_rows).double(), expected, rtol=1e-5, atol=1e-5)
        # A second evaluation with no training row in between keeps the same statistics.
        torch.testing.assert_close(norm(probe_rows).double(), expected, rtol=1e-5, atol=1e-5)


def test_before_any_training_row_it_is_the_identity_and_reset_restores_that():
    norm = FeatureNorm(3, eps=1e-12).eval()
    x = torch.randn(4, 3)
    torch.testing.assert_close(norm(x), x)
    norm.train()(x * 10 + 4)
    norm.reset_running_stats()
    torch.testing.assert_close(norm.eval()(x), x)


def test_lazy_size_and_half_precision_keep_the_sums_in_float64():
    norm = FeatureNorm()
    assert norm.in_features is None
    norm(torch.randn(6, 9))
    assert norm.in_features == 9 and norm.window_count.item() == 6
    norm.half()
    assert norm.running_mean.dtype == torch.float16 and norm.window_sum.dtype == torch.float64
    # Rows whose squares overflow float16 (65504) still give the exact variance.
    rows = torch.full((4, 9), 300.0)
    rows[::2] = 100.0
    norm.reset_running_stats()
    norm.train()(rows.half())
    norm.eval()(rows.half()[:1])
    torch.testing.assert_close(norm.running_var.float(), torch.full((9,), 10_000.0))


def test_a_batchnorm_checkpoint_of_a_linear_probe_loads():
    # LinearProbe normalised with BatchNorm1d(affine=False) before FeatureNorm: its checkpoints still load strictly.
    old = nn.ModuleDict({"norm": nn.BatchNorm1d(4, affine=False), "linear": nn.Linear(4, 2)})
    old.norm.running_mean.fill_(1.5)
    probe = LinearProbe(num_classes=2, in_features=4)
    probe.load_state_dict(old.state_dict())
    assert torch.equal(probe.norm.running_mean, torch.full((4,), 1.5))
    assert probe.norm.window_count.item() == 0


@pytest.mark.parametrize("shape", [(6, 2, 3, 3), (6, 5, 4)])
def test_linear_probe_flattens_features_of_more_dimensions(shape):
    probe = LinearProbe(num_classes=3)
    x = torch.randn(shape)
    assert probe(x).shape == (6, 3)
    assert probe.in_features == x[0].numel()
    assert probe.eval()(x).shape == (6, 3)
