"""Every private name of torch, torchmetrics and Lightning that sslprobe uses, each behind one function.

An upgrade may rename or change any of them; `tests/test_internals.py` checks each one against what it must do, so
that such a change fails there, loudly, and not as a wrong number somewhere else. Nothing else in sslprobe reads a
private name of these libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "batch_norm_types",
    "foreach_add",
    "foreach_add_",
    "foreach_copy_",
    "foreach_div",
    "foreach_mul",
    "foreach_mul_",
    "foreach_norm",
    "foreach_sub_",
    "fused_adam_kernel",
    "logs_this_step",
    "metric_counters",
    "metric_state_names",
    "non_finite_check_and_unscale_",
    "record_metric_update",
    "restore_metric_counters",
    "tensor_tables",
    "tensor_version",
    "update_loss_scale_",
]


# torch's multi-tensor ("foreach") kernels, which torch.optim is built on: one launch for a list of tensors. Each is
# looked up when called, so that a rename in torch fails the call (and tests/test_internals.py), not `import sslprobe`.
def foreach_add(tensors: list[Tensor], other: Any, **kwargs: Any) -> list[Tensor]:
    """``[t + o for t, o in ...]`` (``other``: a list, a scalar or a tensor) in one kernel."""
    return torch._foreach_add(tensors, other, **kwargs)


def foreach_add_(tensors: list[Tensor], other: Any, **kwargs: Any) -> None:
    """In place: ``t += o`` (``alpha=`` scales ``o``)."""
    torch._foreach_add_(tensors, other, **kwargs)


def foreach_copy_(tensors: list[Tensor], sources: list[Tensor]) -> None:
    """In place: ``t.copy_(s)``."""
    torch._foreach_copy_(tensors, sources)


def foreach_div(tensors: list[Tensor], other: Any) -> list[Tensor]:
    """``[t / o ...]``."""
    return torch._foreach_div(tensors, other)


def foreach_mul(tensors: list[Tensor], other: Any) -> list[Tensor]:
    """``[t * o ...]``."""
    return torch._foreach_mul(tensors, other)


def foreach_mul_(tensors: list[Tensor], other: Any) -> None:
    """In place: ``t *= o``."""
    torch._foreach_mul_(tensors, other)


def foreach_norm(tensors: list[Tensor], ord: float = 2) -> list[Tensor]:
    """The norm of each tensor (0-dim tensors, no host sync)."""
    return torch._foreach_norm(tensors, ord)


def foreach_sub_(tensors: list[Tensor], other: Any, **kwargs: Any) -> None:
    """In place: ``t -= o`` (``alpha=`` scales ``o``)."""
    torch._foreach_sub_(tensors, other, **kwargs)


def batch_norm_types() -> tuple[type, ...]:
    """The layers that normalise with batch statistics in training (BatchNorm, SyncBatchNorm, their lazy forms).

    Not InstanceNorm, which normalises each sample alone.
    """
    return (torch.nn.modules.batchnorm._BatchNorm,)


def fused_adam_kernel(decoupled: bool) -> Callable[..., Any]:
    """Torch's fused Adam (``decoupled=False``) or AdamW kernel, as ``torch.optim.Adam(fused=True)`` calls it."""
    return torch._fused_adamw_ if decoupled else torch._fused_adam_


def non_finite_check_and_unscale_(tensors: list[Tensor], found: Tensor, inv_scale: Tensor) -> None:
    """Multiply ``tensors`` by ``inv_scale`` in place and set ``found`` (0-dim float) to 1 where any is not finite.

    One multi-tensor kernel, as ``torch.amp.GradScaler.unscale_`` runs it; ``found`` is only ever set, never cleared.
    """
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, inv_scale)


def update_loss_scale_(scale: Tensor, growth_tracker: Tensor, found: Tensor, interval: int) -> None:
    """``GradScaler``'s loss-scale update on the device: halve on ``found``, double after ``interval`` clean steps."""
    torch._amp_update_scale_(scale, growth_tracker, found, 2.0, 0.5, interval)


def tensor_tables(module: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """``module``'s own parameters and buffers tables (not its children's), by name; ``None`` entries included.

    Read directly, not by walking the tree: a CUDA graph's validity check reads them at every replay.
    """
    return module._parameters, module._buffers


def tensor_version(tensor: Tensor) -> int:
    """The in-place version counter of ``tensor`` (its storage's): it moves at every in-place change."""
    return tensor._version


def metric_state_names(metric: Metric) -> list[str]:
    """The names of ``metric``'s states (those declared with ``add_state``), in declaration order."""
    return list(metric._defaults)


def record_metric_update(metric: Metric) -> None:
    """Record one update of ``metric`` that ran without its Python (a CUDA graph replay updated its states).

    torchmetrics' update wrapper counts updates (``update_called``, the "compute before update" warning) and drops
    the cached result; this does both, written past ``nn.Module.__setattr__`` (it runs at every replay).
    """
    attributes = vars(metric)
    attributes["_computed"] = None
    attributes["_update_count"] += 1


def metric_counters(metric: Metric) -> tuple[int, Any]:
    """``metric``'s update count and cached result, for :func:`restore_metric_counters`."""
    attributes = vars(metric)
    return attributes["_update_count"], attributes["_computed"]


def restore_metric_counters(metric: Metric, counters: tuple[int, Any]) -> None:
    """Put back what :func:`metric_counters` read (a capture ran ``update``'s Python once without a real update)."""
    attributes = vars(metric)
    attributes["_update_count"], attributes["_computed"] = counters


def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning's logger connector records this training step (its ``should_update_logs``).

    The same arithmetic as the connector's property, read from the loop directly: the property walks every loop to
    find the active one, which costs more than the rest of a probe's bookkeeping.
    """
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    every = trainer.log_every_n_steps
    if isinstance(stepped, int):
        return every > 0 and ((stepped + 1) % every == 0 or trainer.should_stop)
    connector = getattr(trainer, "_logger_connector", None)
    should = getattr(connector, "should_update_logs", None)
    if isinstance(should, bool):
        return should
    return every > 0 and (trainer.global_step + 1) % every == 0
