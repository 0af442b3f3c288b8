"""Module: a LightningModule for dict batches, written as one ``forward(batch, stage) -> dict``."""

from __future__ import annotations

import argparse
import inspect
import io
import types
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from sslprobe._containers import CallbackModuleDict, keep_probes_out_of_state_dict
from sslprobe._run_length import run_length
from sslprobe.optim.factories import (
    OptimizerSpec,
    check_optimizer_spec,
    check_scheduler_spec,
    create_optimizer,
    create_scheduler,
    split_interval,
)

__all__ = ["Module"]

_STAGES = ("fit", "validate", "test", "predict")
_ALLOWED_INTERVALS = ("step", "epoch")
_RESERVED = ("callbacks_modules", "callbacks_metrics", "forward", "optim")


class Module(pl.LightningModule):
    """A LightningModule whose steps are one function: ``forward(self, batch, stage) -> dict``.

    ``stage`` is ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``. In ``"fit"`` the dict holds the main loss
    under ``"loss"``; other keys (``"embedding"``, ...) are what probes read. With ``optim=None`` the main model is
    not trained (a frozen backbone evaluated by probes alone): ``forward`` runs without gradients, and
    ``trainer.global_step`` still counts training batches, so ``max_steps`` ends the run. A ``"loss"`` returned then
    trains nothing, and the first one of each fit warns so.

    Probes and their metrics live in ``callbacks_modules`` and ``callbacks_metrics`` (two ``nn.ModuleDict``): moved
    with the module, but not among its ``parameters()``, ``buffers()`` and ``modules()`` (see
    :class:`~sslprobe._containers.CallbackModuleDict`), so the main optimizer, ``freeze()`` and weight averaging
    never touch them, and not in its ``state_dict`` (a checkpoint of the model loads into it built without probes;
    each probe's weights travel in its callback's checkpoint state).

    ``hparams`` are saved as Lightning's ``save_hyperparameters(hparams)`` saves them: in ``model.hparams``, sent to
    the logger, and in the checkpoint's ``hyper_parameters``, so ``Module.load_from_checkpoint(path, forward=...,
    backbone=...)`` builds the module with them again (give it what is not saved: ``forward`` and the modules).

    Args:
        forward: ``forward(self, batch, stage) -> dict``, bound to the instance; or define ``forward`` in a subclass.
        optim: the main optimizer, in any form a probe's ``optimizer`` takes (a name, ``{"type": ..., **kwargs}``,
            a partial or class), or ``{"optimizer": ..., "scheduler": ..., "interval": "step" | "epoch"}``;
            ``None`` for no main training.
        hparams: hyperparameters to save with the model: a dict (or another mapping, an ``argparse.Namespace``, or
            an OmegaConf ``DictConfig``, saved resolved as plain dicts and lists) of values a checkpoint can hold
            and reload (numbers, strings, bools, ``None``, tensors, lists and dicts of them).
        **modules: attributes; ``nn.Module`` values become registered submodules (``backbone=...``).

    Raises:
        TypeError: when there is no ``forward``, ``optim`` has an unknown form, or ``hparams`` is not a mapping of
            string keys to values a checkpoint can reload.
        ValueError: for a reserved or read-only attribute name or a bad interval.

    Examples:
        >>> import torch
        >>> def forward(self, batch, stage):
        ...     emb = self.backbone(batch["x"])
        ...     return {"embedding": emb, "loss": emb.pow(2).mean()}
        >>> model = Module(forward=forward, backbone=torch.nn.Linear(4, 2), optim={"type": "SGD", "lr": 0.1})
        >>> sorted(model(dict(x=torch.randn(3, 4)), "fit"))
        ['embedding', 'loss']
        >>> Module(forward=forward, backbone=torch.nn.Linear(4, 2), hparams={"lr": 0.1}).hparams
        "lr": 0.1
    """

    def __init__(
        self,
        forward: Callable[..., dict[str, Any]] | None = None,
        optim: OptimizerSpec | Mapping[str, Any] = None,
        hparams: Mapping[str, Any] | argparse.Namespace | None = None,
        **modules: Any,
    ) -> None:
        super().__init__()
        if forward is None and type(self).forward is Module.forward:
            raise TypeError(
                "Module: there is no forward. Pass forward=fn with fn(self, batch, stage) -> dict (to "
                "Module.load_from_checkpoint too: a checkpoint does not hold it), or subclass Module and define "
                "forward(self, batch, stage)."
            )
        if forward is not None and not callable(forward):
            raise TypeError(
                f"Module: forward must be callable (self, batch, stage) -> dict, got {type(forward).__name__}."
            )
        for key in modules:
            if key in _RESERVED:
                raise ValueError(f"Module: {key!r} is reserved; give that attribute another name.")
            attribute = inspect.getattr_static(type(self), key, None)
            if isinstance(attribute, property) and attribute.fset is None:
                raise ValueError(
                    f"Module: {key!r} is a read-only attribute of {type(self).__name__}; give that attribute another "
                    "name."
                )
        saved_hparams = _plain_hparams(hparams, arguments={"forward": forward, "optim": optim, **modules})
        self._optim_spec, self._scheduler_spec, self._interval = self._split_optim(optim)
        check_optimizer_spec(self._optim_spec, owner="Module")
        check_scheduler_spec(self._scheduler_spec, owner="Module")
        self._forward_fn = forward
        self.callbacks_modules = CallbackModuleDict()
        self.callbacks_metrics = CallbackModuleDict()
        keep_probes_out_of_state_dict(self)  # a checkpoint of the model loads into it built without probes
        for key, value in modules.items():
            setattr(self, key, value)
        self._step_anchor: Tensor | None = None
        self._untrained_warned = False
        if saved_hparams:
            _save_hparams(self, saved_hparams)

    @staticmethod
    def _split_optim(optim: Any) -> tuple[Any, Any, str]:
        if isinstance(optim, Mapping) and "optimizer" in optim:
            unknown = set(optim) - {"optimizer", "scheduler", "interval"}
            if unknown:
                raise ValueError(
                    f"Module: unknown optim keys {sorted(unknown)}; the full form is "
                    "{'optimizer': ..., 'scheduler': ..., 'interval': 'step' | 'epoch'}."
                )
            interval = optim.get("interval", "step")
            scheduler, inner = split_interval(optim.get("scheduler"), owner="Module")
            if isinstance(optim.get("scheduler"), Mapping) and "interval" in optim["scheduler"]:
                interval = inner
            if interval not in _ALLOWED_INTERVALS:
                raise ValueError(f"Module: interval must be one of {_ALLOWED_INTERVALS}, got {interval!r}.")
            return optim["optimizer"], scheduler, interval
        return optim, None, "step"

    @property
    def trains_main_model(self) -> bool:
        """Whether a main optimizer was given (``optim`` is not ``None``)."""
        return self._optim_spec is not None

    def forward(self, batch: Any, stage: str) -> dict[str, Any]:  # type: ignore[override]
        """Run the user's ``forward(self, batch, stage)``."""
        assert self._forward_fn is not None  # __init__ guarantees a forward, given or subclassed
        return self._forward_fn(self, batch, stage)

    def _run(self, batch: Any, stage: str) -> dict[str, Any]:
        out = self(batch, stage)
        if not isinstance(out, Mapping):
            raise TypeError(
                f"Module: forward must return a dict in stage {stage!r}, got {type(out).__name__}. Return e.g. "
                "{'embedding': h, 'loss': loss}."
            )
        return dict(out)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Run ``forward(batch, "fit")``; the dict's ``"loss"`` trains the main model when ``optim`` is set."""
        if not self.trains_main_model:
            with torch.no_grad():
                out = self._run(batch, "fit")
            if not self._untrained_warned and out.get("loss") is not None:
                self._warn_untrained()
            return self._untrained_loss(out)
        out = self._run(batch, "fit")
        if out.get("loss") is None:
            raise RuntimeError(
                "Module: forward returned no 'loss' in stage 'fit', but optim= was given. Return {'loss': ...}, or "
                "pass optim=None to evaluate a frozen model with probes only."
            )
        return out

    def _warn_untrained(self) -> None:
        self._untrained_warned = True
        if not self.main_parameters():
            return  # nothing an optimizer could train: a loss of a frozen model is only reported
        rank_zero_warn(
            "Module: forward returned a 'loss' in stage 'fit', but optim=None, so the main model is not trained (its "
            "parameters stay as they are; only probes train). To train it, give it an optimizer, e.g. "
            "Module(..., optim={'type': 'AdamW', 'lr': 1e-3}); to evaluate a frozen model with probes alone, return "
            "no 'loss' (or freeze its parameters).",
            category=UserWarning,
        )

    def _untrained_loss(self, out: dict[str, Any]) -> dict[str, Any]:
        # Lightning counts global_step in optimizer steps. Without a main optimizer, a zero-gradient step of a
        # private scalar keeps that count (and so max_steps) in training batches, under every precision plugin.
        assert self._step_anchor is not None
        loss = out.get("loss")
        value = loss.detach().float() if isinstance(loss, Tensor) and loss.numel() == 1 else 0.0
        out["loss"] = self._step_anchor * 0.0 + value
        return out

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Run ``forward(batch, "validate")``."""
        return self._run(batch, "validate")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Run ``forward(batch, "test")``."""
        return self._run(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Run ``forward(batch, "predict")``."""
        return self._run(batch, "predict")

    def main_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the main model: everything but ``callbacks_modules``/``callbacks_metrics``."""
        excluded = {id(p) for p in self.callbacks_modules.parameters()}
        excluded |= {id(p) for p in self.callbacks_metrics.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in excluded]

    def configure_optimizers(self) -> Any:
        """Build the main optimizer (and scheduler) over :meth:`main_parameters`."""
        if not self.trains_main_model:
            self._step_anchor = torch.zeros((), device=self.device, requires_grad=True)
            self._untrained_warned = False  # once per fit: this runs at the start of each
            return torch.optim.SGD([self._step_anchor], lr=0.0)
        optimizer = create_optimizer(self._optim_spec, self.main_parameters(), owner="Module")
        if self._scheduler_spec is None:
            return optimizer
        total = run_length(self.trainer, self._interval, every=self.trainer.accumulate_grad_batches)
        scheduler = create_scheduler(self._scheduler_spec, optimizer, total=total, owner="Module")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self._interval}}


def _plain_hparams(hparams: Any, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` as a plain dict of values a checkpoint can hold and reload; a clear error for anything else."""
    if hparams is None:
        return {}
    if type(hparams).__module__.startswith("omegaconf."):  # imported only when given one: an optional extra
        from omegaconf import OmegaConf

        # Plain containers: a checkpoint reloads them with torch.load(weights_only=True), and load_from_checkpoint
        # can merge its keyword arguments (functions, modules) into them, which a DictConfig refuses.
        hparams = OmegaConf.to_container(hparams, resolve=True)
    elif isinstance(hparams, argparse.Namespace):
        hparams = vars(hparams)
    if not isinstance(hparams, Mapping):
        raise TypeError(
            "Module: hparams must be a dict (or another mapping, an argparse.Namespace or an OmegaConf DictConfig), "
            f"got {type(hparams).__name__}. Pass e.g. hparams={{'lr': 1e-3, 'batch_size': 256}}."
        )
    for key in hparams:
        if not isinstance(key, str):
            raise TypeError(
                f"Module: hparams keys must be strings, got {key!r} ({type(key).__name__}). Use str keys, as "
                "save_hyperparameters and the loggers expect."
            )
    plain = {}
    for key, value in hparams.items():
        if _reloadable(value):
            plain[key] = value
            continue
        # load_from_checkpoint(path, **kwargs) merges its keyword arguments into the saved hyperparameters before it
        # hands them back as hparams= (Lightning's "kwargs override saved hyperparameters"): the function and the
        # modules it is given (forward=, backbone=, ...) are this call's arguments, not hyperparameters.
        if key in arguments and arguments[key] is value:
            continue
        raise TypeError(
            f"Module: hparams[{key!r}] (a {type(value).__name__}) is not a value a checkpoint can hold and reload "
            "(load_from_checkpoint reads checkpoints with torch.load, weights_only=True by default). Give "
            "hyperparameters as numbers, strings, bools, None, tensors, or lists and dicts of them (e.g. "
            f"str(path)); pass an object the model uses as an attribute instead: Module(..., {key}=value)."
        )
    return plain


def _reloadable(value: Any) -> bool:
    """Whether ``value`` survives a checkpoint: ``torch.save``, then ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:  # pickling and weights-only loading fail in many ways, with many types
        return False
    return True


def _save_hparams(module: pl.LightningModule, hparams: dict[str, Any]) -> None:
    """``module.save_hyperparameters(hparams)``, named for ``load_from_checkpoint`` to pass back as ``hparams=``.

    Lightning names a saved dict after the ``__init__`` argument that compares equal to it in the calling frames;
    ``load_from_checkpoint`` passes the dict back under that name, else spreads its keys as keyword arguments (which
    ``Module`` would make attributes). That search can pick another argument of equal value and fails on one whose
    ``==`` is element-wise (a NumPy array), so it gets a frame without callers, where it finds no argument to
    compare, and the name is set here: ``_hparams_name`` is the private attribute Lightning writes as the
    checkpoint's ``hparams_name`` (``tests/test_module.py`` checks both).
    """
    module.save_hyperparameters(hparams, frame=_frame_without_caller())
    module._hparams_name = "hparams"


def _frame_without_caller() -> types.FrameType:
    def idle() -> Any:
        yield

    frame = idle().gi_frame  # a generator not started yet has a frame and no caller
    assert frame is not None and frame.f_back is None
    return frame
