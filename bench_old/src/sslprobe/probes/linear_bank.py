"""LinearHeadBank: many linear heads over the same normalised features, computed as one batched matmul."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from sslprobe.probes.feature_norm import FeatureNorm

__all__ = ["LinearHeadBank"]


class LinearHeadBank(nn.modules.lazy.LazyModuleMixin, nn.Module):
    """``num_heads`` linear classifiers on the same features: ``(B, D) -> (H, B, C)`` in one matmul.

    Features are normalised once (:class:`~sslprobe.probes.FeatureNorm`, shared by all heads, as in
    :class:`~sslprobe.probes.LinearProbe`); features of more dimensions are flattened. Weights are one
    ``(H, C, D)`` tensor starting at zero (head ``h`` is ``weight[h]``, laid out as ``nn.Linear.weight``), so the
    heads differ only by how they are trained (a hyper-parameter sweep). All heads are one ``(H * C, D)`` matrix,
    so the forward is a single ``(B, D) x (D, H * C)`` product and the weight gradient another: far faster than
    ``H`` small batched ones. The output is a ``(H, B, C)`` view of the contiguous ``(B, H, C)`` result.
    ``in_features=None`` infers ``D`` lazily.

    Args:
        num_heads: number of heads ``H``.
        num_classes: outputs per head ``C``.
        in_features: feature size ``D``, or ``None``.
        norm: normalise the features.

    Examples:
        >>> import torch
        >>> LinearHeadBank(num_heads=4, num_classes=3, in_features=8)(torch.randn(5, 8)).shape
        torch.Size([4, 5, 3])
    """

    cls_to_become = None
    flattens_input = True  # features (B, ...) are flattened to (B, D): OnlineProbe checks sizes that way

    def __init__(self, num_heads: int, num_classes: int, in_features: int | None = None, norm: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or num_classes < 1:
            raise ValueError(f"LinearHeadBank: num_heads and num_classes must be >= 1, got {num_heads}, {num_classes}.")
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.out_features = num_classes
        self.norm: nn.Module = FeatureNorm(in_features, eps=1e-6) if norm else nn.Identity()
        if in_features is None:
            self.weight = UninitializedParameter()
        else:
            self.weight = nn.Parameter(torch.zeros(num_heads, num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))

    @property
    def in_features(self) -> int | None:
        """The feature size, once known."""
        return None if isinstance(self.weight, UninitializedParameter) else self.weight.shape[2]

    def initialize_parameters(self, features: Tensor) -> None:  # type: ignore[override]
        """Create the zero weights for features ``(B, D)`` or ``(B, ...)`` flattened (the lazy-module hook)."""
        if isinstance(self.weight, UninitializedParameter):
            size = features[0].numel() if features.ndim > 1 else 1
            with torch.no_grad():
                self.weight.materialize((self.num_heads, self.num_classes, size))
                self.weight.zero_()

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(H, B, C)`` of features ``(B, D)``."""
        if features.ndim > 2:
            features = features.flatten(1)
        x = self.norm(features)  # (B, D)
        h, c, d = self.weight.shape
        # A plain product, then the bias: cuBLAS runs this shape (128 x 2048 x 1600 in fp32) about twice as fast as
        # the fused bias product of F.linear (benchmarks/bank_matmul.py).
        logits = torch.mm(x, self.weight.view(h * c, d).t()) + self.bias.view(h * c)  # (B, H * C)
        return logits.view(x.shape[0], h, c).transpose(0, 1)  # (H, B, C)
