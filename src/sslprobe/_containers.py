"""CallbackModuleDict: where callbacks keep their modules beside the model, out of the model's own parameters."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from torch import nn

__all__ = ["CallbackModuleDict", "is_reserved_key"]


class CallbackModuleDict(nn.ModuleDict):
    """An ``nn.ModuleDict`` of modules that callbacks own beside the model: probes and their metrics.

    It is a submodule of the model, so its modules move, convert and change mode with it (``.to()``, ``.half()``,
    ``.train()``), are in its ``state_dict``, and are deep-copied and pickled with it. But they are not the model's
    parameters: the model's ``parameters()``, ``buffers()`` and ``modules()`` leave them out, so what works on those
    never touches a probe: the main optimizer, ``model.freeze()`` and ``model.requires_grad_(False)``, DDP's gradient
    reduction, and Lightning's ``StochasticWeightAveraging`` and ``EMAWeightAveraging`` (which average, swap and
    copy the model's parameters and buffers). Called on this dict or on one of its modules, ``parameters()`` lists
    theirs as usual.

    ``listed_in_parent = True`` lists them in the model's traversals again (DDP refuses to wrap a model without a
    trainable parameter, so a frozen model under DDP keeps its probes listed).

    Examples:
        >>> model = nn.Module()
        >>> model.backbone = nn.Linear(4, 2)
        >>> model.callbacks_modules = CallbackModuleDict({"linear": nn.Linear(2, 3)})
        >>> [name for name, _ in model.named_parameters()]
        ['backbone.weight', 'backbone.bias']
        >>> sorted(model.state_dict())
        ['backbone.bias', 'backbone.weight', 'callbacks_modules.linear.bias', 'callbacks_modules.linear.weight']
        >>> len(list(model.callbacks_modules.parameters()))
        2
    """

    listed_in_parent = False

    def named_modules(
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        # A parent's traversal (nn.Module.named_modules, behind parameters(), buffers() and modules()) passes its memo
        # down; a call on this dict itself starts without one.
        if memo is not None and not self.listed_in_parent:
            return
        yield from super().named_modules(memo, prefix, remove_duplicate)


@cache
def _attributes() -> frozenset[str]:
    return frozenset(dir(CallbackModuleDict()))


def is_reserved_key(key: str) -> bool:
    """True for a key an ``nn.ModuleDict`` cannot hold because it is one of its attributes (``"train"``, ``"eval"``).

    Examples:
        >>> is_reserved_key("eval"), is_reserved_key("keys"), is_reserved_key("linear"), is_reserved_key("test")
        (True, True, False, False)
    """
    return key in _attributes()
