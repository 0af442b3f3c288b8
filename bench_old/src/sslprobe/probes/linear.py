"""LinearProbe: parameter-free feature normalisation, then one linear layer.

- [0] He, Chen, Xie, Li, Dollár, Girshick, 2021, MAE (linear probing with BatchNorm without affine),
  https://arxiv.org/abs/2111.06377
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sslprobe.probes.feature_norm import FeatureNorm

__all__ = ["LinearProbe"]


class LinearProbe(nn.Module):
    """Normalise features (no learned affine; see :class:`FeatureNorm`), then a linear classifier.

    Normalising before the linear layer makes the probe insensitive to the scale of the features, which moves
    during self-supervised training, and is what closes most of the gap between an online probe with a fixed
    optimizer and an offline logistic regression. The linear layer starts at zero: its first LARS step is then a
    plain gradient step (a class-mean classifier), and later steps refine it. In evaluation the features are
    normalised with the exact statistics of the training rows since the previous evaluation, so the number is
    that of the current encoder, not of a running average that trails it. Features of more dimensions
    (``(B, C, H, W)``) are flattened.

    Args:
        num_classes: number of outputs.
        in_features: size of the features ``D``; ``None`` infers it at the first batch.
        norm: normalise features (``BatchNorm1d(affine=False)``); ``False`` gives a plain linear layer.
        eps: added to the variance in the normalisation.

    Attributes:
        out_features: ``num_classes``.

    Examples:
        >>> import torch
        >>> from sslprobe.probes import LinearProbe
        >>> LinearProbe(num_classes=3, in_features=8)(torch.randn(4, 8)).shape
        torch.Size([4, 3])
        >>> probe = LinearProbe(num_classes=3)
        >>> _ = probe(torch.randn(4, 5))
        >>> probe.in_features
        5
    """

    flattens_input = True  # features (B, ...) are flattened to (B, D): OnlineProbe checks sizes that way

    def __init__(
        self,
        num_classes: int,
        in_features: int | None = None,
        norm: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"LinearProbe: num_classes must be a positive int, got {num_classes!r}.")
        if in_features is not None and (not isinstance(in_features, int) or in_features < 1):
            raise ValueError(f"LinearProbe: in_features must be a positive int or None, got {in_features!r}.")
        self.num_classes = num_classes
        self.out_features = num_classes
        self.norm = FeatureNorm(in_features, eps=eps) if norm else nn.Identity()
        if in_features is None:
            self.linear: nn.Module = nn.LazyLinear(num_classes)
        else:
            self.linear = nn.Linear(in_features, num_classes)
            self.init_weights()

    @property
    def in_features(self) -> int | None:
        """The feature size, once known."""
        weight = self.linear.weight
        return None if isinstance(weight, nn.parameter.UninitializedParameter) else weight.shape[1]

    def init_weights(self) -> None:
        """Zero the linear layer (the normalised features carry the scale)."""
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of features ``(B, D)`` (extra dimensions are flattened)."""
        if features.ndim > 2:
            features = features.flatten(1)
        x = self.norm(features)
        if isinstance(self.linear, nn.modules.lazy.LazyModuleMixin) and self.linear.has_uninitialized_params():
            self.linear.initialize_parameters(x)  # type: ignore[operator]  # materialise now to set our init
            self.init_weights()
        return self.linear(x)
