"""A private random stream, so that building or running a probe never moves the main model's RNG."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PrivateRNG", "needs_private_rng"]

_RANDOM_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def needs_private_rng(module: nn.Module) -> bool:
    """True when running ``module`` can draw random numbers: lazy parameters to initialise, or active dropout.

    Examples:
        >>> needs_private_rng(torch.nn.Linear(2, 2)), needs_private_rng(torch.nn.LazyLinear(2))
        (False, True)
    """
    for sub in module.modules():
        if isinstance(sub, nn.modules.lazy.LazyModuleMixin) and sub.has_uninitialized_params():
            return True
        if isinstance(sub, _RANDOM_LAYERS) and sub.p > 0 and sub.training:
            return True
        if isinstance(sub, nn.MultiheadAttention) and sub.dropout > 0 and sub.training:
            return True
        if isinstance(sub, nn.RReLU) and sub.training:
            return True
    return False


class PrivateRNG:
    """A context that swaps in its own CPU (and current CUDA device) generator state, and swaps it out after.

    Its stream starts as a copy of the global state at construction (reading a state consumes nothing) and then
    advances on its own, so the global stream is the same with or without the code run inside.

    Examples:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> rng = PrivateRNG()
        >>> with rng:
        ...     _ = torch.rand(3)
        >>> after = torch.rand(1)
        >>> _ = torch.manual_seed(0)
        >>> bool(torch.rand(1) == after)
        True
    """

    def __init__(self) -> None:
        self._cpu: Tensor = torch.get_rng_state()
        self._cuda: dict[int, Tensor] = {}
        self._saved: list[Any] = []

    def _cuda_device(self) -> int | None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.current_device()
        return None

    def __enter__(self) -> PrivateRNG:
        device = self._cuda_device()
        saved_cuda = torch.cuda.get_rng_state(device) if device is not None else None
        self._saved.append((torch.get_rng_state(), device, saved_cuda))
        torch.set_rng_state(self._cpu)
        if device is not None:
            torch.cuda.set_rng_state(self._cuda.get(device, saved_cuda), device)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        cpu, device, cuda = self._saved.pop()
        self._cpu = torch.get_rng_state()
        torch.set_rng_state(cpu)
        if device is not None:
            self._cuda[device] = torch.cuda.get_rng_state(device)
            torch.cuda.set_rng_state(cuda, device)

    def state_dict(self) -> dict[str, Any]:
        """The stream's state, plain tensors only."""
        return {"cpu": self._cpu.clone(), "cuda": {k: v.clone() for k, v in self._cuda.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`."""
        self._cpu = state["cpu"].clone()
        self._cuda = {int(k): v.clone() for k, v in state.get("cuda", {}).items()}
