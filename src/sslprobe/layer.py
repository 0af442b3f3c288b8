"""Layer: the output of any submodule, by name, as a probe's input (captured by a forward hook, no extra pass)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["Layer", "LayerReader", "clear_layers"]

Pool = str | Callable[[Tensor], Tensor] | None
_ALLOWED_POOLS = ("auto", "avg", "cls", "mean", None)
# Name prefixes that wrappers put in front of the user's module names (DDP, FSDP, torch.compile, checkpointing).
_WRAPPER_PREFIXES = (
    "module.",
    "_forward_module.",
    "_orig_mod.",
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
)
_REGISTRY = "_sslprobe_layers"


class _Hooks:
    """The forward hooks of one probed module: one per submodule, shared by every Layer that reads it."""

    def __init__(self) -> None:
        self.readers: dict[str, dict[tuple[Any, int], Callable[[Tensor], Tensor]]] = {}  # path -> pools
        self.values: dict[tuple[str, Any, int], Tensor] = {}  # (path, pool, prefix) -> this step's pooled output
        self.seen: set[str] = set()  # paths that ran in this step (the first call is kept)

    def hook(self, path: str) -> Callable[..., None]:
        def keep_first(module: nn.Module, args: Any, output: Any) -> None:
            if path in self.seen:
                return  # a second call in the step (another view through the same backbone)
            self.seen.add(path)
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, Tensor):
                return
            out = out.detach()
            for (pool, prefix), fn in self.readers[path].items():
                self.values[(path, pool, prefix)] = fn(out)

        return keep_first

    def clear(self) -> None:
        self.values.clear()
        self.seen.clear()


class Layer:
    """The output of the submodule at ``path`` of the probed module, pooled, as ``input=`` of any sslprobe callback.

    A forward hook on that submodule, registered once when the callback is built (one per submodule, however many
    callbacks read it), keeps the first output of each step, detached and pooled, so probing N layers costs no
    extra forward pass and keeps no activation graph. ``pool``:

    - ``"auto"``: ``(B, D)`` as is, ``(B, C, H, W)`` averaged over space, ``(B, N, D)`` averaged over the tokens
      after ``prefix_tokens``;
    - ``"avg"``: the same average for maps and tokens; ``"cls"``: token 0; ``"mean"``: the mean of the tokens after
      ``prefix_tokens`` (a CLS token and registers left out);
    - ``None``: the raw output (tokens for ``AttentiveProbe``); a callable: ``pool(output) -> Tensor``.

    ``path`` is a dotted name in the module you give the callback (``"backbone.layer3"``); the prefixes that DDP,
    FSDP, ``torch.compile`` or activation checkpointing add are not needed. An unknown path is an error listing close
    matches.

    Examples:
        >>> import torch
        >>> from sslprobe import Module
        >>> from sslprobe.callbacks import OnlineProbe
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> model = Module(forward=lambda self, b, stage: {"out": self.net(b[0])}, net=net)
        >>> probe = OnlineProbe(model, "hidden", input=Layer("net.1"), target=1, probe=torch.nn.Linear(16, 3))
        >>> len(net[1]._forward_hooks)  # one hook, registered when the callback was built
        1
        >>> Layer("module.net.1").path  # a wrapper's prefix is not needed
        'net.1'
    """

    def __init__(self, path: str, pool: Pool = "auto", prefix_tokens: int = 0) -> None:
        if not isinstance(path, str) or not path:
            raise TypeError(f"Layer: path must be a dotted submodule name such as 'backbone.layer3', got {path!r}.")
        if not (pool in _ALLOWED_POOLS or callable(pool)):
            raise ValueError(f"Layer: pool must be one of {_ALLOWED_POOLS} or a callable, got {pool!r}.")
        if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
            raise ValueError(f"Layer: prefix_tokens must be an int >= 0, got {prefix_tokens!r}.")
        for prefix in _WRAPPER_PREFIXES:
            while path.startswith(prefix):
                path = path[len(prefix) :]
        self.path, self.pool, self.prefix_tokens = path, pool, prefix_tokens
        self._hooks: _Hooks | None = None

    def __repr__(self) -> str:
        return f"Layer({self.path!r}, pool={self.pool!r}, prefix_tokens={self.prefix_tokens})"

    def attach(self, module: nn.Module, owner: str) -> None:
        """Read the submodule at ``path`` of ``module``: its hook is registered now, once per submodule."""
        submodule = _resolve(module, self.path, owner)
        hooks = module.__dict__.get(_REGISTRY)
        if hooks is None:
            hooks = module.__dict__[_REGISTRY] = _Hooks()
        if self.path not in hooks.readers:
            hooks.readers[self.path] = {}
            submodule.register_forward_hook(hooks.hook(self.path))
        hooks.readers[self.path][(self.pool, self.prefix_tokens)] = self._pooled
        self._hooks = hooks

    def __call__(self, outputs: Any, batch: Any) -> Tensor:
        """This step's pooled output (the locator form ``(outputs, batch) -> Tensor``)."""
        hooks = self._hooks
        if hooks is None:
            raise RuntimeError(f"{self!r} is read before any callback attached it to a module.")
        value = hooks.values.get((self.path, self.pool, self.prefix_tokens))
        if value is None:
            raise RuntimeError(
                f"{self!r}: the submodule {self.path!r} did not run in this step. Probe a layer that the step's "
                "forward goes through."
            )
        return value

    def _pooled(self, out: Tensor) -> Tensor:
        pool, k = self.pool, self.prefix_tokens
        if pool is None:
            return out
        if callable(pool):
            return pool(out)
        if out.ndim == 2 or (pool == "auto" and out.ndim < 3):
            return out
        if pool == "cls":
            return out[:, 0]
        if out.ndim == 4 and pool in ("auto", "avg"):
            return out.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        if out.ndim == 3:
            return out[:, k:].mean(dim=1)  # (B, N, D) -> (B, D), prefix tokens left out
        return out.flatten(1)


def clear_layers(module: Any) -> None:
    """Forget the previous step's layer outputs of ``module`` (the callbacks call it at each batch's start)."""
    hooks = getattr(module, "__dict__", {}).get(_REGISTRY)
    if hooks is not None:
        hooks.clear()


def _resolve(module: nn.Module, path: str, owner: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in module.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(repr(n) for n in close)}." if close else ""
        raise ValueError(
            f"{owner}: {type(module).__name__} has no submodule {path!r}.{hint} Give a dotted name from "
            "model.named_modules()."
        ) from None


class LayerReader:
    """Mixin of the callbacks: attach a :class:`Layer` input when bound, and clear layer outputs at each batch's start.

    Every callback clears before the step's forward (all ``on_*_batch_start`` hooks run before it), so the outputs
    read after it are this step's, whichever callback reads them.
    """

    input: Any
    _owner: str

    def _attach_layer(self, module: nn.Module) -> None:
        if isinstance(self.input, Layer):
            self.input.attach(module, self._owner)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        clear_layers(pl_module)

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        clear_layers(pl_module)

    def on_test_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        clear_layers(pl_module)

    def on_predict_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        clear_layers(pl_module)
