"""Checks for optional dependencies, with the install line to run when one is missing."""

from __future__ import annotations

import importlib.util

__all__ = ["require"]

_EXTRA_OF = {
    "sklearn": ("scikit-learn", "demo"),
    "matplotlib": ("matplotlib", "plot"),
    "hydra": ("hydra-core", "hydra"),
}


def require(module: str, *, feature: str) -> None:
    """Raise ``ModuleNotFoundError`` naming ``feature``, the package and the pip line when ``module`` is absent.

    Args:
        module: the importable name (``"sklearn"``, ``"matplotlib"``, ``"hydra"``).
        feature: what needs it, for the message (``"sslprobe demo"``).

    Raises:
        ModuleNotFoundError: when the module cannot be imported.

    Examples:
        >>> require("math", feature="a doctest")
    """
    if importlib.util.find_spec(module) is not None:
        return
    package, extra = _EXTRA_OF.get(module, (module, None))
    line = f"pip install 'sslprobe[{extra}]'" if extra else f"pip install {package}"
    raise ModuleNotFoundError(
        f"{feature} needs the package {package!r}, which is not installed. Install it with: {line}"
    )
