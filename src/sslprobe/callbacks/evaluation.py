"""EvaluationCallback: the base of callbacks that keep rows during training and evaluate with them."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from sslprobe.callbacks._evaluation_hooks import EvaluationHooks
from sslprobe.callbacks.base import cached_state_key, is_bound
from sslprobe.layer import LayerReader

__all__ = ["EvaluationCallback"]


class EvaluationCallback(LayerReader, EvaluationHooks):
    """Base of callbacks that train nothing: they keep rows (or statistics of them) and evaluate at validation.

    :class:`~sslprobe.callbacks.OnlineKNN` keeps a bank of rows, :class:`~sslprobe.callbacks.RefitProbe` sums their
    statistics. This base holds their shared life; a subclass sets ``name``, ``_owner`` and ``_binds_at_setup`` in
    its ``__init__`` and writes what differs, as verb-named steps:

    - ``_bind(module)``: register its metrics in ``module.callbacks_metrics[name]`` (at construction, or at setup when
      built with ``module=None``);
    - ``_start_eval(trainer, pl_module, split)``: at the start of each validation and test (gather, fit);
    - ``_evaluate(pl_module, outputs, batch, split, loader)``: each evaluation batch (never in the sanity check);
    - ``_log(pl_module, split, skip)``: at the end of each validation and test (``skip`` in the sanity check).
    """

    name: str
    _owner: str
    _binds_at_setup: bool
    _warned: set[str]

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(self)

    def _bind(self, module: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _bind().")

    def _start_eval(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _start_eval().")

    def _evaluate(self, pl_module: pl.LightningModule, outputs: Any, batch: Any, split: str, loader: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _evaluate().")

    def _log(self, pl_module: pl.LightningModule, split: str, skip: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _log().")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Bind to the Trainer's module if not yet; start a new run (each warning is given once per run)."""
        if self._binds_at_setup and not is_bound(self.name, pl_module):
            self._bind(pl_module)
            self._attach_layer(pl_module)
        self._warned = set()

    @override
    def start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        """Prepare this validation or test (one collective at most)."""
        self._start_eval(trainer, pl_module, split)

    @override
    def evaluate_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, split: str, loader: int
    ) -> None:
        """Score the batch and update that loader's metrics (not in the sanity check, not in predict)."""
        if split != "predict" and not trainer.sanity_checking:
            self._evaluate(pl_module, outputs, batch, split, loader)

    @override
    def end_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        """Log ``eval/{name}_{metric}`` or ``test/...``, per loader when there are several (not in the sanity check)."""
        self._log(pl_module, split, skip=trainer.sanity_checking)
