"""Closed-form ridge classification from float64 sufficient statistics: one eigendecomposition, a lambda grid, GCV.

- [0] Golub, Heath, Wahba, 1979, Generalized Cross-Validation as a Method for Choosing a Good Ridge Parameter,
  https://doi.org/10.1080/00401706.1979.10489751
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DEFAULT_LAMBDAS", "IGNORE_INDEX", "RidgeFit", "RidgeStatistics", "fit_ridge", "usable_mean"]

#: Penalties per row (``alpha = lambda * n``) tried when none are given: ``10 ** linspace(-6, 1, 15)``.
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(10 ** (-6 + 0.5 * i) for i in range(15))
#: The label of a row to leave out (unlabelled), as cross-entropy's default ``ignore_index``.
IGNORE_INDEX = -100
# Slots at the head of the statistics buffer: usable rows, rows with non-finite features, labelled rows whose
# label lies outside [0, num_classes), rows offered.
_COUNTS = 4
_EPS = torch.finfo(torch.float64).eps


class RidgeFit(NamedTuple):
    """A ridge classifier fitted by :func:`fit_ridge`, folded back onto the raw features.

    ``scores = features @ weight + bias`` equals ``Z @ W + b`` of the classifier fitted on the standardised rows
    ``Z = (features - mean) / std``.
    """

    weight: Tensor  # (D, C), float64, on raw features
    bias: Tensor  # (C,)
    lambda_: float  # the chosen penalty per row
    gcv: Tensor  # (L,), the GCV error of every grid value
    mean: Tensor  # (D,), the fitted rows' mean
    std: Tensor  # (D,), their population standard deviation (1 where a feature is constant)
    rows: int  # rows fitted

    def decision(self, features: Tensor) -> Tensor:
        """Class scores ``(B, C)`` of features ``(B, D)`` (computed in float64)."""
        return torch.addmm(self.bias, features.to(torch.float64), self.weight)

    def to(self, device: torch.device | str) -> RidgeFit:
        """This fit with its tensors on ``device``."""
        move = {k: v.to(device) for k, v in self._asdict().items() if isinstance(v, Tensor)}
        return self._replace(**move)


def _usable(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(usable, finite, labelled, in_range)`` masks ``(B,)`` of a batch."""
    finite = torch.isfinite(features).all(dim=1)
    labelled = labels != IGNORE_INDEX
    in_range = (labels >= 0) & (labels < num_classes)
    return finite & labelled & in_range, finite, labelled, in_range


@torch.no_grad()
def usable_mean(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The float64 mean ``(D,)`` of a batch's usable rows (zero when there is none), computed on the device.

    A good ``shift`` for :class:`RidgeStatistics` when there is no previous fit.

    Examples:
        >>> usable_mean(torch.tensor([[1.0, 2.0], [3.0, float("nan")], [5.0, 6.0]]), torch.tensor([0, 1, 1]), 2)
        tensor([3., 4.], dtype=torch.float64)
    """
    usable = _usable(features, labels, num_classes)[0]  # (B,)
    x = torch.where(usable[:, None], features.to(torch.float64), 0.0)  # (B, D)
    return x.sum(dim=0) / usable.sum().clamp_min(1)


class RidgeStatistics:
    """Float64 sufficient statistics of labelled rows, for a ridge classifier: memory ``O(D^2 + D*C)``.

    For the usable rows ``x`` (features shifted by ``shift``) and their targets ``y`` (one-hot in ``{-1, +1}``) it
    keeps ``n``, ``sum x``, ``sum y``, ``X'X`` and ``X'Y``, as views of one flat buffer (so that processes sum them in
    one collective). A row is usable when its features are finite and its label lies in ``[0, num_classes)``; rows
    labelled :data:`IGNORE_INDEX` are left out silently; the others are counted (``nonfinite``, ``bad_labels``).
    :meth:`update` reads nothing on the host.

    The shift (the previous fit's mean, or the first batch's: :func:`usable_mean`) keeps ``X'X - n * mean * mean'``
    from cancelling when features sit far from zero; it changes nothing else.

    Args:
        num_features: ``D``.
        num_classes: ``C``.
        device: where the statistics live.
        shift: ``(D,)``, subtracted from the features before they are summed; ``None`` is zero.

    Examples:
        >>> stats = RidgeStatistics(num_features=2, num_classes=3)
        >>> stats.update(torch.tensor([[1.0, 2.0], [3.0, float("nan")], [5.0, 6.0]]), torch.tensor([0, 1, -100]))
        >>> stats.counts.tolist()  # usable, non-finite, bad labels, offered
        [1.0, 1.0, 0.0, 3.0]
        >>> stats.xty
        tensor([[ 1., -1., -1.],
                [ 2., -2., -2.]], dtype=torch.float64)
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        device: torch.device | str | None = None,
        shift: Tensor | None = None,
    ) -> None:
        self.num_features, self.num_classes = num_features, num_classes
        d, c = num_features, num_classes
        self.buffer = torch.zeros(_COUNTS + d + c + d * d + d * c, dtype=torch.float64, device=device)
        self.shift = torch.zeros(d, dtype=torch.float64, device=device)
        if shift is not None:
            self.shift.copy_(shift)
        self._views()

    def _views(self) -> None:
        d, c = self.num_features, self.num_classes
        counts, sum_x, sum_y, xtx, xty = self.buffer.split([_COUNTS, d, c, d * d, d * c])
        self.counts = counts  # (4,): usable rows, non-finite rows, bad labels, rows offered
        self.sum_x = sum_x  # (D,)
        self.sum_y = sum_y  # (C,)
        self.xtx = xtx.view(d, d)  # (D, D)
        self.xty = xty.view(d, c)  # (D, C)
        self._classes = torch.arange(c, device=self.buffer.device)  # (C,)
        # The smallest and largest label seen (ignored ones aside): only for error messages, never summed.
        self.label_range = torch.zeros(2, dtype=torch.long, device=self.buffer.device)

    @classmethod
    def from_buffer(cls, buffer: Tensor, shift: Tensor, num_classes: int) -> RidgeStatistics:
        """Statistics over a copy of ``buffer`` (as :attr:`buffer` holds them) and ``shift``."""
        stats = cls(shift.shape[0], num_classes, device=buffer.device, shift=shift)
        if buffer.shape != stats.buffer.shape:
            raise ValueError(
                f"RidgeStatistics: a buffer of {buffer.numel()} values does not fit {shift.shape[0]} features and "
                f"{num_classes} classes ({stats.buffer.numel()} values)."
            )
        stats.buffer.copy_(buffer)
        return stats

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def to(self, device: torch.device | str) -> RidgeStatistics:
        """Move the statistics to ``device`` (in place; returns ``self``)."""
        if torch.device(device) != self.buffer.device:
            self.buffer, self.shift = self.buffer.to(device), self.shift.to(device)
            label_range = self.label_range.to(device)
            self._views()
            self.label_range = label_range
        return self

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: features ``(B, D)`` (any floating dtype), integer labels ``(B,)``. No host sync."""
        if features.shape[0] == 0:
            return
        usable, finite, labelled, in_range = _usable(features, labels, self.num_classes)  # (B,) each
        unusable = ~usable[:, None]  # (B, 1)
        # A fill, not a product: a non-finite row times 0 would still be NaN.
        x = features.to(torch.float64, copy=True).sub_(self.shift).masked_fill_(unusable, 0.0)  # (B, D)
        onehot = (labels[:, None] == self._classes).to(torch.float64)  # (B, C)
        y = onehot.mul_(2).sub_(1).masked_fill_(unusable, 0.0)  # (B, C): +1 / -1, zero rows where unusable
        flags = torch.stack([usable, ~finite, labelled & ~in_range], dim=1)  # (B, 3)
        self.counts[:3] += flags.sum(dim=0)
        self.counts[3] += features.shape[0]
        self.sum_x += x.sum(dim=0)
        self.sum_y += y.sum(dim=0)
        self.xtx.addmm_(x.T, x)
        self.xty.addmm_(x.T, y)
        low, high = torch.aminmax(torch.where(labelled, labels, 0))  # 0 is a valid label: it never widens the range
        torch.minimum(self.label_range[0], low, out=self.label_range[0])
        torch.maximum(self.label_range[1], high, out=self.label_range[1])

    @torch.no_grad()
    def reset_(self, shift: Tensor | None = None) -> None:
        """Forget every row; the next rows are summed about ``shift`` (``None`` keeps the current one)."""
        self.buffer.zero_()
        self.label_range.zero_()
        if shift is not None:
            self.shift.copy_(shift)


@torch.no_grad()
def fit_ridge(stats: RidgeStatistics, lambdas: Sequence[float]) -> RidgeFit | None:
    """Fit a ridge classifier on the rows summed in ``stats``, choosing ``lambda`` from ``lambdas`` by GCV.

    The features are standardised with the rows' mean and population standard deviation (a constant feature keeps
    a standard deviation of 1 and gets no weight); the targets are one-hot in ``{-1, +1}``. For every ``lambda`` the
    solution is ``W = (Z'Z + lambda * n * I)^-1 Z'Y`` on the centred standardised rows, with the intercept
    ``mean(Y)`` unpenalised: scikit-learn's ``RidgeClassifier(alpha=lambda * n, fit_intercept=True)`` on those rows.
    All of the grid comes from one eigendecomposition ``Z'Z = V diag(s) V'``, and ``lambda`` is the grid value with
    the lowest generalised cross-validation error [0]
    ``GCV = n * ||Y - Z W - b||^2 / (n - df)^2``, ``df = sum(s / (s + lambda * n)) + 1`` (the + 1 is the intercept),
    computed from the statistics alone.

    Args:
        stats: the rows' statistics.
        lambdas: penalties per row, each > 0; ties go to the first.

    Returns:
        The fit, or ``None`` when ``stats`` holds no usable row.

    Examples:
        >>> stats = RidgeStatistics(num_features=1, num_classes=2)
        >>> stats.update(torch.tensor([[-2.0], [-1.0], [1.0], [2.0]]), torch.tensor([0, 0, 1, 1]))
        >>> fit = fit_ridge(stats, [1e-3, 1.0])
        >>> fit.lambda_, fit.decision(torch.tensor([[-3.0], [3.0]])).argmax(dim=1).tolist()
        (0.001, [0, 1])
    """
    n = stats.counts[0]
    rows = int(n)  # one sync
    if rows == 0:
        return None
    lam = torch.tensor([float(v) for v in lambdas], dtype=torch.float64, device=stats.device)  # (L,)
    mean_shifted = stats.sum_x / n  # (D,), the mean of the shifted features
    mean = stats.shift + mean_shifted
    centred_xtx = stats.xtx - torch.outer(stats.sum_x, mean_shifted)  # (D, D) = sum (x - mean)(x - mean)'
    second = stats.xtx.diagonal() / n  # (D,), mean square about the shift
    var = (centred_xtx.diagonal() / n).clamp_min(0)  # (D,), population variance
    # A constant feature's variance is 0 up to the rounding of the sums (sklearn's StandardScaler uses a like bound).
    constant = var <= 16 * (rows + 1) * _EPS * second  # (D,)
    std = torch.where(constant, 1.0, var.sqrt())  # (D,)
    keep = (~constant).to(torch.float64)  # (D,)
    scale = keep / std  # (D,): 0 for constant features, whose centred values are 0
    gram = centred_xtx * torch.outer(scale, scale)  # (D, D) = Z'Z (Z centred)
    y_mean = stats.sum_y / n  # (C,)
    zy = (stats.xty - torch.outer(stats.sum_x, y_mean)) * scale[:, None]  # (D, C) = Z'(Y - mean(Y))
    yy = (n - stats.sum_y.square() / n).sum()  # ||Y - mean(Y)||^2: every entry of Y is -1 or +1
    s, v = torch.linalg.eigh(gram)  # (D,), (D, D)
    # Directions below the numerical rank (as torch.linalg.matrix_rank draws it) are rounding, not variance: they
    # would add a spurious few 1e-9 to df, which matters where n - df is small (fewer rows than features).
    s = torch.where(s > s.shape[0] * _EPS * s[-1].clamp_min(0), s, 0.0)
    p = v.T @ zy  # (D, C): Z'Y in the eigenbasis
    q = p.square().sum(dim=1)  # (D,)
    alpha = lam * n  # (L,)
    denom = s + alpha[:, None]  # (L, D)
    df = (s / denom).sum(dim=1) + 1  # (L,)
    # ||Yc - Z W||^2 = ||Yc||^2 - 2 tr(W'Z'Yc) + tr(W'Z'Z W), per eigen-direction: q (s + 2 alpha) / (s + alpha)^2.
    rss = (yy - (q * (s + 2 * alpha[:, None]) / denom.square()).sum(dim=1)).clamp_min(0)  # (L,)
    dof = n - df  # (L,)
    gcv = torch.where(dof > 0, n * rss / dof.square().clamp_min(torch.finfo(torch.float64).tiny), torch.inf)
    best = int(torch.argmin(gcv))  # one sync
    w_std = v @ (p / denom[best][:, None])  # (D, C), on standardised features
    weight = w_std * scale[:, None]  # (D, C), on raw features
    bias = y_mean - mean @ weight  # (C,)
    return RidgeFit(weight, bias, float(lam[best]), gcv, mean, std, rows)
