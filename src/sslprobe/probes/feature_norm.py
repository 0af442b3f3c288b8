"""FeatureNorm: batch normalisation in training, the exact statistics of the latest training rows in evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer

__all__ = ["FeatureNorm"]

_WINDOW = ("window_count", "window_sum", "window_sq")


class FeatureNorm(nn.modules.lazy.LazyModuleMixin, nn.Module):
    """Normalise features ``(B, D)`` without learned affine: batch statistics in training, exact ones in evaluation.

    In training it normalises each batch with its own mean and (biased) variance, exactly as
    ``BatchNorm1d(affine=False)`` does, and adds the batch's rows to float64 sums. In evaluation it normalises
    with the exact mean and variance of every training row seen since the previous evaluation (the first
    evaluation forward after training folds the sums into ``running_mean``/``running_var``, on the device, and
    starts a new window); with no training row since then it keeps the statistics it had. A BatchNorm's
    exponential running average would instead start from mean 0 / variance 1 and trail features that move as
    the encoder trains: after 5 updates 59% of it is still the initialisation.

    The sums stay float64 whatever dtype the module is moved to, and are buffers: they are checkpointed, restored
    where a non-finite batch is skipped, and averaged across processes (which keeps sum / count exact) by the
    probes before evaluation. ``in_features=None`` infers ``D`` at the first batch.

    Args:
        in_features: feature size ``D``, or ``None`` to infer it.
        eps: added to the variance.

    Examples:
        >>> import torch
        >>> norm = FeatureNorm(2)
        >>> x = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
        >>> norm(x)  # training: this batch's statistics
        tensor([[-1.0000, -1.0000],
                [ 1.0000,  1.0000]])
        >>> _ = norm.eval()
        >>> norm(torch.tensor([[1.0, 3.0]]))  # evaluation: the training rows' mean (1, 3)
        tensor([[0., 0.]])
        >>> norm.running_var
        tensor([1., 4.])
    """

    cls_to_become = None
    running_mean: Tensor
    running_var: Tensor
    window_count: Tensor
    window_sum: Tensor
    window_sq: Tensor

    def __init__(self, in_features: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        if in_features is not None and (isinstance(in_features, bool) or not isinstance(in_features, int)):
            raise ValueError(f"FeatureNorm: in_features must be a positive int or None, got {in_features!r}.")
        if in_features is not None and in_features < 1:
            raise ValueError(f"FeatureNorm: in_features must be a positive int or None, got {in_features!r}.")
        self.eps = eps
        self.register_buffer("window_count", torch.zeros((), dtype=torch.float64))
        if in_features is None:
            for name in ("running_mean", "running_var"):
                self.register_buffer(name, UninitializedBuffer())
            for name in _WINDOW[1:]:
                self.register_buffer(name, UninitializedBuffer(dtype=torch.float64))
        else:
            self._make_buffers(in_features, torch.get_default_dtype(), None)

    @property
    def in_features(self) -> int | None:
        """The feature size, once known."""
        return None if isinstance(self.running_mean, UninitializedBuffer) else self.running_mean.shape[0]

    def _make_buffers(self, size: int, dtype: torch.dtype, device: Any) -> None:
        self.register_buffer("running_mean", torch.zeros(size, dtype=dtype, device=device))
        self.register_buffer("running_var", torch.ones(size, dtype=dtype, device=device))
        self.register_buffer("window_sum", torch.zeros(size, dtype=torch.float64, device=device))
        self.register_buffer("window_sq", torch.zeros(size, dtype=torch.float64, device=device))
        self.register_buffer("window_count", self.window_count.to(device))

    def initialize_parameters(self, features: Tensor) -> None:  # type: ignore[override]
        """Create the buffers for features of size ``features.shape[-1]`` (the lazy-module hook)."""
        if self.has_uninitialized_params():
            dtype = features.dtype if features.is_floating_point() else torch.get_default_dtype()
            self._make_buffers(features.shape[-1], dtype, features.device)

    def reset_running_stats(self) -> None:
        """Back to mean 0 / variance 1 with an empty window (as a new module)."""
        if self.has_uninitialized_params():
            return
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            for name in _WINDOW:
                getattr(self, name).zero_()

    @torch.no_grad()
    def fold_window(self) -> None:
        """Make the window's exact statistics the evaluation statistics, and empty it (on the device, no sync)."""
        count = self.window_count
        seen = count > 0
        n = count.clamp(min=1.0)
        mean = self.window_sum / n
        var = (self.window_sq / n - mean.square()).clamp_(min=0.0)
        self.running_mean.copy_(torch.where(seen, mean.to(self.running_mean.dtype), self.running_mean))
        self.running_var.copy_(torch.where(seen, var.to(self.running_var.dtype), self.running_var))
        for name in _WINDOW:
            getattr(self, name).zero_()

    def forward(self, features: Tensor) -> Tensor:
        """Normalised features, the shape of ``features`` ``(B, D)``."""
        if self.training:
            with torch.no_grad():
                rows = features.detach().to(torch.float64)
                self.window_count.add_(rows.shape[0])
                self.window_sum.add_(rows.sum(0))
                self.window_sq.add_(rows.square().sum(0))
            return F.batch_norm(features, None, None, training=True, eps=self.eps)
        self.fold_window()
        return F.batch_norm(features, self.running_mean, self.running_var, training=False, eps=self.eps)

    def _apply(self, fn: Any, recurse: bool = True) -> FeatureNorm:
        # `.half()`/`.to(dtype)` would round the sums (float16 sums of squares overflow at 65504): they keep float64
        # and only follow the module's device.
        window = {name: self._buffers.pop(name) for name in _WINDOW}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.running_mean.device
            for name, value in window.items():
                self._buffers[name] = (
                    value if value.device == device or isinstance(value, UninitializedBuffer) else value.to(device)
                )
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # A BatchNorm1d(affine=False) checkpoint (the probes' normalisation before FeatureNorm) loads: it has no
        # window (an empty one) and a batch counter that is not needed.
        state_dict.pop(prefix + "num_batches_tracked", None)
        mean = state_dict.get(prefix + "running_mean")
        if mean is not None and not isinstance(mean, UninitializedBuffer):
            for name in _WINDOW:
                if prefix + name not in state_dict:
                    shape = () if name == "window_count" else mean.shape
                    state_dict[prefix + name] = torch.zeros(shape, dtype=torch.float64, device=mean.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        return f"{self.in_features}, eps={self.eps}"
