"""OnlineKNN: a weighted kNN classifier over a bank of recent training features, evaluated on validation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import Tensor, nn
from typing_extensions import override

from sslprobe._batch import Locator, check_locator, features_of, target_of
from sslprobe._distributed import all_gather_cat, world_size
from sslprobe._metrics import STAGE_KEY, STAGE_PREFIX, MetricsSpec, Top1Accuracy, normalize_metrics, reset_metric
from sslprobe.callbacks.base import cached_state_key, check_name, check_name_free, ensure_containers
from sslprobe.probes.knn import knn_predict

__all__ = ["OnlineKNN"]

warning_cache = WarningCache()


class OnlineKNN(Callback):
    """Weighted kNN accuracy of the current representation, with no training at all.

    During training it keeps the most recent features and labels in a bounded bank (a ring buffer of
    ``queue_size`` rows on the module's device); at validation and test it classifies each batch by its ``k``
    nearest bank entries (cosine similarity, votes weighted ``exp(sim / temperature)``), computed in chunks so
    memory stays bounded. It logs ``eval/{name}_top1`` (and ``eval/{name}_{metric}`` for metrics given; the
    metrics receive the vote scores ``(B, C)``), ``test/{name}_...`` in ``trainer.test``.

    The bank holds at most one epoch of samples (the most recent ones), so with several epochs a sample is never
    its own neighbour's duplicate. Under DDP each process fills its own bank during training (no collective per
    step) and the banks are gathered once at the start of each evaluation, so every process votes over all
    processes' features.

    Args:
        module: the LightningModule to probe.
        name: unique id, used in log names.
        input: where the features are (as for :class:`OnlineProbe`).
        target: where the integer labels are.
        k: neighbours.
        temperature: vote temperature.
        queue_size: bank rows (over all processes).
        num_classes: number of classes; ``None`` infers it from the bank's labels at each evaluation.
        metrics: extra torchmetrics metrics on the vote scores.

    Raises:
        ValueError: for a non-positive ``k``, ``temperature`` or ``queue_size``, or a duplicate name.

    Examples:
        >>> import torch
        >>> from sslprobe import Module
        >>> model = Module(forward=lambda self, b, stage: {"h": self.net(b[0])}, net=torch.nn.Linear(4, 8))
        >>> knn = OnlineKNN(model, "knn", input="h", target=1, k=5)
        >>> knn.k, knn.queue_size
        (5, 65536)
    """

    def __init__(
        self,
        module: pl.LightningModule,
        name: str,
        input: Locator,
        target: Locator,
        k: int = 20,
        temperature: float = 0.07,
        queue_size: int = 65536,
        num_classes: int | None = None,
        metrics: MetricsSpec = None,
    ) -> None:
        name = check_name(name, type(self).__name__)
        owner = f"{type(self).__name__}(name={name!r})"
        input = check_locator(input, "input", owner)
        target = check_locator(target, "target", owner)
        for arg, value in (("k", k), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: {arg} must be a positive int, got {value!r}.")
        if not temperature > 0:
            raise ValueError(f"{owner}: temperature must be > 0, got {temperature!r}.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"{owner}: num_classes must be a positive int or None, got {num_classes!r}.")
        splits = normalize_metrics(metrics, owner)
        _, callbacks_metrics = ensure_containers(module, owner)
        check_name_free(name, module, owner)
        callbacks_metrics[name] = nn.ModuleDict(
            {STAGE_KEY[s]: nn.ModuleDict({"top1": Top1Accuracy(), **splits[s]}) for s in ("val", "test")}
        )
        self.name, self.input, self.target = name, input, target
        self.k, self.temperature, self.queue_size, self.num_classes = k, temperature, queue_size, num_classes
        self.metrics = metrics
        self._owner = owner
        self._features: Tensor | None = None  # (Q, D) ring buffer
        self._labels: Tensor | None = None  # (Q,)
        self._ptr = 0
        self._filled = 0
        self._seen_this_epoch = 0
        self._seen_last_epoch = 0
        self._eval_bank: tuple[Tensor, Tensor, int] | None = None

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(self)

    @property
    def bank_size(self) -> int:
        """Rows of this process's bank that an evaluation uses (at most one epoch of samples)."""
        per_epoch = self._seen_last_epoch or self._seen_this_epoch
        return min(self._filled, per_epoch) if per_epoch else self._filled

    # ------------------------------------------------------------------ filling the bank

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start counting this epoch's samples."""
        if self._seen_this_epoch:
            self._seen_last_epoch = self._seen_this_epoch
        self._seen_this_epoch = 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Push this batch's features and labels into the ring buffer (device copies, no sync)."""
        features, labels = self._locate(outputs, batch)
        assert labels is not None  # required in training
        self._push(features.detach().reshape(features.shape[0], -1), labels.detach().reshape(-1))

    def _push(self, features: Tensor, labels: Tensor) -> None:
        capacity = max(self.queue_size // world_size(), 1)
        if self._features is None or self._features.shape[1] != features.shape[1]:
            self._features = features.new_zeros((capacity, features.shape[1]), dtype=torch.float32)
            self._labels = labels.new_zeros((capacity,), dtype=torch.long)
            self._ptr = self._filled = 0
        assert self._labels is not None
        n = features.shape[0]
        if n >= capacity:
            features, labels, n = features[-capacity:], labels[-capacity:], capacity
        end = self._ptr + n
        first = min(end, capacity) - self._ptr
        self._features[self._ptr : self._ptr + first] = features[:first]
        self._labels[self._ptr : self._ptr + first] = labels[:first]
        if first < n:  # wrap around
            self._features[: n - first] = features[first:]
            self._labels[: n - first] = labels[first:]
        self._ptr = end % capacity
        self._filled = min(self._filled + n, capacity)
        self._seen_this_epoch += n

    def _recent(self) -> tuple[Tensor, Tensor]:
        assert self._features is not None and self._labels is not None
        size, capacity = self.bank_size, self._features.shape[0]
        idx = (torch.arange(self._ptr - size, self._ptr, device=self._features.device) % capacity).long()
        return self._features[idx], self._labels[idx]

    # ------------------------------------------------------------------ evaluation

    def _start_eval(self) -> None:
        if self._features is None:
            self._eval_bank = None
            return
        features, labels = self._recent()
        features, labels = all_gather_cat(features), all_gather_cat(labels)  # once per evaluation
        if self.num_classes is not None:
            num_classes = self.num_classes
        else:
            num_classes = int(labels.max()) + 1 if labels.numel() else 1  # one sync per evaluation
        self._eval_bank = (features, labels, num_classes)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather the banks of all processes (one collective per validation)."""
        self._start_eval()

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather the banks of all processes."""
        self._start_eval()

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
        """Classify the batch against the bank and update the eval metrics."""
        if not trainer.sanity_checking:
            self._evaluate(pl_module, outputs, batch, "val")

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
        """Classify the batch against the bank and update the test metrics."""
        self._evaluate(pl_module, outputs, batch, "test")

    def _evaluate(self, pl_module: pl.LightningModule, outputs: Any, batch: Any, split: str) -> None:
        if self._eval_bank is None:
            return  # nothing trained yet: an empty bank has no neighbours
        bank, bank_labels, num_classes = self._eval_bank
        features, labels = self._locate(outputs, batch, required=split == "val")
        if labels is None:
            warning_cache.warn(
                f"{self._owner}: the test batches hold no target {self.target!r}; kNN metrics are not logged."
            )
            return
        scores = knn_predict(
            features.detach().reshape(features.shape[0], -1).to(bank.device),
            bank,
            bank_labels,
            num_classes,
            k=self.k,
            temperature=self.temperature,
        )
        labels = labels.to(scores.device).reshape(-1)
        for metric in pl_module.callbacks_metrics[self.name][STAGE_KEY[split]].values():
            metric.update(scores, labels)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``eval/{name}_top1`` and the other metrics."""
        self._log(pl_module, "val", skip=trainer.sanity_checking)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``test/{name}_top1`` and the other metrics."""
        self._log(pl_module, "test", skip=False)

    def _log(self, pl_module: pl.LightningModule, split: str, skip: bool) -> None:
        self._eval_bank = None
        for key, metric in pl_module.callbacks_metrics[self.name][STAGE_KEY[split]].items():
            if metric.update_called and not skip:
                pl_module.log(
                    f"{STAGE_PREFIX[split]}/{self.name}_{key}",
                    metric.compute(),
                    on_step=False,
                    on_epoch=True,
                    prog_bar=split == "val",
                )
            reset_metric(metric)

    def _locate(self, outputs: Any, batch: Any, required: bool = True) -> tuple[Tensor, Tensor | None]:
        features = features_of(self.input, outputs, batch, self._owner)
        labels = target_of(self.target, outputs, batch, self._owner, required=required)
        if labels is not None and labels.is_floating_point():
            raise RuntimeError(f"{self._owner}: kNN needs integer class labels, got {labels.dtype}. Use .long().")
        return features, labels

    # ------------------------------------------------------------------ checkpoint

    @override
    def state_dict(self) -> dict[str, Any]:
        # The bank is refilled by training and can be large: only the counters are kept.
        return {"seen_this_epoch": self._seen_this_epoch, "seen_last_epoch": self._seen_last_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._seen_this_epoch = int(state_dict.get("seen_this_epoch", 0))
        self._seen_last_epoch = int(state_dict.get("seen_last_epoch", 0))
