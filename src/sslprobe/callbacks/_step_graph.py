"""StepGraph: a probe's training step captured once as a CUDA graph, then replayed for each batch of that shape."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepGraph"]


class StepGraph:
    """Replays ``body(x, y)`` from a CUDA graph, on inputs copied into the buffers the capture read.

    A probe's training step is a few dozen small kernels. Where the main step is short, launching them costs the
    host more time than the GPU spends running them; captured once, the whole step is a single launch. A replay
    repeats the capture's kernels on the same memory, so:

    - the inputs are copied into static buffers: a batch of another shape or dtype does not :meth:`fits` and is
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
        self._inputs: tuple[Tensor, Tensor] | None = None
        self._outputs: Any = None
        self._held: list[Tensor] = []
        self._key: tuple[int, ...] = ()
        self._settings: Any = None
        self._stream: Any = None

    @property
    def captured(self) -> bool:
        """Whether a graph is ready to replay."""
        return self._graph is not None

    def fits(self, x: Tensor, y: Tensor) -> bool:
        """Whether ``(x, y)`` can be copied into the captured inputs (same shapes, devices and target dtype)."""
        if self._inputs is None:
            return False
        static_x, static_y = self._inputs
        return (
            x.shape == static_x.shape
            and y.shape == static_y.shape
            and y.dtype == static_y.dtype
            and x.device == static_x.device
            and y.device == static_y.device
        )

    def current(self, held: Sequence[Tensor], settings: Any = None) -> bool:
        """Whether the graph computes the step for ``held`` and ``settings`` as they are now.

        ``held`` must be the very tensors (same memory) and ``settings`` the host values (learning rates) that the
        graph was captured with.
        """
        return settings == self._settings and tuple(map(Tensor.data_ptr, held)) == self._key

    def replay(self, x: Tensor, y: Tensor) -> Any:
        """Copy ``(x, y)`` into the static inputs (casting ``x``) and replay; returns the capture's outputs."""
        static_x, static_y = self._inputs  # type: ignore[misc]
        static_x.copy_(x)
        static_y.copy_(y)
        self._graph.replay()
        return self._outputs

    def capture(
        self,
        body: Callable[[Tensor, Tensor], Any],
        x: Tensor,
        y: Tensor,
        dtype: torch.dtype,
        held: Sequence[Tensor],
        settings: Any = None,
    ) -> Any:
        """Capture ``body`` on static copies of ``(x, y)`` (``x`` cast to ``dtype``), keeping ``held`` alive.

        ``settings`` are the host values the body bakes into its kernels (compared by :meth:`current`).

        Nothing runs: :meth:`replay` does. Raises what the capture raised (an operation that a CUDA graph cannot
        hold, such as a host sync), with the graph dropped.
        """
        self.drop()
        device = x.device
        static_x = x.detach().to(dtype=dtype, copy=True)
        static_y = y.detach().clone()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        self._stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": other threads (a DataLoader's pinning thread) may keep calling CUDA during the capture.
        with torch.cuda.stream(self._stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = body(static_x, static_y)
            except BaseException:
                with contextlib.suppress(RuntimeError):  # the capture was invalidated by the error re-raised below
                    graph.capture_end()
                raise
            graph.capture_end()
        current.wait_stream(self._stream)
        self._graph, self._inputs, self._outputs = graph, (static_x, static_y), outputs
        self._held = list(held)
        self._key = tuple(t.data_ptr() for t in self._held)
        self._settings = settings
        return outputs

    def drop(self) -> None:
        """Forget the graph and release what it kept alive."""
        self._graph = self._inputs = self._outputs = None
        self._held, self._key, self._settings = [], (), None
