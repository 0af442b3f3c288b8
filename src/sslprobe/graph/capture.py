"""StepGraph: a training step captured once as a CUDA graph, then replayed for each batch of the same shapes."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from sslprobe._internals import tensor_version

__all__ = ["StepGraph"]


class _Shared:
    """What every captured step on one GPU shares: the capture stream, the graphs' memory pool, the static inputs.

    A stream of its own per probe gives each capture its own cuBLAS workspace, and a pool of its own keeps each
    graph's intermediate tensors for good: together about 66 MiB per probe on ResNet-50 features, seven times the
    eager step. The steps replay one after the other on one stream, and each caller copies what it keeps of its
    outputs before the next replays, so they can share both. Probes reading the same features share their static
    copy too: it is filled once per step (see :meth:`fill`). The pool is forgotten when no graph uses it any more
    (CUDA frees it then, and a stale handle cannot be captured into).
    """

    def __init__(self) -> None:
        self.streams: dict[int, Any] = {}
        self.pools: dict[int, Any] = {}
        self.graphs: dict[int, int] = {}  # live graphs per GPU
        # (GPU, shape, dtype) -> [static buffer, weak reference to the tensor copied into it last, its version, users]
        self.inputs: dict[tuple[Any, ...], list[Any]] = {}

    def stream(self, index: int) -> Any:
        if index not in self.streams:
            self.streams[index] = torch.cuda.Stream(index)
        return self.streams[index]

    def pool(self, index: int) -> Any:
        if index not in self.pools:
            self.pools[index] = torch.cuda.graph_pool_handle()
        return self.pools[index]

    def add(self, index: int, count: int) -> None:
        self.graphs[index] = self.graphs.get(index, 0) + count
        if self.graphs[index] <= 0:
            self.graphs.pop(index)
            self.pools.pop(index, None)

    def static(self, index: int, x: Tensor) -> Tensor:
        """A static buffer shaped and typed as ``x`` (shared by every graph on this GPU that takes such an input)."""
        key = (index, tuple(x.shape), x.dtype)
        entry = self.inputs.get(key)
        if entry is None:
            entry = self.inputs[key] = [torch.empty_like(x, memory_format=torch.contiguous_format), None, -1, 0]
        entry[3] += 1
        return entry[0]

    def fill(self, static: Tensor, x: Tensor) -> None:
        """Copy ``x`` into ``static`` unless it is the very tensor copied there last, unchanged since."""
        entry = self.inputs[(_index(static.device), tuple(static.shape), static.dtype)]
        source = entry[1]() if entry[1] is not None else None
        version = tensor_version(x)
        if source is x and entry[2] == version:
            return  # another probe's replay of this step copied the same features
        static.copy_(x.detach())  # features may require grad: the copy must not join the main model's graph
        entry[1], entry[2] = weakref.ref(x), version

    def release(self, static: Tensor) -> None:
        key = (_index(static.device), tuple(static.shape), static.dtype)
        entry = self.inputs.get(key)
        if entry is not None and entry[0] is static:
            entry[3] -= 1
            if entry[3] <= 0:
                del self.inputs[key]


_SHARED = _Shared()


def _index(device: torch.device) -> int:
    """The CUDA device's index (-1 for another device: the static inputs' bookkeeping runs anywhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return -1
    return torch.cuda.current_device() if device.index is None else device.index


class StepGraph:
    """Replays ``body(*inputs)`` from a CUDA graph, on inputs copied into the buffers the capture read.

    A probe's training step is a few dozen small kernels. Where the main step is short, launching them costs the
    host more time than the GPU spends running them; captured once, the whole step is a single launch. A replay
    repeats the capture's kernels on the same memory, so:

    - the inputs are copied into static buffers: a batch of other shapes or dtypes does not :meth:`fits` and is
      run eagerly by the caller;
    - every other tensor the body reads or writes (``held``: parameters, optimizer state, metric states) must be
      changed in place. The graph keeps those tensors alive and is :meth:`current` only while the caller's
      tensors are still the same ones (a device move, a checkpoint load or a metric reset replaces them: capture
      again);
    - the outputs are the same tensors at every replay: copy what must outlive the next one;
    - Python side effects of ``body`` happen once, at capture: the caller repeats the host-side ones itself.

    Examples:
        >>> graph = StepGraph()
        >>> graph.captured
        False
    """

    def __init__(self) -> None:
        self._graph: Any = None
        self._inputs: tuple[Tensor, ...] = ()
        self._outputs: Any = None
        self._held: list[Tensor] = []
        self._key: tuple[int, ...] = ()
        self._settings: Any = None
        self._device: int | None = None  # the GPU whose shared pool the graph is in

    @property
    def captured(self) -> bool:
        """Whether a graph is ready to replay."""
        return self._graph is not None

    def fits(self, inputs: Sequence[Tensor]) -> bool:
        """Whether ``inputs`` can be copied into the captured ones (same shapes, dtypes and devices)."""
        return len(inputs) == len(self._inputs) and all(
            x.shape == s.shape and x.dtype == s.dtype and x.device == s.device for x, s in zip(inputs, self._inputs)
        )

    def current(self, held: Sequence[Tensor], settings: Any = None) -> bool:
        """Whether the graph computes the step for ``held`` and ``settings`` as they are now.

        ``held`` must be the very tensors (same memory) and ``settings`` the host values (learning rates) that the
        graph was captured with.
        """
        return settings == self._settings and tuple(map(Tensor.data_ptr, held)) == self._key

    def replay(self, inputs: Sequence[Tensor]) -> Any:
        """Copy ``inputs`` into the static ones and replay; returns the capture's outputs (the same tensors)."""
        for static, x in zip(self._inputs, inputs):
            _SHARED.fill(static, x)
        self._graph.replay()
        return self._outputs

    def capture(
        self, body: Callable[..., Any], inputs: Sequence[Tensor], held: Sequence[Tensor], settings: Any = None
    ) -> None:
        """Capture ``body`` on static copies of ``inputs``, keeping ``held`` alive.

        ``settings`` are the host values the body bakes into its kernels (compared by :meth:`current`). Nothing
        runs: :meth:`replay` does. Raises what the capture raised (an operation that a CUDA graph cannot hold,
        such as a host sync), with the graph dropped.
        """
        self.drop()
        device = inputs[0].device
        index = _index(device)
        statics = tuple(_SHARED.static(index, x) for x in inputs)
        for static, x in zip(statics, inputs):
            _SHARED.fill(static, x)
        stream = _SHARED.stream(index)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        _SHARED.add(index, 1)  # counted from the start: a failed capture gives it back below
        try:
            # "thread_local": other threads (a DataLoader's pinning thread) may keep calling CUDA meanwhile.
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=_SHARED.pool(index), capture_error_mode="thread_local")
                try:
                    outputs = body(*statics)
                except BaseException:
                    with contextlib.suppress(RuntimeError):  # the capture was invalidated by the error re-raised
                        graph.capture_end()
                    raise
                graph.capture_end()
        except BaseException:
            del graph
            _SHARED.add(index, -1)
            for static in statics:
                _SHARED.release(static)
            raise
        current.wait_stream(stream)
        self._device = index
        self._graph, self._inputs, self._outputs = graph, statics, outputs
        self._held = list(held)
        self._key = tuple(map(Tensor.data_ptr, self._held))
        self._settings = settings

    def drop(self) -> None:
        """Forget the graph and release what it kept alive."""
        had = self._graph is not None
        for static in self._inputs:
            _SHARED.release(static)
        self._graph, self._inputs, self._outputs = None, (), None
        self._held, self._key, self._settings = [], (), None
        if had and self._device is not None:
            _SHARED.add(self._device, -1)
        self._device = None
