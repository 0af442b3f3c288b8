"""The demo's self-supervised pieces: plain-torch augmentations, a small conv encoder and the NT-Xent loss.

- [0] Chen, Kornblith, Norouzi, Hinton, 2020, SimCLR, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvEncoder", "augment", "nt_xent"]


def augment(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random view of a batch of small grey images ``(B, 1, H, W)`` in [0, 1], with plain torch ops.

    Random rotation (±20°), scale (0.8-1.2) and shift (±12%) through one affine resampling, then brightness and
    contrast jitter, Gaussian noise, and a random erased square, each drawn per image.

    Examples:
        >>> augment(torch.rand(4, 1, 8, 8), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 1, 8, 8])
    """
    b, device = images.shape[0], images.device

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return torch.rand(b, *shape, generator=generator).to(device) * (high - low) + low

    angle = uniform(-math.pi / 9, math.pi / 9)
    scale = uniform(0.8, 1.2)
    shift = uniform(-0.12, 0.12, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    contrast = uniform(0.6, 1.4, 1, 1, 1)
    brightness = uniform(-0.2, 0.2, 1, 1, 1)
    mean = views.mean(dim=(2, 3), keepdim=True)
    views = (views - mean) * contrast + mean + brightness
    views = views + 0.05 * torch.randn(views.shape, generator=generator).to(device)
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=device).view(1, 1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, 1, w)
    top = (uniform(0, 1) * (h - 2)).long().view(b, 1, 1, 1)
    left = (uniform(0, 1) * (w - 2)).long().view(b, 1, 1, 1)
    erase = (
        (rows >= top) & (rows < top + 3) & (cols >= left) & (cols < left + 3) & (uniform(0, 1) < 0.5).view(b, 1, 1, 1)
    )
    return views.masked_fill(erase, 0.0).clamp(0.0, 1.0)


class ConvEncoder(nn.Module):
    """A three-block convolutional encoder for small grey images, ``(B, 1, H, W) -> (B, out_features)``.

    Examples:
        >>> ConvEncoder(out_features=32)(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 32])
    """

    def __init__(self, out_features: int = 128, width: int = 32) -> None:
        super().__init__()
        self.out_features = out_features

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.net = nn.Sequential(
            block(1, width),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, out_features),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """NT-Xent (normalised temperature cross-entropy) between two views ``(B, D)``: each view must pick its pair.

    Examples:
        >>> z = torch.randn(8, 16)
        >>> bool(nt_xent(z, z) < nt_xent(z, torch.randn(8, 16)))
        True
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, D)
    sim = z @ z.T / temperature  # (2B, 2B)
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)
