"""The few collectives the probes need, on torch.distributed's default group, each a no-op on one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_cat",
    "all_reduce_mean_",
    "all_reduce_sum",
    "all_reduce_sum_",
    "broadcast_",
    "rank",
    "world_size",
]


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised).

    Examples:
        >>> world_size()
        1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group (0 when torch.distributed is not initialised).

    Examples:
        >>> rank()
        0
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat_(flat: Tensor, tensors: list[Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


@torch.no_grad()
def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """Sum ``tensors`` (same dtype and device) over all processes, in place, in one collective."""
    if world_size() == 1 or not tensors:
        return
    flat = _flat(tensors)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    _unflat_(flat, tensors)


@torch.no_grad()
def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sums of ``tensors`` (same dtype and device) over all processes, in one collective, as views of one buffer."""
    if world_size() == 1 or not tensors:
        return list(tensors)
    flat = _flat(tensors)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


@torch.no_grad()
def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Average floating ``tensors`` over all processes, in place, in one collective per dtype."""
    n = world_size()
    if n == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        if t.is_floating_point():
            by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        all_reduce_sum_(group)
        for t in group:
            t.div_(n)


@torch.no_grad()
def broadcast_(tensors: list[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s ``tensors`` to every process, in place."""
    if world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = _flat(group)
        dist.broadcast(flat, src=src)
        _unflat_(flat, group)


@torch.no_grad()
def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate every process's ``tensor`` along dim 0 (sizes may differ between processes), rank order."""
    n = world_size()
    if n == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])
