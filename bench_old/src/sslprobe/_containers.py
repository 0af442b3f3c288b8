"""Where probes live on a LightningModule: two ``nn.ModuleDict``s, kept out of the model's own ``state_dict``.

Probes ride on the user's module (so they move with it between devices), yet a checkpoint of the model must load
strictly into the same class built without any probe, and a resumed run may add, drop or rename probes. So the
module's ``state_dict`` leaves ``callbacks_modules``/``callbacks_metrics`` out, and its ``load_state_dict`` does not
count them missing; each probe's weights travel in its callback's own checkpoint state instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["CONTAINERS", "ensure_containers", "is_probe_key", "keep_probes_out_of_state_dict"]

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


def _drop_probe_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
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


def ensure_containers(module: nn.Module, owner: str) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """Return ``module.callbacks_modules`` and ``module.callbacks_metrics``, creating them on a plain module."""
    containers = []
    for attr in CONTAINERS:
        existing = getattr(module, attr, None)
        if existing is None:
            existing = nn.ModuleDict()
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
