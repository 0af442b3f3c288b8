"""Find features and targets in a step's outputs and batch: keys, dotted paths, indices or callables."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch  # noqa: F401  # used by the doctests
from torch import Tensor

__all__ = [
    "MISSING",
    "Locator",
    "available_keys",
    "check_locator",
    "describe",
    "features_of",
    "locate",
    "lookup",
    "target_of",
]

#: Where a value is: a key (or dotted path ``"views.0"``), an index, or ``(outputs, batch) -> value``.
Locator = str | int | Callable[[Any, Any], Any]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def lookup(container: Any, key: str | int) -> Any:
    """Return ``container[key]``, following a dotted path through dicts and lists, or ``MISSING``.

    Examples:
        >>> lookup({"views": [1, 2]}, "views.1")
        2
        >>> lookup((3, 4), 1)
        4
        >>> lookup({"a": 1}, "b")
        MISSING
    """
    if container is None:
        return MISSING
    if isinstance(key, int) and not isinstance(key, bool):
        if (
            isinstance(container, Sequence)
            and not isinstance(container, str)
            and -len(container) <= key < len(container)
        ):
            return container[key]
        if isinstance(container, Mapping) and key in container:
            return container[key]
        return MISSING
    if isinstance(container, Mapping) and key in container:
        return container[key]
    if "." not in key:
        return MISSING
    value = container
    for part in key.split("."):
        step = int(part) if part.lstrip("-").isdigit() and not isinstance(value, Mapping) else part
        value = lookup(value, step)
        if value is MISSING:
            return MISSING
    return value


def locate(locator: Locator, sources: Sequence[Any], outputs: Any, batch: Any) -> Any:
    """Resolve ``locator`` in the first of ``sources`` that holds it, or call it with ``(outputs, batch)``.

    Returns ``MISSING`` when no source holds it.

    Examples:
        >>> locate("x", [{"y": 0}, {"x": 1}], None, None)
        1
        >>> locate(lambda out, b: b[0], [], None, (5, 6))
        5
    """
    if callable(locator):
        return locator(outputs, batch)
    for source in sources:
        value = lookup(source, locator)
        if value is not MISSING:
            return value
    return MISSING


def available_keys(container: Any) -> list[str]:
    """Keys one could pass for ``container``: dict keys (tensor-valued first), or indices of a tuple/list.

    Examples:
        >>> available_keys({"loss": 1, "emb": 2})
        ['loss', 'emb']
        >>> available_keys((1, 2))
        ['0', '1']
    """
    if isinstance(container, Mapping):
        return [str(k) for k in container]
    if isinstance(container, Sequence) and not isinstance(container, str):
        return [str(i) for i in range(len(container))]
    return []


def describe(container: Any) -> str:
    """A short description of what a step returned or what a batch is, for error messages.

    Examples:
        >>> describe({"a": 1})
        "'a'"
        >>> describe(None)
        'nothing'
    """
    keys = available_keys(container)
    if keys:
        if isinstance(container, Mapping):
            return ", ".join(repr(k) for k in keys)
        return f"indices {', '.join(keys)} of a {type(container).__name__}"
    if container is None:
        return "nothing"
    if isinstance(container, Tensor):
        return f"a single tensor of shape {tuple(container.shape)}"
    return f"a {type(container).__name__}"


def features_of(locator: Locator, outputs: Any, batch: Any, owner: str) -> Tensor:
    """The features ``locator`` names: step outputs first, then the batch; a clear error when absent.

    Examples:
        >>> features_of("h", {"h": torch.ones(1)}, {"x": 0}, "probe")
        tensor([1.])
    """
    value = locate(locator, [outputs, batch], outputs, batch)
    if value is MISSING:
        raise RuntimeError(
            f"{owner}: input key {locator!r} is in neither the step outputs ({describe(outputs)}) nor the batch "
            f"({describe(batch)}). Pass one of them as input=, or return the features from your step."
        )
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner}: input {locator!r} is a {type(value).__name__}, expected a Tensor.")
    if value.ndim == 0:
        raise TypeError(
            f"{owner}: input {locator!r} is a scalar (a 0-dim tensor, such as the loss), but a probe needs one row of "
            f"features per sample, (B, D). Pass the key of the features as input= (available: {describe(outputs)})."
        )
    return value


def target_of(locator: Locator, outputs: Any, batch: Any, owner: str, *, required: bool = True) -> Tensor | None:
    """The labels ``locator`` names: batch first, then step outputs; ``None`` or a clear error when absent.

    Examples:
        >>> target_of(1, None, (0, torch.tensor([2])), "probe")
        tensor([2])
        >>> target_of("y", None, {"x": 0}, "probe", required=False) is None
        True
    """
    value = locate(locator, [batch, outputs], outputs, batch)
    if value is MISSING or value is None:
        if not required:
            return None
        raise RuntimeError(
            f"{owner}: target key {locator!r} is in neither the batch ({describe(batch)}) nor the step outputs "
            f"({describe(outputs)}). Pass one of them as target=."
        )
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner}: target {locator!r} is a {type(value).__name__}, expected a Tensor.")
    return value


def check_locator(value: Any, arg: str, owner: str) -> Locator:
    """Check an ``input``/``target`` argument: a non-empty key, an int index, or a callable.

    Examples:
        >>> check_locator("views.0", "input", "probe")
        'views.0'
    """
    if isinstance(value, bool) or not (isinstance(value, (str, int)) or callable(value)):
        raise TypeError(
            f"{owner}: {arg} must be a key or dotted path (str), an index (int), or a callable (outputs, batch) -> "
            f"Tensor, got {type(value).__name__}."
        )
    if isinstance(value, str) and not value:
        raise ValueError(f"{owner}: {arg} must not be an empty string. Pass the key that holds the {arg}.")
    return value
