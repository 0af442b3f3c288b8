"""AttentiveProbe: learned-query attention pooling over token features, then a linear classifier.

- [0] Bardes et al., 2024, V-JEPA (attentive probe), https://arxiv.org/abs/2404.08471
- [1] Chen et al., 2022, Context Autoencoder (attentive probing), https://arxiv.org/abs/2202.03026
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

__all__ = ["AttentiveProbe"]


class AttentiveProbe(nn.modules.lazy.LazyModuleMixin, nn.Module):
    """Pool tokens ``(B, N, D)`` with learned queries (multi-head cross-attention), then classify linearly.

    Tokens are layer-normalised (no affine), ``num_queries`` learned queries attend over them, the attended
    queries are averaged, normalised and fed to a linear head. Features ``(B, D)`` are treated as one token. With
    ``in_features=None`` every weight is created at the first batch (or from a checkpoint), like ``nn.LazyLinear``.

    Args:
        num_classes: number of outputs.
        in_features: token size ``D``; ``None`` infers it at the first batch.
        num_heads: attention heads; must divide ``D``.
        num_queries: learned queries.
        norm: layer-normalise the tokens and the pooled vector (no learned affine).

    Attributes:
        out_features: ``num_classes``.

    Examples:
        >>> import torch
        >>> from sslprobe.probes import AttentiveProbe
        >>> AttentiveProbe(num_classes=3, in_features=8, num_heads=2)(torch.randn(4, 5, 8)).shape
        torch.Size([4, 3])
        >>> lazy = AttentiveProbe(num_classes=3, num_heads=2)
        >>> lazy(torch.randn(4, 5, 6)).shape, lazy.in_features
        (torch.Size([4, 3]), 6)
    """

    cls_to_become = None

    def __init__(
        self,
        num_classes: int,
        in_features: int | None = None,
        num_heads: int = 8,
        num_queries: int = 1,
        norm: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"AttentiveProbe: num_classes must be a positive int, got {num_classes!r}.")
        if not isinstance(num_heads, int) or num_heads < 1 or not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(
                f"AttentiveProbe: num_heads and num_queries must be positive ints, got {num_heads!r}, {num_queries!r}."
            )
        self.num_classes = num_classes
        self.out_features = num_classes
        self.num_heads = num_heads
        self.num_queries = num_queries
        self.norm = norm
        self.query = UninitializedParameter()
        self.in_proj_weight = UninitializedParameter()  # (3D, D): query, key and value projections
        self.in_proj_bias = UninitializedParameter()
        self.out_proj_weight = UninitializedParameter()
        self.out_proj_bias = UninitializedParameter()
        self.head_weight = UninitializedParameter()
        self.head_bias = UninitializedParameter()
        if in_features is not None:
            self._materialize(in_features)

    @property
    def in_features(self) -> int | None:
        """The token size, once known."""
        return None if self.has_uninitialized_params() else self.query.shape[-1]

    def _materialize(self, dim: int) -> None:
        if dim % self.num_heads:
            raise ValueError(
                f"AttentiveProbe: token size {dim} is not divisible by num_heads={self.num_heads}. Pass a num_heads "
                f"that divides {dim}."
            )
        shapes = {
            "query": (self.num_queries, dim),
            "in_proj_weight": (3 * dim, dim),
            "in_proj_bias": (3 * dim,),
            "out_proj_weight": (dim, dim),
            "out_proj_bias": (dim,),
            "head_weight": (self.num_classes, dim),
            "head_bias": (self.num_classes,),
        }
        for name, shape in shapes.items():
            param = getattr(self, name)
            if isinstance(param, UninitializedParameter):
                param.materialize(shape)
        self.init_weights()

    def initialize_parameters(self, tokens: Tensor) -> None:  # type: ignore[override]
        """Create the weights for tokens of size ``tokens.shape[-1]`` (called by the lazy-module hook)."""
        if self.has_uninitialized_params():
            with torch.no_grad():
                self._materialize(tokens.shape[-1])

    def init_weights(self) -> None:
        """Truncated-normal queries and projections, zero biases and a zero head."""
        with torch.no_grad():
            nn.init.trunc_normal_(self.query, std=0.02)
            nn.init.xavier_uniform_(self.in_proj_weight)
            nn.init.xavier_uniform_(self.out_proj_weight)
            self.in_proj_bias.zero_()
            self.out_proj_bias.zero_()
            self.head_weight.zero_()
            self.head_bias.zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of tokens ``(B, N, D)`` or features ``(B, D)``."""
        if tokens.ndim == 2:
            tokens = tokens.unsqueeze(1)
        b, n, d = tokens.shape
        h = self.num_heads
        if self.norm:
            tokens = F.layer_norm(tokens, (d,))
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(self.query, w_q, b_q).view(1, self.num_queries, h, d // h).transpose(1, 2)  # (1, H, Q, d)
        k = F.linear(tokens, w_k, b_k).view(b, n, h, d // h).transpose(1, 2)  # (B, H, N, d)
        v = F.linear(tokens, w_v, b_v).view(b, n, h, d // h).transpose(1, 2)  # (B, H, N, d)
        attended = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), k, v)  # (B, H, Q, d)
        pooled = F.linear(
            attended.transpose(1, 2).reshape(b, self.num_queries, d), self.out_proj_weight, self.out_proj_bias
        ).mean(dim=1)  # (B, D)
        if self.norm:
            pooled = F.layer_norm(pooled, (d,))
        return F.linear(pooled, self.head_weight, self.head_bias)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, in_features={self.in_features}, num_heads={self.num_heads}, "
            f"num_queries={self.num_queries}, norm={self.norm}"
        )
