"""The first-batch checks of a probe's features and targets, each failure naming the probe, the key and the fix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["POOL_HINT", "check_features", "check_target"]

POOL_HINT = (
    " HINT: pool the features to (B, D) first (mean over tokens or space, a CLS token, or sslprobe.Layer(path, "
    "pool='auto')), use a probe that flattens them (LinearProbe, MLPProbe), or use AttentiveProbe for tokens "
    "(B, N, D)."
)


def check_features(owner: str, input: Any, x: Tensor, probe: nn.Module) -> None:
    """Raise where the size of ``x`` (flattened, if the probe flattens) is not ``probe.in_features``."""
    expected = getattr(probe, "in_features", None)
    flattens = getattr(probe, "flattens_input", False) and x.ndim > 2
    size = x[0].numel() if flattens else x.shape[-1] if x.ndim >= 1 else 1
    if isinstance(expected, int) and expected > 0 and size != expected:
        flat = f", which it flattens to {size}" if flattens else ""
        raise RuntimeError(
            f"{owner}: features {input!r} have shape {tuple(x.shape)}{flat}, but the probe expects {expected} input "
            f"features. Build the probe with in_features={size} (or leave it None to infer it)."
            + (POOL_HINT if x.ndim > 2 else "")
        )


def check_target(owner: str, loss: Any, input: Any, target_key: Any, preds: Tensor, target: Tensor) -> None:
    """Raise where ``target`` cannot be cross-entropy's target for ``preds`` (shape, dtype, class range).

    Reads the class range on the host: one sync, at the first batch of each stage only.
    """
    if not isinstance(loss, nn.CrossEntropyLoss):
        return
    if target.is_floating_point() and target.shape == preds.shape:
        return  # class probabilities
    if target.is_floating_point() or target.dtype.is_complex or target.dtype == torch.bool:
        raise RuntimeError(
            f"{owner}: cross-entropy needs integer class indices as target, got {target.dtype} of shape "
            f"{tuple(target.shape)}. Convert them with .long(), or pass loss_fn= for another kind of target."
        )
    if preds.ndim > 2 and target.ndim == 1:
        raise RuntimeError(
            f"{owner}: the probe returned predictions of shape {tuple(preds.shape)} (one per token or position) for "
            f"targets of shape {tuple(target.shape)}: it does not pool features of more than two dimensions."
            + POOL_HINT
        )
    if target.ndim == 1 and preds.ndim == 2 and preds.shape[0] != target.shape[0]:
        rows, labels = preds.shape[0], target.shape[0]
        views = f" ({rows // labels} views of each sample concatenated?)" if labels and rows % labels == 0 else ""
        raise RuntimeError(
            f"{owner}: features {input!r} have {rows} rows but the target {target_key!r} has {labels} labels{views}. "
            f"Probe one view (e.g. input=lambda out, batch: out[{input!r}][:{labels}]), or give every row its label "
            f"(e.g. target=lambda out, batch: batch[{target_key!r}].repeat({max(rows // max(labels, 1), 1)}))."
        )
    if target.ndim != preds.ndim - 1 or target.shape[0] != preds.shape[0]:
        raise RuntimeError(
            f"{owner}: cross-entropy needs one class index per sample, a target of shape "
            f"{tuple(preds.shape[:1]) + tuple(preds.shape[2:])}, got {tuple(target.shape)}. Squeeze or flatten it "
            f"(e.g. target=lambda out, batch: batch[{target_key!r}].view(-1))."
        )
    if target.numel() == 0 or preds.ndim < 2:
        return
    num_classes = preds.shape[1]
    valid = target[target != loss.ignore_index]
    if valid.numel() == 0:
        return
    low, high = int(valid.min()), int(valid.max())
    if low < 0:
        raise RuntimeError(
            f"{owner}: targets must be class indices in [0, {num_classes}), got a negative one ({low}). Map the "
            f"labels to 0..{num_classes - 1}, or mark samples to skip with the loss's ignore_index."
        )
    if high >= num_classes:
        raise RuntimeError(
            f"{owner}: targets must be class indices in [0, {num_classes}) for a probe with {num_classes} outputs, "
            f"got values up to {high}. Give the probe {high + 1} outputs or fix the labels."
        )
