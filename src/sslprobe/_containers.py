"""Where probes live on a LightningModule: two ``CallbackModuleDict``s, beside the model but not part of it.

Probes ride on the user's module, so they move with it between devices and modes. But they are not the model:

- its ``parameters()``, ``buffers()`` and ``modules()`` leave them out (:class:`CallbackModuleDict`), so what works
  on those (the main optimizer, ``freeze()``, DDP's reduction, SWA and EMA) never touches a probe;
- its ``state_dict`` leaves them out and its ``load_state_dict`` does not miss them
  (:func:`keep_probes_out_of_state_dict`), so a checkpoint of the model loads strictly into the same class built
  without any probe, and a resumed run may add, drop or rename probes; each probe's weights travel in its callback's
  own checkpoint state instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

from torch import nn

__all__ = [
    "CONTAINERS",
    "WITH_PROBES",
    "CallbackModuleDict",
    "ensure_containers",
    "is_probe_key",
    "is_reserved_key",
    "keep_probes_out_of_state_dict",
]

#: The two attributes sslprobe adds to a probed module.
CONTAINERS = ("callbacks_modules", "callbacks_metrics")
_HOOKED = "_sslprobe_state_hooks"


def is_probe_key(key: str) -> bool:
    """Whether a ``state_dict`` key lies inside a probe container (at any depth: a wrapped module's too).

    Examples:
        >>> is_probe_key("callbacks_modules.linear.weight"), is_probe_key("module.callbacks_metrics.knn.x")
        (True, True)
        >>> is_probe_key("backbone.weight")
        False
    """
    return any(key.startswith(f"{c}.") or f".{c}." in key for c in CONTAINERS)


#: Set on a module (in a spawned worker, at the end of its run) whose next ``state_dict`` must carry its probes.
WITH_PROBES = "_sslprobe_state_with_probes"


def _drop_probe_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    if module.__dict__.get(WITH_PROBES):
        return  # a spawned worker hands its state back to the main process: the probes' weights go along
    for key in [k for k in state_dict if k.startswith(prefix) and is_probe_key(k[len(prefix) :])]:
        del state_dict[key]


def _forgive_missing_probes(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not is_probe_key(k)]


def keep_probes_out_of_state_dict(module: nn.Module) -> None:
    """Make ``module.state_dict()`` leave the probe containers out, and ``load_state_dict`` not miss them (once).

    A checkpoint of an older release, with the probes inside the model's state, still loads into probes.

    Examples:
        >>> import torch
        >>> model = torch.nn.Module()
        >>> model.net = torch.nn.Linear(2, 2)
        >>> modules, metrics = ensure_containers(model, "doc")
        >>> modules["probe"] = torch.nn.Linear(2, 3)
        >>> sorted(model.state_dict())
        ['net.bias', 'net.weight']
        >>> plain = torch.nn.Module()
        >>> plain.net = torch.nn.Linear(2, 2)
        >>> plain.load_state_dict(model.state_dict())  # strict, into the model without probes
        <All keys matched successfully>
        >>> model.load_state_dict(plain.state_dict())  # and back, the probes left as they are
        <All keys matched successfully>
    """
    if module.__dict__.get(_HOOKED):
        return
    module.register_state_dict_post_hook(_drop_probe_state)
    module.register_load_state_dict_post_hook(_forgive_missing_probes)
    module.__dict__[_HOOKED] = True


class CallbackModuleDict(nn.ModuleDict):
    """An ``nn.ModuleDict`` of modules that callbacks own beside the model: probes and their metrics.

    It is a submodule of the model, so its modules move, convert and change mode with it (``.to()``, ``.half()``,
    ``.train()``) and are deep-copied and pickled with it (and in a plain module's ``state_dict``; sslprobe's
    containers are left out of it by :func:`keep_probes_out_of_state_dict`). But they are not the model's
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


def ensure_containers(module: nn.Module, owner: str) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """Return ``module.callbacks_modules`` and ``module.callbacks_metrics``, creating them on a plain module."""
    containers = []
    for attr in CONTAINERS:
        existing = getattr(module, attr, None)
        if existing is None:
            existing = CallbackModuleDict()
            # The one write to a user's module: the two containers the SPEC puts probes and metrics in.
            setattr(module, attr, existing)
        elif not isinstance(existing, nn.ModuleDict):
            raise TypeError(
                f"{owner}: {type(module).__name__}.{attr} is a {type(existing).__name__}; sslprobe keeps probes "
                f"there and needs an nn.ModuleDict. Rename your attribute."
            )
        containers.append(existing)
    keep_probes_out_of_state_dict(module)
    return containers[0], containers[1]
