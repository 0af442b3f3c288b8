"""Build a callback's trainable module from an instance, a factory or a Hydra-style config."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from sslprobe._imports import require
from sslprobe._rng import PrivateRNG

__all__ = ["ModuleSpec", "build_module", "class_name", "has_uninitialized_params", "is_config"]

#: A module, a zero-argument callable returning one, or a config with ``_target_``.
ModuleSpec = nn.Module | Callable[[], nn.Module] | Mapping[str, Any]


def is_config(spec: Any) -> bool:
    """True for a dict or OmegaConf ``DictConfig`` with a ``_target_`` key.

    Examples:
        >>> is_config({"_target_": "torch.nn.Linear"}), is_config({"a": 1})
        (True, False)
    """
    if isinstance(spec, Mapping):
        return "_target_" in spec
    return type(spec).__name__ == "DictConfig" and "_target_" in spec


def has_uninitialized_params(module: nn.Module) -> bool:
    """True while a lazy module (``nn.LazyLinear``, ...) inside ``module`` waits for its first input.

    Examples:
        >>> has_uninitialized_params(nn.LazyLinear(3)), has_uninitialized_params(nn.Linear(2, 3))
        (True, False)
    """
    return any(
        isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params() for m in module.modules()
    )


def build_module(spec: ModuleSpec, rng: PrivateRNG, owner: str) -> nn.Module:
    """Return ``spec`` if it is a module, else build it inside ``rng`` so the global RNG does not move.

    Args:
        spec: an ``nn.Module``, a callable with no arguments returning one, or a Hydra-style config.
        rng: the private stream the build draws from.
        owner: names the caller in error messages.

    Raises:
        TypeError: when ``spec`` is none of these or does not produce an ``nn.Module``.
        ModuleNotFoundError: for a config when Hydra is not installed.

    Examples:
        >>> import functools
        >>> build_module(functools.partial(nn.Linear, 4, 2), PrivateRNG(), "probe").out_features
        2
    """
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        required = _required_arguments(spec)
        if required:
            # A class is a callable, but one that needs arguments is a module the user meant to build.
            example = ", ".join(f"{name}=..." for name in required)
            name = class_name(spec)
            raise TypeError(
                f"{owner}: probe is the class {name}, not a module, and it needs arguments ({', '.join(required)}). "
                f"Pass an instance, e.g. probe={name}({example}), or a factory, e.g. "
                f"probe=functools.partial({name}, {example})."
            )
    if is_config(spec):
        require("hydra", feature=f"{owner}: a probe given as a config with '_target_'")
        from hydra.utils import instantiate

        with rng:
            built = instantiate(spec)
    elif callable(spec):
        with rng:
            built = spec()
    else:
        raise TypeError(
            f"{owner}: probe must be an nn.Module, a callable returning one (e.g. functools.partial(nn.Linear, 512, "
            f"10)), or a config dict with '_target_', got {type(spec).__name__}."
        )
    if not isinstance(built, nn.Module):
        raise TypeError(f"{owner}: the probe factory returned {type(built).__name__}, expected an nn.Module.")
    return built


def class_name(cls: type) -> str:
    """How a user writes ``cls``: ``nn.Linear`` for a class of ``torch.nn``, else its name.

    Examples:
        >>> class_name(nn.CrossEntropyLoss), class_name(PrivateRNG)
        ('nn.CrossEntropyLoss', 'PrivateRNG')
    """
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn.") else cls.__name__


def _required_arguments(cls: type) -> list[str]:
    """The arguments ``cls(...)`` cannot do without (those without a default)."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty]
