"""EvaluationHooks: Lightning's validation, test and predict hooks, routed to three steps written once."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["EvaluationHooks"]


class EvaluationHooks(Callback):
    """Routes Lightning's evaluation hooks to three verb-named steps that a callback writes once for every split.

    - :meth:`start_evaluation` at the start of each validation (``split="val"``) and test (``"test"``);
    - :meth:`evaluate_batch` at each validation, test and predict (``"predict"``) batch, with its loader's index;
    - :meth:`end_evaluation` at the end of each validation and test.

    Examples:
        >>> class CountBatches(EvaluationHooks):
        ...     def evaluate_batch(self, trainer, pl_module, outputs, batch, split, loader):
        ...         self.seen = getattr(self, "seen", 0) + 1
        >>> hooks = CountBatches()
        >>> hooks.on_test_batch_end(None, None, None, None, 0)
        >>> hooks.seen
        1
    """

    def start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        """Prepare a validation or test (default: nothing)."""

    def evaluate_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, split: str, loader: int
    ) -> None:
        """Evaluate one batch of loader ``loader`` (default: nothing)."""

    def end_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        """Finish a validation or test: log its numbers (default: nothing)."""

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a validation: :meth:`start_evaluation` with ``split="val"``."""
        self.start_evaluation(trainer, pl_module, "val")

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a test: :meth:`start_evaluation` with ``split="test"``."""
        self.start_evaluation(trainer, pl_module, "test")

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """One validation batch: :meth:`evaluate_batch` with ``split="val"`` and its loader."""
        self.evaluate_batch(trainer, pl_module, outputs, batch, "val", dataloader_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """One test batch: :meth:`evaluate_batch` with ``split="test"`` and its loader."""
        self.evaluate_batch(trainer, pl_module, outputs, batch, "test", dataloader_idx)

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """One predict batch: :meth:`evaluate_batch` with ``split="predict"``."""
        self.evaluate_batch(trainer, pl_module, outputs, batch, "predict", dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """End a validation: :meth:`end_evaluation` with ``split="val"``."""
        self.end_evaluation(trainer, pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """End a test: :meth:`end_evaluation` with ``split="test"``."""
        self.end_evaluation(trainer, pl_module, "test")
