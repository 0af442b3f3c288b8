"""The ridge fit from statistics against scikit-learn's RidgeClassifier and a brute-force GCV on the rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier

from sslprobe.probes.ridge import DEFAULT_LAMBDAS, RidgeStatistics, fit_ridge, usable_mean


def make_rows(n, d, c, seed=0, offset=0.0):
    """Overlapping classes (so lambda matters), a constant feature, a dead one and one far from zero."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    centers = torch.randn(c, d, generator=g)
    x = centers[y] * 0.7 + torch.randn(n, d, generator=g) + offset
    x[:, 0] = 2.5  # constant
    x[:, 1] = 0.0  # dead unit
    x[:, 2] = x[:, 2] + 1e3  # far from zero, unit spread
    return x.float(), y


def statistics(x, y, c, batch=7, shift="first"):
    """The rows summed in batches, about the first batch's mean (as RefitProbe does), or about ``shift``."""
    if isinstance(shift, str):
        shift = usable_mean(x[:batch], y[:batch], c)
    stats = RidgeStatistics(x.shape[1], c, shift=shift)
    for i in range(0, len(x), batch):
        stats.update(x[i : i + batch], y[i : i + batch])
    return stats


def standardise(x):
    """The rows standardised with their own mean and population std (two passes, float64); constant ones get 1."""
    xs = x.double().numpy()
    mean, std = xs.mean(0), xs.std(0)
    std[std == 0] = 1.0
    return (xs - mean) / std, mean, std


def brute_force_gcv(z, y, c, lambdas):
    """GCV of every grid value, from the standardised rows: explicit solves and the trace of the hat matrix."""
    n, d = z.shape
    targets = np.where(y[:, None] == np.arange(c)[None, :], 1.0, -1.0)
    zc, yc = z - z.mean(0), targets - targets.mean(0)
    out = []
    for lam in lambdas:
        a = zc.T @ zc + lam * n * np.eye(d)
        w = np.linalg.solve(a, zc.T @ yc)
        df = np.trace(zc @ np.linalg.solve(a, zc.T)) + 1
        rss = ((yc - zc @ w) ** 2).sum()
        out.append((n * rss / (n - df) ** 2, df))
    gcv, df = np.array(out).T
    return gcv, df


@pytest.mark.parametrize(("n", "d", "c"), [(120, 10, 4), (90, 6, 2), (40, 60, 3), (300, 24, 7)])
def test_the_fit_equals_sklearn_ridge_classifier_on_the_standardised_rows(n, d, c):
    x, y = make_rows(n, d, c)
    x_val, _ = make_rows(50, d, c, seed=1)
    fit = fit_ridge(statistics(x, y, c), DEFAULT_LAMBDAS)
    assert fit.rows == n
    z, mean, std = standardise(x)
    np.testing.assert_allclose(fit.mean.numpy(), mean, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(fit.std.numpy(), std, rtol=1e-9)
    reference = RidgeClassifier(alpha=fit.lambda_ * n, fit_intercept=True).fit(z, y.numpy())
    w_std = (fit.weight * fit.std[:, None]).numpy()  # (D, C): the weights on the standardised features
    coef = w_std.T if c > 2 else w_std[:, 1]  # a binary RidgeClassifier keeps the second class's column
    np.testing.assert_allclose(coef, reference.coef_.reshape(coef.shape), rtol=1e-7, atol=1e-9)
    z_val = (x_val.double().numpy() - mean) / std
    scores = fit.decision(x_val).numpy()
    expected = reference.decision_function(z_val)
    np.testing.assert_allclose(scores if c > 2 else scores[:, 1], expected, rtol=1e-7, atol=1e-8)
    assert scores.argmax(1).tolist() == reference.predict(z_val).tolist()
    assert fit.decision(x).argmax(1).tolist() == reference.predict(z).tolist()


@pytest.mark.parametrize("lam", [1e-6, 1e-3, 0.1, 10.0])
def test_every_penalty_equals_sklearn(lam):
    x, y = make_rows(80, 12, 5, seed=3)
    fit = fit_ridge(statistics(x, y, 5), [lam])
    z, _, _ = standardise(x)
    reference = RidgeClassifier(alpha=lam * 80).fit(z, y.numpy())
    np.testing.assert_allclose((fit.weight * fit.std[:, None]).numpy().T, reference.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fit.decision(x).numpy(), reference.decision_function(z), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("n", "d", "c"), [(120, 10, 4), (90, 6, 2), (40, 60, 3), (300, 24, 7)])
def test_gcv_and_the_chosen_lambda_match_a_brute_force_computation_on_the_rows(n, d, c):
    x, y = make_rows(n, d, c)
    fit = fit_ridge(statistics(x, y, c), DEFAULT_LAMBDAS)
    z, _, _ = standardise(x)
    expected, df = brute_force_gcv(z, y.numpy(), c, DEFAULT_LAMBDAS)
    # Where n - df is tiny (fewer rows than features, the smallest penalties) GCV is a ratio of two near-zeros, and
    # either computation carries the rounding of its solve: compared to 1e-3 there, 1e-6 elsewhere.
    sharp = (n - df) > 1e-3 * n
    assert sharp.sum() >= 8
    np.testing.assert_allclose(fit.gcv.numpy()[sharp], expected[sharp], rtol=1e-6)
    np.testing.assert_allclose(fit.gcv.numpy(), expected, rtol=1e-3)
    assert fit.lambda_ == DEFAULT_LAMBDAS[int(np.argmin(expected))]


def test_the_grid_matters_lambda_is_interior_on_noisy_rows():
    # Many features, few rows, overlapping classes: neither end of the grid is best.
    x, y = make_rows(40, 60, 3)
    fit = fit_ridge(statistics(x, y, 3), DEFAULT_LAMBDAS)
    assert DEFAULT_LAMBDAS[0] < fit.lambda_ < DEFAULT_LAMBDAS[-1]


def test_default_grid_is_ten_to_linspace_minus_6_to_1():
    np.testing.assert_allclose(DEFAULT_LAMBDAS, 10 ** np.linspace(-6, 1, 15), rtol=1e-12)


def test_batching_and_shift_change_nothing_but_rounding():
    x, y = make_rows(100, 8, 3, offset=50.0)
    one = fit_ridge(statistics(x, y, 3, batch=100), DEFAULT_LAMBDAS)
    ragged = fit_ridge(statistics(x, y, 3, batch=3), DEFAULT_LAMBDAS)
    shifted = fit_ridge(statistics(x, y, 3, shift=x.double().mean(0) + 0.3), DEFAULT_LAMBDAS)
    unshifted = fit_ridge(statistics(x, y, 3, shift=None), DEFAULT_LAMBDAS)
    for other in (ragged, shifted, unshifted):
        assert other.lambda_ == one.lambda_
        torch.testing.assert_close(other.weight, one.weight, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(other.bias, one.bias, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(other.std, one.std)


def test_unusable_rows_never_enter_the_statistics_and_are_counted():
    x, y = make_rows(60, 5, 3)
    clean = statistics(x, y, 3)
    dirty_x = torch.cat([x, torch.full((4, 5), float("nan")), torch.randn(3, 5), torch.randn(2, 5)])
    dirty_x[-2, 2] = float("inf")  # the row labelled 1
    dirty_y = torch.cat([y, torch.tensor([0, 1, 2, 0]), torch.tensor([-100, -100, 3]), torch.tensor([1, -5])])
    dirty = statistics(dirty_x, dirty_y, 3)
    # usable, non-finite, labels outside [0, 3) but not -100 (3 and -5), offered
    assert dirty.counts.tolist() == [60.0, 5.0, 2.0, 69.0]
    torch.testing.assert_close(dirty.buffer[4:], clean.buffer[4:], rtol=1e-13, atol=1e-9)
    assert dirty.label_range.tolist() == [-5, 3]


def test_no_usable_row_gives_no_fit():
    stats = RidgeStatistics(3, 2)
    stats.update(torch.randn(4, 3), torch.full((4,), -100))
    assert fit_ridge(stats, DEFAULT_LAMBDAS) is None


def test_features_in_low_precision_are_summed_in_float64():
    x, y = make_rows(64, 6, 3)
    for dtype in (torch.bfloat16, torch.float16):
        stats = statistics(x.to(dtype), y, 3)
        torch.testing.assert_close(stats.xtx, statistics(x.to(dtype).double(), y, 3).xtx, rtol=0, atol=0)
