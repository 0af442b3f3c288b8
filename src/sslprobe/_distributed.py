"""The few collectives the probes need, on torch.distributed's default group, each a no-op on one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_rows",
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


# The dtypes rows may have, numbered for all_gather_rows's header (a process without rows takes the others').
_ROW_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_MAX_ROW_DIMS = 6  # dims of one row that the header carries


@torch.no_grad()
def all_gather_rows(rows: Tensor) -> tuple[Tensor, list[int]]:
    """Every process's ``rows`` concatenated along dim 0 in rank order, and how many came from each process.

    Processes may hold different numbers of rows, and some none at all: a process with no rows may pass any empty
    tensor (``torch.zeros(0, device=...)``, without knowing the others' row shape or dtype) and takes those of the
    processes that have rows. Two collectives: a small header (count, row shape, dtype) first, then the rows padded
    to the longest. Every process must call it, and every process gets the same result. ``rows`` must be on the
    device of the process group's backend (the module's device).

    Args:
        rows: Tensor of shape (N, *S), N >= 0 (any shape when N == 0).

    Returns:
        ``(gathered, counts)``: Tensor of shape (sum(counts), *S) on ``rows``'s device, and the ``N`` of each process.

    Raises:
        ValueError: on every process, when two processes with rows disagree on ``S`` or the dtype.

    Examples:
        >>> import torch
        >>> gathered, counts = all_gather_rows(torch.ones(3, 2))
        >>> tuple(gathered.shape), counts
        ((3, 2), [3])
    """
    n = world_size()
    if n == 1:
        return rows, [rows.shape[0]]
    count = rows.shape[0]
    shape = tuple(rows.shape[1:]) if count else ()
    if len(shape) > _MAX_ROW_DIMS or rows.dtype not in _ROW_DTYPES:
        raise ValueError(
            f"all_gather_rows: rows of shape {tuple(rows.shape)} and dtype {rows.dtype} cannot be gathered: at most "
            f"{_MAX_ROW_DIMS} dims per row and a dtype among {', '.join(map(str, _ROW_DTYPES))}."
        )
    header = torch.tensor(
        [count, len(shape), _ROW_DTYPES.index(rows.dtype), *shape, *([0] * (_MAX_ROW_DIMS - len(shape)))],
        dtype=torch.long,
        device=rows.device,
    )
    headers = [torch.empty_like(header) for _ in range(n)]
    dist.all_gather(headers, header)
    table = torch.stack(headers).tolist()  # (n, 3 + _MAX_ROW_DIMS): the same on every process
    counts = [row[0] for row in table]
    kinds = {(row[2], tuple(row[3 : 3 + row[1]])) for row in table if row[0] > 0}
    if len(kinds) > 1:  # every process sees the same table, so every process raises: none waits in a collective
        got = ", ".join(f"rank {r}: {tuple(row[3 : 3 + row[1]])} {_ROW_DTYPES[row[2]]}" for r, row in enumerate(table))
        raise ValueError(f"all_gather_rows: the processes' rows differ in shape or dtype ({got}); they must agree.")
    if not kinds:  # no process has a row
        return rows, counts
    ((dtype_index, shape),) = kinds
    dtype = _ROW_DTYPES[dtype_index]
    longest = max(counts)
    padded = torch.zeros((longest, *shape), dtype=dtype, device=rows.device)
    if count:
        padded[:count] = rows
    gathered = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)]), counts
