"""StepGraph: a probe's training step captured once as a CUDA graph, then replayed for each batch of that shape."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sslprobe.optim.conditional_step import forget_plan

__all__ = ["Rollback", "StepGraph", "host_settings", "module_tensors"]

_SCALARS = (bool, int, float, str, tuple, type(None))


def module_tensors(modules: Iterable[nn.Module]) -> list[Tensor]:
    """The parameters and buffers of ``modules``, each read from its own module's tables (no tree walks).

    Examples:
        >>> len(module_tensors([torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)]))
        7
    """
    tensors: list[Any] = []
    for module in modules:
        tensors += module._parameters.values()
        tensors += module._buffers.values()
    return [t for t in tensors if t is not None]


def host_settings(modules: Iterable[nn.Module]) -> tuple:
    """The public Python values of ``modules`` (sizes, eps, momentum, training): what a capture bakes in.

    Examples:
        >>> host_settings([torch.nn.Linear(2, 3)])
        (('training', True), ('in_features', 2), ('out_features', 3))
    """
    return tuple(item for module in modules for item in _public_values(module).items())


class Rollback:
    """What a capture's Python may rebind, recorded before it: module tensors and values, optimizer state, metrics.

    A capture runs the body's Python once but none of its kernels, so a tensor the body creates and keeps (a
    buffer rebound as ``self.mean = 0.9 * self.mean + ...``, optimizer state made on first use) holds garbage;
    :meth:`restore` puts the recorded objects back.
    """

    def __init__(
        self, modules: Mapping[str, nn.Module], optimizer: Optimizer, metrics: Mapping[str, Any], owner: Any = None
    ) -> None:
        # The owner's own tensors (a callback's running sums), by attribute.
        self._owner = owner
        self._owner_tensors = {} if owner is None else {k: v for k, v in vars(owner).items() if isinstance(v, Tensor)}
        self._modules = {
            name: (module, dict(module._parameters), dict(module._buffers), _public_values(module))
            for name, module in modules.items()
        }
        self._optimizer = optimizer
        self._state = {p: dict(state) for p, state in optimizer.state.items()}
        self._metrics = {
            name: (metric, dict(vars(metric)), {k: getattr(metric, k) for k in metric._defaults})
            for name, metric in metrics.items()
        }

    def restore(self, keep: bool) -> list[str]:
        """Undo the update counts the capture recorded, and, unless ``keep``, everything it rebound.

        Returns the names of what it had rebound.
        """
        replaced: list[str] = []
        for name, (metric, attributes, states) in self._metrics.items():
            for key in ("_update_count", "_computed"):
                vars(metric)[key] = attributes[key]  # a replay records its own update
            if not keep:
                replaced += [f"metric {name}.{k}" for k, v in states.items() if getattr(metric, k) is not v]
                for key, value in states.items():
                    setattr(metric, key, value)
        if keep:
            return replaced
        for name, (module, parameters, buffers, values) in self._modules.items():
            for table, saved in ((module._parameters, parameters), (module._buffers, buffers)):
                replaced += [f"{name}.{k}" for k in table if k not in saved or table[k] is not saved[k]]
                table.clear()
                table.update(saved)
            changed = [k for k, v in _public_values(module).items() if values.get(k, v) != v or k not in values]
            replaced += [f"{name}.{k}" for k in changed]
            for key in changed:
                if key in values:
                    vars(module)[key] = values[key]
        if self._owner is not None:
            attributes = vars(self._owner)
            for key, value in list(attributes.items()):
                if isinstance(value, Tensor) and self._owner_tensors.get(key) is not value:
                    replaced.append(f"{type(self._owner).__name__}.{key}")
                    if key in self._owner_tensors:
                        attributes[key] = self._owner_tensors[key]
                    else:
                        del attributes[key]
            for key, value in self._owner_tensors.items():
                if key not in attributes:
                    attributes[key] = value
        state = self._optimizer.state
        for param in list(state):
            saved_state = self._state.get(param)
            if saved_state is None:
                del state[param]
                replaced.append("optimizer state")
            elif (
                any(state[param].get(k) is not v for k, v in saved_state.items())
                or state[param].keys() != saved_state.keys()
            ):
                state[param].clear()
                state[param].update(saved_state)
                replaced.append("optimizer state")
        forget_plan(self._optimizer)
        return list(dict.fromkeys(replaced))


def _public_values(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, _SCALARS)}


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
        static_x, static_y = self._inputs  # type: ignore[misc]  # set by capture; callers check `fits` first
        static_x.copy_(x.detach())  # features may require grad: the copy must not join the main model's graph
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
        if self._stream is None or self._stream.device != device:
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
        self._key = tuple(map(Tensor.data_ptr, self._held))
        self._settings = settings
        return outputs

    def drop(self) -> None:
        """Forget the graph and release what it kept alive."""
        self._graph = self._inputs = self._outputs = None
        self._held, self._key, self._settings = [], (), None
