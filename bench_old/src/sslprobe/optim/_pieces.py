"""Cut tensors into flat pieces so that torch's multi-tensor kernels spread a probe over the whole GPU."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

__all__ = ["PieceCache", "cut_alike", "is_cut"]

# torch's multi-tensor kernels (`torch._foreach_*`, fused Adam, the AMP non-finite check) give each block one
# chunk of 65536 elements of one tensor. A probe's weight of 2048 x 100 is four chunks, so four blocks run on a
# GPU of 132 SMs and the kernel takes ~10 us. Cut into 32 pieces, the same kernel runs 32 blocks and takes ~2 us.
# Each piece is a view, and making views costs host time (~1 us each): `PieceCache` makes those of long-lived
# tensors (parameters, optimizer state) once.
_CHUNK = 65536
_MIN_PIECE = 2048  # one pass of a 512-thread block, four elements per thread
_ALIGN = 64  # elements: keeps every piece 16-byte aligned, so the kernels' vectorised loads still apply
PIECES = 32


def _piece_length(numel: int, pieces: int) -> int | None:
    if numel < 2 * _MIN_PIECE:
        return None
    length = max(_MIN_PIECE, -(-numel // pieces))
    length = -(-length // _ALIGN) * _ALIGN
    return None if length >= _CHUNK else length


def is_cut(tensor: Tensor, pieces: int | None = None) -> bool:
    """Whether :func:`cut_alike` cuts a contiguous tensor of this size."""
    return _piece_length(tensor.numel(), PIECES if pieces is None else pieces) is not None


class PieceCache:
    """Flat piece views of tensors, made once per tensor (it holds each tensor it cut until :meth:`release`).

    Examples:
        >>> import torch
        >>> cache, w = PieceCache(), torch.zeros(100, 2048)
        >>> cache.views(w, 6400) is cache.views(w, 6400)
        True
    """

    _LIMIT = 256  # entries; more means tensors were replaced without `release` or `clear`: start afresh

    def __init__(self) -> None:
        self._views: dict[int, tuple[Tensor, int, int, tuple[Tensor, ...]]] = {}

    def views(self, tensor: Tensor, length: int, like: Tensor | None = None) -> tuple[Tensor, ...] | None:
        """``tensor`` flattened and split into pieces of ``length`` elements (the last one shorter).

        ``None`` where it cannot be cut so (not contiguous, or not of the shape of ``like``).
        """
        entry = self._views.get(id(tensor))
        # The same tensor object on the same memory: `param.data = ...` (a move, a cast) gives it new memory.
        if entry is not None and entry[0] is tensor and entry[1] == length and entry[2] == tensor.data_ptr():
            return entry[3]
        views = _split(tensor, length, like)
        if views is not None:
            if len(self._views) >= self._LIMIT:
                self._views.clear()
            self._views[id(tensor)] = (tensor, length, tensor.data_ptr(), views)
        return views

    def release(self, tensors: Iterable[Tensor]) -> None:
        """Forget short-lived tensors (a step's gradients), so that the cache does not keep them alive."""
        for tensor in tensors:
            self._views.pop(id(tensor), None)

    def clear(self) -> None:
        self._views.clear()


def cut_alike(
    lists: Sequence[Sequence[Tensor]], pieces: int | None = None, cache: PieceCache | None = None
) -> tuple[list[list[Tensor]], list[int]]:
    """Cut the i-th tensor of every list the same way into up to ``pieces`` (default ``PIECES``) flat views.

    ``lists`` holds tensors updated together element by element (parameters, gradients, moments), each list in
    the same order and the same shapes position by position. Tensors too small to gain, or not contiguous in all
    lists, stay whole. Element-wise kernels give bit-identical results on the pieces. Returns the lists of pieces
    and, per original position, how many pieces it became (to repeat a per-tensor value, such as a step count).

    Examples:
        >>> import torch
        >>> (params, grads), counts = cut_alike([[torch.zeros(100, 2048)], [torch.ones(100, 2048)]])
        >>> len(params), counts, params[0].shape
        (32, [32], torch.Size([6400]))
        >>> cut_alike([[torch.zeros(10)]])[1]
        [1]
    """
    pieces = PIECES if pieces is None else pieces
    out: list[list[Tensor]] = [[] for _ in lists]
    counts: list[int] = []
    for column in zip(*lists):
        first = column[0]
        length = _piece_length(first.numel(), pieces)
        cut = None
        if length is not None:
            # The checks (contiguous, same shape) run where views are made; a cached tensor was checked then.
            cut = [cache.views(t, length, first) if cache is not None else _split(t, length, first) for t in column]
            if any(views is None for views in cut):
                cut = None
        if cut is None:
            for target, tensor in zip(out, column):
                target.append(tensor)
            counts.append(1)
            continue
        for target, views in zip(out, cut):
            target.extend(views)
        counts.append(len(cut[0]))
    return out, counts


def _split(tensor: Tensor, length: int, like: Tensor | None) -> tuple[Tensor, ...] | None:
    if not tensor.is_contiguous() or (like is not None and tensor.shape != like.shape):
        return None
    return tensor.view(-1).split(length)
