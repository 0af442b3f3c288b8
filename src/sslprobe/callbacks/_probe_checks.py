"""The first-batch checks of a probe's features and targets, each failure naming the probe, the key and the fix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sslprobe._build import class_name

__all__ = [
    "POOL_HINT",
    "UNTRAINED_LAZY",
    "check_features",
    "check_loss_fn",
    "check_target",
    "no_test_target_message",
    "run_probe_checked",
    "single_sample_message",
    "unlabelled_message",
]

POOL_HINT = (
    " HINT: pool the features to (B, D) first (mean over tokens or space, a CLS token, or sslprobe.Layer(path, "
    "pool='auto')), use a probe that flattens them (LinearProbe, MLPProbe), or use AttentiveProbe for tokens "
    "(B, N, D)."
)

UNTRAINED_LAZY = "evaluating a lazy probe before any training batch; its numbers are those of an untrained probe."


def no_test_target_message(owner: str, target: Any) -> str:
    """Why a test is not scored: its batches hold no labels."""
    return (
        f"{owner}: the test batches hold no target {target!r}; the probe only predicts and test metrics are not logged."
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


def check_loss_fn(owner: str, loss_fn: Any) -> None:
    """Raise where ``loss_fn`` is not a ``(preds, target) -> Tensor`` callable (a class is the usual slip)."""
    if isinstance(loss_fn, type):
        name = class_name(loss_fn)
        raise TypeError(
            f"{owner}: loss_fn is the class {name}, not a loss: it would be called with (preds, target) as its "
            f"constructor arguments. Pass an instance, e.g. loss_fn={name}()."
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"{owner}: loss_fn must be callable (preds, target) -> Tensor, got {type(loss_fn).__name__}.")


def run_probe_checked(owner: str, input: Any, probe: nn.Module, x: Tensor) -> Tensor:
    """The probe's first call on a stage's features: checked, and its failure said in the user's terms."""
    check_features(owner, input, x, probe)
    try:
        return probe(x)
    except torch.distributed.DistError:
        raise  # a collective failed (another process stopped): nothing to do with the features' size
    except RuntimeError as err:
        raise RuntimeError(
            f"{owner}: the probe failed on features {input!r} of shape {tuple(x.shape)} and dtype {x.dtype}: {err}. "
            "Check that the probe's input size matches the features."
        ) from err


def single_sample_message(owner: str, batches: int) -> str:
    """Why ``batches`` training batches of one sample left a probe with batch statistics unchanged."""
    return (
        f"{owner}: skipped {batches} training batch(es) of a single sample: the probe normalises with batch statistics "
        "(BatchNorm/FeatureNorm), which one sample cannot give; the probe was left unchanged by them. HINT: "
        "DataLoader(..., drop_last=True) avoids such a last batch."
    )


def unlabelled_message(owner: str, ignore_index: int, unlabelled: int, skipped: int) -> str:
    """Why ``skipped`` batches were skipped, ``unlabelled`` of them because no target was labelled."""
    message = (
        f"{owner}: skipped {unlabelled} training batch(es) with no labelled sample (every target was the loss's "
        f"ignore_index={ignore_index}): there was nothing to learn from"
    )
    if skipped > unlabelled:
        rest = skipped - unlabelled
        message += f", and {rest} whose features, loss or gradients were not finite (check the main model)"
    return message + "; the probe was left unchanged by them."
