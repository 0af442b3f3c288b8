"""Label-free health numbers of a representation from its spectrum: RankMe, alpha-ReQ and LiDAR (pure torch).

Each is computed in float64 on the device of its input, from the exact formulas of the papers:

- [0] Garrido et al., 2023, "RankMe: Assessing the downstream performance of pretrained self-supervised
  representations by their rank", https://arxiv.org/abs/2210.02885
- [1] Agrawal et al., 2022, "alpha-ReQ: Assessing representation quality in self-supervised learning by measuring
  eigenspectrum decay", https://openreview.net/forum?id=ii9X4vtZGTZ
- [2] Thilak et al., 2024, "LiDAR: Sensing linear probing performance in joint embedding SSL architectures",
  https://arxiv.org/abs/2312.04000
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["alpha_req", "lidar", "rankme"]


def _entropy_exp(values: Tensor, eps: float) -> Tensor:
    """``exp(entropy(p))`` with ``p = values / sum(values) + eps`` (float64)."""
    p = values / values.sum() + eps
    return torch.exp(-(p * torch.log(p)).sum())


def _check_rows(rows: Tensor, name: str) -> Tensor:
    if not isinstance(rows, Tensor) or rows.ndim != 2:
        got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"{name}: rows must be a Tensor of shape (N, D), got {got}. Flatten each sample to one row.")
    if rows.shape[0] < 2 or rows.shape[1] < 1:
        raise ValueError(f"{name}: needs at least 2 rows of at least 1 feature, got shape {tuple(rows.shape)}.")
    return rows.detach().to(torch.float64, copy=True)  # a copy: the callers may change it in place


# The width of the column blocks of _gram on the CPU (a multiple of the vector width; 256 measured fastest on 2
# cores for 2,048 columns, against 128 and 512).
_GRAM_BLOCK = 256


def _gram(x: Tensor) -> Tensor:
    """``x^T x`` ``(D, D)`` of float64 rows ``x`` ``(N, D)``, exactly (float64 products and sums).

    On the CPU the Gram matrix is symmetric, so only its lower block triangle is multiplied (``D / 256`` blocks of
    rows, each against the columns up to its own) and mirrored: about 56% of the products of one matmul for 2,048
    columns, and 1.6 s against 2.3 s for 25,600 rows on 2 cores. BLAS has no symmetric rank-k product in torch. On
    a GPU one matmul is faster than many small ones.
    """
    dim = x.shape[1]
    if x.device.type != "cpu" or dim <= _GRAM_BLOCK:
        return x.T @ x
    out = x.new_empty((dim, dim))
    for start in range(0, dim, _GRAM_BLOCK):
        stop = min(start + _GRAM_BLOCK, dim)
        out[start:stop, :stop] = x[:, start:stop].T @ x[:, :stop]  # (b, stop): a block row of the lower triangle
    lower = out.tril()
    return lower + lower.tril(-1).T


def rankme(rows: Tensor, eps: float = 1e-7) -> Tensor:
    """RankMe [0]: the effective rank ``exp(entropy(p))``, ``p = s / sum(s) + eps``, of the uncentred rows.

    ``s`` are the singular values of the ``(N, D)`` matrix of rows, not centred. Close to ``k`` for a rank-``k``
    matrix whose ``k`` singular values are equal; at most ``min(N, D)`` (plus a term of order ``eps``).

    Args:
        rows: Tensor of shape (N, D), N >= 2.
        eps: added to every normalised singular value.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: for rows that are not (N, D) with N >= 2.

    Examples:
        >>> import torch
        >>> round(float(rankme(torch.eye(4))), 4)
        4.0
    """
    x = _check_rows(rows, "rankme")
    # The singular values are the square roots of the eigenvalues of the smaller Gram matrix: a fraction of the time
    # of an SVD of 25,600 x 2,048 rows (about 2 s against 32 s on 2 CPU threads). In float64 a value below ~1e-8 of
    # the largest is lost, as is its share of the entropy (under 1e-6 of RankMe).
    gram = _gram(x) if x.shape[0] >= x.shape[1] else _gram(x.T)  # (min(N, D), min(N, D))
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    return _entropy_exp(s, eps)


def alpha_req(rows: Tensor, fit_range: tuple[int, int] = (10, 100)) -> Tensor:
    """alpha-ReQ [1]: the power-law decay exponent ``alpha`` of the centred covariance eigenspectrum.

    The eigenvalues ``lambda_i`` (descending, 0-based ``i``) of the covariance of the centred rows (``1/N``) are
    fitted as ``log(lambda_i) = c - alpha * log(i + 1)`` over ``i`` in ``[start, stop)`` by least squares weighted
    by ``1 / (i + 1)`` (one over the rank). ``fit_range`` is clipped to the eigenvalues that exist: the numerically
    non-zero ones (``lambda_i > lambda_0 * max(N, D) * float64 eps``, at most ``min(N - 1, D)``).

    Args:
        rows: Tensor of shape (N, D), N >= 2.
        fit_range: ``(start, stop)``, 0-based eigenvalue indices, ``stop`` excluded.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: for a bad ``fit_range``, or when fewer than two eigenvalues remain in it after clipping.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> q, _ = torch.linalg.qr(torch.randn(400, 50, generator=g, dtype=torch.float64))
        >>> rows = q * torch.arange(1, 51, dtype=torch.float64) ** -1.0  # eigenvalues (i + 1) ** -2 / N
        >>> round(float(alpha_req(rows - rows.mean(0), fit_range=(0, 50))), 2)
        2.0
    """
    start, stop = _check_fit_range(fit_range)
    x = _check_rows(rows, "alpha_req")
    x -= x.mean(dim=0, keepdim=True)  # in place: x is _check_rows's own copy
    cov = _gram(x) / x.shape[0]  # (D, D)
    eig = torch.linalg.eigvalsh(cov).flip(0)  # (D,), descending
    tol = eig[0].clamp_min(0) * max(x.shape) * torch.finfo(torch.float64).eps
    exist = int((eig > tol).sum())  # one host sync
    stop = min(stop, exist)
    if stop - start < 2:
        raise ValueError(
            f"alpha_req: fit_range={tuple(fit_range)} leaves {max(stop - start, 0)} eigenvalue(s) after clipping to "
            f"the {exist} non-zero eigenvalues of the covariance of {x.shape[0]} rows of {x.shape[1]} features; at "
            f"least 2 are needed. Pass a fit_range inside [0, {exist}), e.g. fit_range=(0, {exist}), or use more rows."
        )
    rank = torch.arange(start + 1, stop + 1, dtype=torch.float64, device=x.device)  # (K,), i + 1
    u, y, w = torch.log(rank), torch.log(eig[start:stop]), 1.0 / rank
    u_bar, y_bar = (w * u).sum() / w.sum(), (w * y).sum() / w.sum()
    slope = (w * (u - u_bar) * (y - y_bar)).sum() / (w * (u - u_bar) ** 2).sum()
    return -slope


def _check_fit_range(fit_range: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(fit_range, (tuple, list))
        or len(fit_range) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in fit_range)
        or fit_range[0] < 0
        or fit_range[1] - fit_range[0] < 2
    ):
        raise ValueError(
            f"alpha_req: fit_range must be (start, stop), two ints with 0 <= start and stop - start >= 2 (0-based "
            f"eigenvalue indices, stop excluded), got {fit_range!r}. Pass e.g. fit_range=(10, 100)."
        )
    return int(fit_range[0]), int(fit_range[1])


def lidar(views: Tensor, delta: float = 1e-4, eps: float = 1e-7) -> Tensor:
    """LiDAR [2]: the effective rank of the linear discriminant of samples (classes) against their views.

    Each of the ``n`` samples is a surrogate class of its ``q`` views. ``Sigma_b`` is the covariance of the class
    means (``1/n``), ``Sigma_w`` that of the views around their class mean (``1/(n*q)``) plus ``delta * I``;
    LiDAR is ``exp(entropy(p))``, ``p = lambda / sum(lambda) + eps``, over the eigenvalues ``lambda`` of
    ``Sigma_w^-1/2 Sigma_b Sigma_w^-1/2``.

    Args:
        views: Tensor of shape (n, q, D): n >= 2 samples, q >= 2 views each.
        delta: ridge added to ``Sigma_w``.
        eps: added to every normalised eigenvalue.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: for views that are not (n, q, D) with n >= 2 and q >= 2.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> centres = torch.randn(64, 1, 3, generator=g)
        >>> views = centres + 0.1 * torch.randn(64, 4, 3, generator=g)
        >>> 2.5 < float(lidar(views)) <= 3.0
        True
    """
    if not isinstance(views, Tensor) or views.ndim != 3 or views.shape[0] < 2 or views.shape[1] < 2:
        got = tuple(views.shape) if isinstance(views, Tensor) else type(views).__name__
        raise ValueError(
            f"lidar: views must be a Tensor of shape (n, q, D) with n >= 2 samples and q >= 2 views each, got {got}."
        )
    x = views.detach().to(torch.float64)
    n, q, dim = x.shape
    means = x.mean(dim=1)  # (n, D)
    centred_means = means - means.mean(dim=0, keepdim=True)  # (n, D): Sigma_b = C^T C / n
    # The scatter of the views around their mean, sum_j (x_j - m)(x_j - m)^T = X^T (I - 11^T / q) X, equals
    # (H X)^T (H X) for the q - 1 orthonormal Helmert contrasts H (rows orthogonal to the ones, H^T H = I - 11^T/q):
    # q - 1 rows per sample instead of q, half the products for two views.
    within = (_helmert(q, x) @ x).reshape(n * (q - 1), dim)  # (q-1, q) @ (n, q, D) -> (n*(q-1), D); not an einsum
    # (10x slower on the CPU for this shape)
    sigma_w = _gram(within) / (n * q) + delta * torch.eye(dim, dtype=x.dtype, device=x.device)  # (D, D)
    # Sigma_w^-1/2 Sigma_b Sigma_w^-1/2 and L^-1 Sigma_b L^-T (Sigma_w = L L^T, Cholesky) are both similar to
    # Sigma_w^-1 Sigma_b: the same eigenvalues, without an eigendecomposition of Sigma_w.
    chol = torch.linalg.cholesky(sigma_w)  # (D, D)
    if n >= dim:  # form Sigma_b (D, D), then two triangular solves of D columns
        left = torch.linalg.solve_triangular(chol, _gram(centred_means) / n, upper=False)  # L^-1 Sigma_b
        small = torch.linalg.solve_triangular(chol, left.T, upper=False)  # L^-1 Sigma_b L^-T, (D, D)
        lam = torch.linalg.eigvalsh((small + small.T) / 2).clamp_min(0)  # symmetric up to rounding
    else:
        # With B = L^-1 C^T, L^-1 Sigma_b L^-T = B B^T / n, whose non-zero eigenvalues are those of the smaller
        # B^T B / n; the other D - n are zero and still count in the entropy (each adds eps to p).
        b = torch.linalg.solve_triangular(chol, centred_means.T, upper=False)  # (D, n)
        lam = torch.linalg.eigvalsh(_gram(b) / n).clamp_min(0)  # (n,)
        lam = torch.cat([lam, lam.new_zeros(dim - lam.numel())])  # (D,)
    return _entropy_exp(lam, eps)


def _helmert(q: int, like: Tensor) -> Tensor:
    """The ``(q - 1, q)`` Helmert contrasts: orthonormal rows, each orthogonal to the vector of ones."""
    k = torch.arange(1, q, dtype=like.dtype, device=like.device)[:, None]  # (q-1, 1): row k
    j = torch.arange(1, q + 1, dtype=like.dtype, device=like.device)[None, :]  # (1, q): column j (1-based)
    return ((j <= k).to(like.dtype) - (j == k + 1).to(like.dtype) * k) / torch.sqrt(k * (k + 1))
