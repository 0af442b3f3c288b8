"""A probe's inputs read from a step and converted for it, its predictions written back, its evaluation state."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from sslprobe._batch import Locator, features_of, target_of
from sslprobe._build import has_uninitialized_params
from sslprobe._distributed import all_reduce_mean_, all_reduce_sum_, world_size
from sslprobe._internals import batch_norm_types
from sslprobe.probes.feature_norm import FeatureNorm, begin_norm_evaluation, end_norm_evaluation

__all__ = [
    "begin_evaluation",
    "count_unlabelled",
    "end_evaluation",
    "normalises_batches",
    "probe_input",
    "read_features",
    "read_target",
    "store_predictions",
]

# Integer labels that cross-entropy and the metrics cannot index with: converted to int64.
_NARROW_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.uint8)


def read_features(locator: Locator, outputs: Any, batch: Any, owner: str) -> Tensor:
    """The features at ``locator`` (outputs first, then the batch); a copy of inference-mode features.

    A frozen backbone run under ``torch.inference_mode()`` gives features that cannot be saved for the probe's
    backward; a copy made outside inference mode can (they are detached anyway).
    """
    features = features_of(locator, outputs, batch, owner)
    if features.is_inference() and not torch.is_inference_mode_enabled():
        features = features.clone()
    return features


def read_target(locator: Locator, outputs: Any, batch: Any, owner: str, *, required: bool) -> Tensor | None:
    """The labels at ``locator`` (batch first, then outputs); narrow integers as int64 (the index type)."""
    target = target_of(locator, outputs, batch, owner, required=required)
    if target is not None and target.dtype in _NARROW_INTEGERS:
        target = target.long()
    return target


def probe_input(probe: nn.Module, features: Tensor) -> Tensor:
    """Detached features on the probe's device and, when floating, in its dtype (statistics are kept in it).

    Under autocast the probe's matmuls then cast them down, as the training step's own layers do.
    """
    x = features.detach()
    reference = next(iter(probe.parameters()), None)
    reference = reference if reference is not None else next(iter(probe.buffers()), None)
    if reference is None:
        return x
    dtype = reference.dtype if x.is_floating_point() else x.dtype
    return x if x.dtype == dtype and x.device == reference.device else x.to(device=reference.device, dtype=dtype)


def store_predictions(name: str, preds: Tensor, outputs: Any, batch: Any, *, both: bool = False) -> None:
    """``batch[f"{name}_preds"]``, or the step's outputs dict when the batch is no dict (``both``: in each dict)."""
    key = f"{name}_preds"
    if isinstance(batch, MutableMapping):
        batch[key] = preds
    if isinstance(outputs, MutableMapping) and (both or not isinstance(batch, MutableMapping)):
        outputs[key] = preds


def count_unlabelled(counter: Tensor | None, loss: Any, target: Tensor) -> Tensor | None:
    """Add to a device counter a batch whose every target is cross-entropy's ``ignore_index`` (its loss is NaN)."""
    if not isinstance(loss, nn.CrossEntropyLoss) or target.is_floating_point():
        return counter
    if counter is None or counter.device != target.device:
        counter = torch.zeros((), dtype=torch.float32, device=target.device)
    return counter.add_((target != loss.ignore_index).any().logical_not())


def normalises_batches(probe: nn.Module) -> bool:
    """Whether ``probe`` normalises with batch statistics (BatchNorm, FeatureNorm): one sample cannot train it."""
    return any(isinstance(m, (*batch_norm_types(), FeatureNorm)) for m in probe.modules())


def begin_evaluation(probe: nn.Module) -> None:
    """Before a validation or test: the probe's statistics averaged across processes, fresh normalisation statistics.

    Every rank then evaluates the same probe (the training windows' sums keep sum / count exact).
    """
    if world_size() > 1 and not has_uninitialized_params(probe):  # (a lazy probe in the sanity check has none)
        all_reduce_mean_([b for b in probe.buffers() if b.is_floating_point()])
    begin_norm_evaluation(probe, all_reduce_sum_ if world_size() > 1 else None)


def end_evaluation(probe: nn.Module) -> None:
    """After it: back in training mode, as Lightning puts the model's own modules back after an evaluation.

    Lightning does not see the probe (not among the model's ``modules()``), which would otherwise stay in eval mode
    until its next training batch.
    """
    end_norm_evaluation(probe)
    probe.train()
