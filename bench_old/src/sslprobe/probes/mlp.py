"""MLPProbe: normalised features, hidden layers, then a linear classifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from sslprobe.probes.feature_norm import FeatureNorm

__all__ = ["MLPProbe"]


class MLPProbe(nn.Module):
    """A small MLP classifier on normalised features: a non-linear probe.

    ``norm -> [Linear -> BatchNorm -> act -> Dropout] x len(hidden) -> Linear``. Disabled parts are
    ``nn.Identity()``, so the forward is a straight line.

    Args:
        num_classes: number of outputs.
        hidden: width of the hidden layer, or widths of several.
        in_features: feature size ``D``; ``None`` infers it at the first batch.
        norm: normalise the input features (:class:`FeatureNorm`: batch statistics in training, the exact
            statistics of the training rows since the previous evaluation in evaluation).
        act_layer: activation class.
        dropout: dropout after each hidden layer (drawn from the probe's private RNG stream).

    Attributes:
        out_features: ``num_classes``.

    Examples:
        >>> import torch
        >>> from sslprobe.probes import MLPProbe
        >>> MLPProbe(num_classes=3, hidden=16, in_features=8)(torch.randn(4, 8)).shape
        torch.Size([4, 3])
    """

    flattens_input = True  # features (B, ...) are flattened to (B, D): OnlineProbe checks sizes that way

    def __init__(
        self,
        num_classes: int,
        hidden: int | Sequence[int] = 1024,
        in_features: int | None = None,
        norm: bool = True,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"MLPProbe: hidden must be a positive int or a list of them, got {hidden!r}.")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"MLPProbe: num_classes must be a positive int, got {num_classes!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLPProbe: dropout must be in [0, 1), got {dropout!r}.")
        self.num_classes = num_classes
        self.out_features = num_classes
        self.norm: nn.Module = FeatureNorm(in_features) if norm else nn.Identity()
        first: nn.Module = nn.LazyLinear(widths[0]) if in_features is None else nn.Linear(in_features, widths[0])
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            layers += [
                first if i == 0 else nn.Linear(widths[i - 1], width),
                nn.BatchNorm1d(width),
                act_layer(),
                nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            ]
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    @property
    def in_features(self) -> int | None:
        """The feature size, once known."""
        weight = self.hidden[0].weight
        return None if isinstance(weight, nn.parameter.UninitializedParameter) else weight.shape[1]

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of features ``(B, D)`` (extra dimensions are flattened)."""
        if features.ndim > 2:
            features = features.flatten(1)
        return self.head(self.hidden(self.norm(features)))
