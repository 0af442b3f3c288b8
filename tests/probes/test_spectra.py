from __future__ import annotations

import numpy as np
import pytest
import torch

from sslprobe.probes.spectra import _gram, _helmert, alpha_req, lidar, rankme

RTOL = 1e-4


def np_rankme(rows: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(rows.astype(np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def np_alpha_req(rows: np.ndarray, fit_range: tuple[int, int] = (10, 100)) -> float:
    x = rows.astype(np.float64)
    x = x - x.mean(0)
    eig = np.sort(np.linalg.eigvalsh(x.T @ x / len(x)))[::-1]
    exist = int((eig > eig[0] * max(x.shape) * np.finfo(np.float64).eps).sum())
    start, stop = fit_range[0], min(fit_range[1], exist)
    rank = np.arange(start + 1, stop + 1, dtype=np.float64)
    # np.polyfit weights multiply the residuals before squaring: sqrt(1/rank) gives weights 1/rank on the squares.
    slope, _ = np.polyfit(np.log(rank), np.log(eig[start:stop]), 1, w=np.sqrt(1.0 / rank))
    return float(-slope)


def np_lidar(views: np.ndarray, delta: float = 1e-4, eps: float = 1e-7) -> float:
    x = views.astype(np.float64)
    n, q, d = x.shape
    mu = x.mean(1)
    sb = sum(np.outer(m - mu.mean(0), m - mu.mean(0)) for m in mu) / n
    sw = sum(np.outer(x[i, j] - mu[i], x[i, j] - mu[i]) for i in range(n) for j in range(q)) / (n * q)
    sw = sw + delta * np.eye(d)
    w, v = np.linalg.eigh(sw)
    inv_sqrt = v @ np.diag(w**-0.5) @ v.T
    lam = np.clip(np.linalg.eigvalsh(inv_sqrt @ sb @ inv_sqrt), 0, None)
    p = lam / lam.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(50, 8), (8, 50), (200, 32)])
@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_rankme_matches_numpy(shape, eps):
    rows = randn(*shape) + 0.5  # not centred: the mean direction counts
    assert float(rankme(rows, eps)) == pytest.approx(np_rankme(rows.numpy(), eps), rel=RTOL)


def test_rankme_matches_numpy_over_a_spectrum_of_six_decades():
    rows = randn(2000, 300) * torch.logspace(0, -6, 300)  # singular values from the Gram matrix lose the smallest
    assert float(rankme(rows)) == pytest.approx(np_rankme(rows.numpy()), rel=RTOL)


@pytest.mark.parametrize("k", [1, 5, 100])
def test_rankme_of_a_rank_k_matrix_is_k(k):
    u, _ = torch.linalg.qr(randn(1000, k).double())
    v, _ = torch.linalg.qr(randn(256, k, seed=1).double())
    assert float(rankme(u @ v.T)) == pytest.approx(k, rel=1e-3)


@pytest.mark.parametrize("fit_range", [(0, 30), (10, 100), (5, 20)])
def test_alpha_req_matches_numpy(fit_range):
    rows = randn(300, 40) * torch.arange(1, 41) ** -0.7
    assert float(alpha_req(rows, fit_range)) == pytest.approx(np_alpha_req(rows.numpy(), fit_range), rel=RTOL)


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_alpha_req_of_a_power_law_spectrum(a):
    # Centred rows with orthogonal columns of norms (i + 1) ** -a / 2 * sqrt(N): covariance eigenvalues (i + 1) ** -a.
    n, d = 2000, 120
    x = randn(n, d).double()
    x = x - x.mean(0)
    q, _ = torch.linalg.qr(x)  # columns orthonormal and (nearly) centred
    q = q - q.mean(0)
    q, _ = torch.linalg.qr(q)
    rows = q * (torch.arange(1, d + 1, dtype=torch.float64) ** (-a / 2)) * n**0.5
    assert float(alpha_req(rows, (10, 100))) == pytest.approx(a, rel=1e-3)


def test_alpha_req_clips_fit_range_and_errors_when_too_few_remain():
    rows = randn(100, 16)
    assert float(alpha_req(rows, (10, 100))) == pytest.approx(np_alpha_req(rows.numpy(), (10, 16)), rel=RTOL)
    with pytest.raises(ValueError, match=r"leaves 1 eigenvalue.*16 non-zero.*fit_range=\(0, 16\)"):
        alpha_req(rows, (15, 100))
    with pytest.raises(ValueError, match="leaves 0 eigenvalue"):
        alpha_req(randn(5, 16), (10, 100))  # 5 centred rows: 4 non-zero eigenvalues


@pytest.mark.parametrize("fit_range", [(5,), (3, 4), (-1, 10), (1.0, 10), "a"])
def test_alpha_req_rejects_bad_fit_range(fit_range):
    with pytest.raises(ValueError, match="fit_range must be"):
        alpha_req(randn(50, 8), fit_range)


@pytest.mark.parametrize(("n", "q", "d"), [(40, 2, 6), (30, 4, 10), (12, 3, 20)])
@pytest.mark.parametrize("delta", [1e-4, 1e-1])
def test_lidar_matches_numpy(n, q, d, delta):
    views = randn(n, 1, d) + 0.5 * randn(n, q, d, seed=1)
    assert float(lidar(views, delta)) == pytest.approx(np_lidar(views.numpy(), delta), rel=RTOL)


def test_lidar_is_invariant_under_an_invertible_linear_map():
    views = randn(60, 1, 8).double() + 0.3 * randn(60, 5, 8, seed=1).double()
    a = randn(8, 8, seed=2).double() + 3 * torch.eye(8, dtype=torch.float64)
    assert float(lidar(views @ a.T, delta=1e-12)) == pytest.approx(float(lidar(views, delta=1e-12)), rel=1e-6)


def test_lidar_of_well_separated_classes_approaches_the_dimension():
    views = 10 * randn(200, 1, 4) + 0.01 * randn(200, 3, 4, seed=1)
    assert float(lidar(views)) == pytest.approx(4, rel=0.05)


@pytest.mark.parametrize("shape", [(10, 4), (1, 3, 4), (10, 1, 4)])
def test_lidar_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"\(n, q, D\) with n >= 2 samples and q >= 2 views"):
        lidar(randn(*shape))


def test_rows_must_be_a_matrix():
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        rankme(randn(3, 4, 5))
    with pytest.raises(ValueError, match="at least 2 rows"):
        rankme(randn(1, 4))


@pytest.mark.parametrize(("n", "d"), [(700, 600), (40, 520), (30, 256)])
def test_the_blocked_gram_matrix_equals_one_matmul(n, d):
    x = randn(n, d).double()
    torch.testing.assert_close(_gram(x), x.T @ x, rtol=1e-12, atol=1e-9)
    assert torch.equal(_gram(x), _gram(x).T)  # mirrored exactly


@pytest.mark.parametrize("q", [2, 3, 5])
def test_helmert_contrasts_give_the_scatter_around_the_mean(q):
    h = _helmert(q, torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(h.T @ h, torch.eye(q, dtype=torch.float64) - 1.0 / q)
    torch.testing.assert_close(h @ h.T, torch.eye(q - 1, dtype=torch.float64))


@pytest.mark.parametrize(("n", "q", "d"), [(300, 2, 280), (100, 3, 280)])
def test_lidar_matches_numpy_with_blocked_gram_matrices(n, q, d):
    views = randn(n, 1, d) + 0.5 * randn(n, q, d, seed=1)
    assert float(lidar(views)) == pytest.approx(np_lidar(views.numpy()), rel=RTOL)


def test_alpha_req_leaves_float64_rows_unchanged():
    rows = randn(300, 40).double() + 3.0
    before = rows.clone()
    alpha_req(rows, (0, 30))
    assert torch.equal(rows, before)
