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

    - ``register_metrics(module)``: register its metrics in ``module.callbacks_metrics[name]`` (at construction, or at
      setup when built with ``module=None``);
    - ``prepare_evaluation(trainer, pl_module, split)``: at the start of each validation and test (gather, fit);
    - ``score_batch(pl_module, outputs, batch, split, loader)``: each evaluation batch (never in the sanity check);
    - ``log_evaluation(pl_module, split, skip)``: at the end of each validation and test (``skip`` in the sanity check).
    """

    name: str
    _owner: str
    _binds_at_setup: bool
    _warned: set[str]

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(self)

    def register_metrics(self, module: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement register_metrics().")

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement prepare_evaluation().")

    def score_batch(self, pl_module: pl.LightningModule, outputs: Any, batch: Any, split: str, loader: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement score_batch().")

    def log_evaluation(self, pl_module: pl.LightningModule, split: str, skip: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement log_evaluation().")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Bind to the Trainer's module if not yet; start a new run (each warning is given once per run)."""
        if self._binds_at_setup and not is_bound(self.name, pl_module):
            self.register_metrics(pl_module)
            self._attach_layer(pl_module)
        self._warned = set()

    @override
    def start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        """Prepare this validation or test (one collective at most)."""
        self.prepare_evaluation(trainer, pl_module, split)

    @override
    def evaluate_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, split: str, loader: int
    ) -> None:
        """Score the batch and update that loader's metrics (not in the sanity check, not in predict)."""
        if split != "predict" and not trainer.sanity_checking:
            self.score_batch(pl_module, outputs, batch, split, loader)

    @override
    def end_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        """Log ``eval/{name}_{metric}`` or ``test/...``, per loader when there are several (not in the sanity check)."""
        self.log_evaluation(pl_module, split, skip=trainer.sanity_checking)
