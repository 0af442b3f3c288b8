"""What a CUDA graph capture may rebind, recorded before it and put back after; what a replay depends on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import Metric

from sslprobe._internals import metric_counters, metric_state_names, restore_metric_counters, tensor_tables
from sslprobe.optim.conditional_step import forget_plan

__all__ = ["Rollback", "host_settings", "module_tensors"]

_SCALARS = (bool, int, float, str, tuple, type(None))


def module_tensors(modules: Iterable[nn.Module]) -> list[Tensor]:
    """The parameters and buffers of ``modules``, each read from its own module's tables (no tree walks).

    Examples:
        >>> len(module_tensors([nn.Linear(2, 2), nn.BatchNorm1d(2)]))
        7
    """
    tensors: list[Any] = []
    for module in modules:
        parameters, buffers = tensor_tables(module)
        tensors += parameters.values()
        tensors += buffers.values()
    return [t for t in tensors if t is not None]


def host_settings(modules: Iterable[nn.Module]) -> tuple:
    """The public Python values of ``modules`` (sizes, eps, momentum, training): what a capture bakes in.

    Examples:
        >>> host_settings([nn.Linear(2, 3)])
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
        self, modules: Mapping[str, nn.Module], optimizer: Optimizer, metrics: Mapping[str, Metric], owner: Any = None
    ) -> None:
        # The owner's own tensors (a callback's running sums), by attribute.
        self._owner = owner
        self._owner_tensors = {} if owner is None else {k: v for k, v in vars(owner).items() if isinstance(v, Tensor)}
        self._modules = {
            name: (module, *map(dict, tensor_tables(module)), _public_values(module))
            for name, module in modules.items()
        }
        self._optimizer = optimizer
        self._state = {p: dict(state) for p, state in optimizer.state.items()}
        self._metrics = {
            name: (metric, metric_counters(metric), {k: getattr(metric, k) for k in metric_state_names(metric)})
            for name, metric in metrics.items()
        }

    def restore(self, keep: bool) -> list[str]:
        """Undo the update counts the capture recorded, and, unless ``keep``, everything it rebound.

        Returns the names of what it had rebound.
        """
        replaced: list[str] = []
        for name, (metric, counters, states) in self._metrics.items():
            restore_metric_counters(metric, counters)  # a replay records its own update
            if not keep:
                replaced += [f"metric {name}.{k}" for k, v in states.items() if getattr(metric, k) is not v]
                for key, value in states.items():
                    setattr(metric, key, value)
        if keep:
            return replaced
        for name, (module, parameters, buffers, values) in self._modules.items():
            for table, saved in zip(tensor_tables(module), (parameters, buffers)):
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
