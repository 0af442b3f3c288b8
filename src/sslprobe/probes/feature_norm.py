"""FeatureNorm: batch normalisation in training, exact statistics of the current encoder in evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer

__all__ = ["FeatureNorm"]

_ALLOWED_EVAL_STATS = ("eval", "train")
_MOMENTS = ("train_moments", "eval_moments")  # float64 [count, sum (D), sum of squares (D)]


class _LazyBuffer(UninitializedBuffer):
    """torch's ``UninitializedBuffer`` that ``copy.deepcopy`` can copy (torch's own refuses, as a tensor operation).

    A copy is a new buffer waiting for its own first batch, as ``UninitializedParameter`` copies are; so a model
    holding a lazy probe can be deep-copied (``copy.deepcopy``, weight averaging, ``ddp_spawn``) before training.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _LazyBuffer:
        if id(self) not in memo:
            memo[id(self)] = type(self)(self.requires_grad, self.data.device, self.data.dtype)
        return memo[id(self)]


class FeatureNorm(nn.modules.lazy.LazyModuleMixin, nn.Module):
    """Normalise features ``(B, D)`` without learned affine: batch statistics in training, exact ones in evaluation.

    In training it normalises each batch with its own mean and (biased) variance, exactly as
    ``BatchNorm1d(affine=False)`` does. In evaluation it normalises with exact statistics of the current encoder
    instead of BatchNorm's exponential running average, which starts from mean 0 / variance 1 and trails
    features that move as the encoder trains (after 5 updates 59% of it is still the initialisation):

    - ``eval_stats="eval"`` (default): the mean and variance of the evaluation rows seen so far in this evaluation
      (an evaluation starts when the module switches from training to eval mode, or at
      :meth:`start_evaluation`), the current batch included. These are the features the probe is scored on, made
      as evaluation makes them: an encoder with BatchNorm gives other features in eval mode than in training, which
      no training-time statistic can know.
    - ``eval_stats="train"``: the mean and variance of every training row since the previous evaluation.

    Where fewer than two rows are known the statistics of the previous training window are used (mean 0 and
    variance 1 before any). ``frozen_eval = True`` stops evaluation rows from updating the statistics (an
    :class:`~sslprobe.callbacks.OnlineProbe` scores a second validation loader, a shifted domain, with the first
    loader's statistics). The sums are float64 whatever dtype the module is moved to; the training window is a
    buffer (checkpointed, restored where a non-finite batch is skipped, averaged across processes by the probes).
    ``in_features=None`` infers ``D`` at the first batch.

    Args:
        in_features: feature size ``D``, or ``None`` to infer it.
        eps: added to the variance.
        eval_stats: ``"eval"`` or ``"train"``, as above.

    Examples:
        >>> import torch
        >>> norm = FeatureNorm(2)
        >>> norm(torch.tensor([[0.0, 1.0], [2.0, 5.0]]))  # training: this batch's statistics
        tensor([[-1.0000, -1.0000],
                [ 1.0000,  1.0000]])
        >>> _ = norm.eval()
        >>> norm(torch.tensor([[1.0, 3.0], [3.0, 3.0]]))  # evaluation: these rows' own statistics
        tensor([[-1.0000,  0.0000],
                [ 1.0000,  0.0000]])
        >>> norm.running_mean  # the training rows' mean, used where fewer than two rows are known
        tensor([1., 3.])
    """

    cls_to_become = None
    running_mean: Tensor
    running_var: Tensor
    train_moments: Tensor
    eval_moments: Tensor

    def __init__(
        self, in_features: int | None = None, eps: float = 1e-5, eval_stats: Literal["eval", "train"] = "eval"
    ) -> None:
        super().__init__()
        if in_features is not None and (
            isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1
        ):
            raise ValueError(f"FeatureNorm: in_features must be a positive int or None, got {in_features!r}.")
        if eval_stats not in _ALLOWED_EVAL_STATS:
            raise ValueError(f"FeatureNorm: eval_stats must be one of {_ALLOWED_EVAL_STATS}, got {eval_stats!r}.")
        self.eps = eps
        self.eval_stats = eval_stats
        self.frozen_eval = False
        # Sums the evaluation rows of every process (set by the probes under DDP); None on one process.
        self._reduce: Callable[[list[Tensor]], None] | None = None
        if in_features is None:
            for name in ("running_mean", "running_var", *_MOMENTS):
                self.register_buffer(name, _LazyBuffer(), persistent=name != "eval_moments")
        else:
            self._make_buffers(in_features, torch.get_default_dtype(), None)

    @property
    def in_features(self) -> int | None:
        """The feature size, once known."""
        return None if isinstance(self.running_mean, UninitializedBuffer) else self.running_mean.shape[0]

    def _make_buffers(self, size: int, dtype: torch.dtype, device: Any) -> None:
        self.register_buffer("running_mean", torch.zeros(size, dtype=dtype, device=device))
        self.register_buffer("running_var", torch.ones(size, dtype=dtype, device=device))
        self.register_buffer("train_moments", torch.zeros(2 * size + 1, dtype=torch.float64, device=device))
        self.register_buffer(
            "eval_moments", torch.zeros(2 * size + 1, dtype=torch.float64, device=device), persistent=False
        )

    def initialize_parameters(self, features: Tensor) -> None:  # type: ignore[override]
        """Create the buffers for features of size ``features.shape[-1]`` (the lazy-module hook)."""
        if self.has_uninitialized_params():
            dtype = features.dtype if features.is_floating_point() else torch.get_default_dtype()
            self._make_buffers(features.shape[-1], dtype, features.device)

    def reset_running_stats(self) -> None:
        """Back to mean 0 / variance 1 with no row seen (as a new module)."""
        if self.has_uninitialized_params():
            return
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.train_moments.zero_()
            self.eval_moments.zero_()

    def train(self, mode: bool = True) -> FeatureNorm:
        """Switch mode; a switch from training to evaluation starts a new evaluation."""
        starts = self.training and not mode
        super().train(mode)
        if starts:
            self.start_evaluation()
        return self

    @torch.no_grad()
    def start_evaluation(self) -> None:
        """Forget the previous evaluation's rows, and make the training window the fallback statistics."""
        if self.has_uninitialized_params():
            return
        mean, var, seen = moments_statistics(self.train_moments, minimum=1)
        self.running_mean.copy_(torch.where(seen, mean.to(self.running_mean.dtype), self.running_mean))
        self.running_var.copy_(torch.where(seen, var.to(self.running_var.dtype), self.running_var))
        self.train_moments.zero_()
        self.eval_moments.zero_()

    def forward(self, features: Tensor) -> Tensor:
        """Normalised features, the shape of ``features`` ``(B, D)``."""
        if self.training:
            with torch.no_grad():
                self.train_moments.add_(row_moments(features))
            return F.batch_norm(features, None, None, training=True, eps=self.eps)
        if self.eval_stats == "train":
            if bool(self.train_moments[0] > 0):  # a sync; "train" is the user's choice of a fixed statistic
                self.start_evaluation()
            return F.batch_norm(features, self.running_mean, self.running_var, training=False, eps=self.eps)
        with torch.no_grad():
            if not self.frozen_eval:
                moments = row_moments(features)
                if self._reduce is not None:
                    self._reduce([moments])
                self.eval_moments.add_(moments)
            mean, var, seen = moments_statistics(self.eval_moments, minimum=2)
            mean = torch.where(seen, mean.to(features.dtype), self.running_mean.to(features.dtype))
            var = torch.where(seen, var.to(features.dtype), self.running_var.to(features.dtype))
        return F.batch_norm(features, mean, var, training=False, eps=self.eps)

    def _apply(self, fn: Any, recurse: bool = True) -> FeatureNorm:
        # `.half()`/`.to(dtype)` would round the sums (float16 sums of squares overflow at 65504): they stay float64
        # and only follow the module's device.
        moments = {name: self._buffers.pop(name) for name in _MOMENTS}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.running_mean.device
            for name, value in moments.items():
                uninitialized = isinstance(value, UninitializedBuffer)
                self._buffers[name] = value if uninitialized or value.device == device else value.to(device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # A BatchNorm1d(affine=False) checkpoint (the probes' normalisation before FeatureNorm) loads: its statistics
        # become the fallback, with no training window, and its batch counter is not needed.
        state_dict.pop(prefix + "num_batches_tracked", None)
        mean = state_dict.get(prefix + "running_mean")
        if mean is not None and prefix + "train_moments" not in state_dict:
            state_dict[prefix + "train_moments"] = torch.zeros(2 * mean.shape[0] + 1, dtype=torch.float64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if isinstance(self.eval_moments, UninitializedBuffer) and not isinstance(
            self.running_mean, UninitializedBuffer
        ):
            # A lazy module loaded its sizes: the evaluation sums (not saved) follow, so nothing is left to infer.
            size = self.running_mean.shape[0]
            self.register_buffer(
                "eval_moments",
                torch.zeros(2 * size + 1, dtype=torch.float64, device=self.running_mean.device),
                persistent=False,
            )

    def extra_repr(self) -> str:
        return f"{self.in_features}, eps={self.eps}, eval_stats={self.eval_stats!r}"


def row_moments(features: Tensor, keep: Tensor | None = None) -> Tensor:
    """``[count, sum, sum of squares]`` of the rows of ``features`` ``(B, D)``, in float64: ``(2 * D + 1,)``.

    ``keep`` ``(B,)`` (a device mask, no sync) leaves the other rows out, whatever their values (NaN included).
    """
    rows = features.detach()
    if keep is None:
        rows = rows.to(torch.float64)
        count = torch.full((1,), rows.shape[0], dtype=torch.float64, device=rows.device)
    else:
        rows = torch.where(keep[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device)).to(torch.float64)
        count = keep.sum().to(torch.float64).reshape(1)
    return torch.cat([count, rows.sum(0), rows.square().sum(0)])


def moments_statistics(moments: Tensor, minimum: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, biased variance, and whether at least ``minimum`` rows were seen (a device flag), from moments."""
    size = (moments.shape[0] - 1) // 2
    count = moments[0]
    n = count.clamp(min=1.0)
    mean = moments[1 : size + 1] / n
    var = (moments[size + 1 :] / n - mean.square()).clamp_(min=0.0)
    return mean, var, count >= minimum


def feature_norms(module: nn.Module) -> list[FeatureNorm]:
    """The :class:`FeatureNorm` layers of ``module`` (itself included)."""
    return [m for m in module.modules() if isinstance(m, FeatureNorm)]


def begin_norm_evaluation(module: nn.Module, reduce: Callable[[list[Tensor]], None] | None) -> None:
    """Start an evaluation in every FeatureNorm of ``module``; ``reduce`` sums its rows' statistics across processes."""
    for norm in feature_norms(module):
        norm._reduce = reduce
        norm.frozen_eval = False
        norm.start_evaluation()


def end_norm_evaluation(module: nn.Module) -> None:
    """End an evaluation: a FeatureNorm called on one process alone afterwards must not wait for the others."""
    for norm in feature_norms(module):
        norm._reduce = None
        norm.frozen_eval = False


def freeze_norm_statistics(module: nn.Module, frozen: bool) -> None:
    """Whether this evaluation's rows leave the statistics as they are (a second loader reads the first's)."""
    for norm in feature_norms(module):
        norm.frozen_eval = frozen
