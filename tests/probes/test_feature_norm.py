from __future__ import annotations

import pytest
import torch
from torch import nn

from sslprobe.probes import FeatureNorm, LinearProbe


def normalised(rows: torch.Tensor, stats_of: torch.Tensor, eps: float) -> torch.Tensor:
    """``rows`` normalised with the exact (float64, biased) statistics of ``stats_of``."""
    reference = stats_of.double()
    return (rows.double() - reference.mean(0)) / torch.sqrt(reference.var(0, unbiased=False) + eps)


def test_training_output_is_batchnorm_without_affine():
    torch.manual_seed(0)
    x = torch.randn(16, 5) * 3 + 2
    reference = nn.BatchNorm1d(5, eps=1e-6, affine=False)
    torch.testing.assert_close(FeatureNorm(5, eps=1e-6)(x), reference(x), rtol=0, atol=0)


def test_evaluation_uses_the_exact_statistics_of_the_evaluation_rows_of_the_current_encoder():
    torch.manual_seed(0)
    norm = FeatureNorm(4, eps=1e-6)
    # An encoder that moves between evaluations, and whose evaluation features differ from its training ones
    # (as an encoder with BatchNorm gives): each evaluation is normalised with its own rows' statistics.
    for shift, scale in ((0.0, 1.0), (5.0, 3.0), (-2.0, 0.5)):
        norm.train()
        for _ in range(3):
            norm(torch.randn(7, 4) * 10 + 40)
        norm.eval()
        first, second = torch.randn(6, 4) * scale + shift, torch.randn(5, 4) * scale + shift
        torch.testing.assert_close(norm(first).double(), normalised(first, first, 1e-6), rtol=1e-5, atol=1e-5)
        # Later batches are normalised with every row seen so far in this evaluation.
        both = torch.cat([first, second])
        torch.testing.assert_close(norm(second).double(), normalised(second, both, 1e-6), rtol=1e-5, atol=1e-5)


def test_train_statistics_are_the_exact_statistics_of_the_training_window():
    torch.manual_seed(0)
    norm = FeatureNorm(4, eps=1e-6, eval_stats="train")
    for shift in (0.0, 5.0, -3.0):
        batches = [torch.randn(7, 4) * 2 + shift for _ in range(3)]
        norm.train()
        for b in batches:
            norm(b)
        norm.eval()
        rows = torch.randn(5, 4) + shift
        expected = normalised(rows, torch.cat(batches), 1e-6)
        torch.testing.assert_close(norm(rows).double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm(rows).double(), expected, rtol=1e-5, atol=1e-5)  # no new training row


def test_a_single_evaluation_row_falls_back_to_the_training_window():
    norm = FeatureNorm(2, eps=1e-12)
    train_rows = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
    norm(train_rows)
    norm.eval()
    row = torch.tensor([[3.0, 3.0]])
    torch.testing.assert_close(norm(row).double(), normalised(row, train_rows, 1e-12))


def test_frozen_evaluation_keeps_the_statistics_of_the_rows_before():
    norm = FeatureNorm(3, eps=1e-6)
    norm(torch.randn(8, 3))
    norm.eval()
    first = torch.randn(10, 3)
    norm(first)
    norm.frozen_eval = True
    shifted = torch.randn(4, 3) * 5 + 7
    torch.testing.assert_close(norm(shifted).double(), normalised(shifted, first, 1e-6), rtol=1e-5, atol=1e-5)


def test_before_any_row_it_is_the_identity_and_reset_restores_that():
    norm = FeatureNorm(3, eps=1e-12).eval()
    x = torch.randn(1, 3)
    torch.testing.assert_close(norm(x), x)
    norm.train()(torch.randn(4, 3) * 10 + 4)
    norm.reset_running_stats()
    torch.testing.assert_close(norm.eval()(x), x)


def test_lazy_size_and_half_precision_keep_the_sums_in_float64():
    norm = FeatureNorm()
    assert norm.in_features is None
    norm(torch.randn(6, 9))
    assert norm.in_features == 9 and norm.train_moments[0].item() == 6
    norm.half()
    assert norm.running_mean.dtype == torch.float16 and norm.train_moments.dtype == torch.float64
    # Rows whose squares overflow float16 (65504) still give the exact variance.
    rows = torch.full((4, 9), 300.0)
    rows[::2] = 100.0
    norm.reset_running_stats()
    norm.train()(rows.half())
    norm.eval().start_evaluation()
    torch.testing.assert_close(norm.running_var.float(), torch.full((9,), 10_000.0))


def test_a_batchnorm_checkpoint_of_a_linear_probe_loads():
    # LinearProbe normalised with BatchNorm1d(affine=False) before FeatureNorm: its checkpoints still load strictly.
    old = nn.ModuleDict({"norm": nn.BatchNorm1d(4, affine=False), "linear": nn.Linear(4, 2)})
    old.norm.running_mean.fill_(1.5)
    probe = LinearProbe(num_classes=2, in_features=4)
    probe.load_state_dict(old.state_dict())
    assert torch.equal(probe.norm.running_mean, torch.full((4,), 1.5))
    assert probe.norm.train_moments[0].item() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="eval_stats must be one of"):
        FeatureNorm(3, eval_stats="batch")
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        FeatureNorm(0)


@pytest.mark.parametrize("shape", [(6, 2, 3, 3), (6, 5, 4)])
def test_linear_probe_flattens_features_of_more_dimensions(shape):
    probe = LinearProbe(num_classes=3)
    x = torch.randn(shape)
    assert probe(x).shape == (6, 3)
    assert probe.in_features == x[0].numel()
    assert probe.eval()(x).shape == (6, 3)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_lazy_probe_copies_before_its_first_batch(how):
    import copy
    import pickle

    probe = LinearProbe(num_classes=3)
    copied = copy.deepcopy(probe) if how == "deepcopy" else pickle.loads(pickle.dumps(probe))
    assert copied.in_features is None and copied.norm.in_features is None  # it waits for its own first batch
    copied(torch.randn(4, 5))
    assert copied.in_features == copied.norm.in_features == 5
    assert probe.in_features is None and probe.norm.in_features is None  # the original is untouched
    probe(torch.randn(4, 7))
    assert probe.norm.running_mean.shape == (7,) and copied.norm.running_mean.shape == (5,)
    assert copy.deepcopy(probe).norm.running_mean.shape == (7,)
