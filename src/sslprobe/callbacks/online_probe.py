"""OnlineProbe: train a small model on detached features while the main model trains, and log its metrics."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import Tensor, nn
from typing_extensions import override

from sslprobe import _metrics
from sslprobe._batch import Locator, check_locator
from sslprobe._build import ModuleSpec, has_uninitialized_params
from sslprobe.callbacks import _probe_checks as checks
from sslprobe.callbacks import _probe_io as probe_io
from sslprobe.callbacks._evaluation_hooks import EvaluationHooks
from sslprobe.callbacks.base import TrainableCallback, check_name, ensure_containers
from sslprobe.layer import LayerReader
from sslprobe.optim.factories import OptimizerSpec, SchedulerSpec
from sslprobe.probes.feature_norm import freeze_norm_statistics

__all__ = ["OnlineProbe"]

warning_cache = WarningCache()
_HALF = (torch.bfloat16, torch.float16)


class OnlineProbe(LayerReader, EvaluationHooks, TrainableCallback):
    """Online probe: the standard linear-evaluation number, live, while the representation trains.

    After every training batch it takes the features (``input``) and labels (``target``) from the step's outputs
    or the batch, detaches the features, converts them to the probe's dtype, and trains the probe one step with
    its own optimizer, scheduler, accumulation and clipping (see :class:`TrainableCallback`). In validation, test
    and predict it runs the probe in eval mode. The main model never receives a gradient from it and trains
    bit-for-bit the same with or without it.

    Where things are:

    - the probe: ``module.callbacks_modules[name]``; its metrics: ``module.callbacks_metrics[name]``;
    - predictions: ``batch[f"{name}_preds"]`` (detached), or the step's outputs dict when the batch is no dict;
    - logs: ``train/{name}_loss`` (per step), ``train/{name}_{metric}`` (per epoch), ``eval/{name}_{metric}``
      (per validation), ``test/{name}_{metric}`` (in ``trainer.test``).

    Args:
        module: the LightningModule to probe (``sslprobe.Module``, or any whose steps return dicts).
        name: unique id on that module, used for storage and log names.
        input: where the features are: a key of the step's outputs dict, else of the batch dict (outputs first); a
            dotted path (``"views.0"``); an int index into a tuple/list batch; or ``(outputs, batch) -> Tensor``.
        target: where the labels are, in the same forms (batch first, then outputs), e.g. ``1`` for ``(x, y)``.
        probe: an ``nn.Module`` (lazy ones too), a callable returning one, or a Hydra-style config (``_target_``).
        loss_fn: the probe's loss, ``(preds, target) -> Tensor``; ``None`` is ``nn.CrossEntropyLoss()``.
        optimizer, scheduler, accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm: the probe's own
            training (default: LARS, the SSL probe standard, at a constant rate), as in :class:`TrainableCallback`.
        metrics: a ``torchmetrics.Metric``, a list/tuple of them, a dict name -> Metric, or
            ``{"train": ..., "val": ...}``; ``None`` tracks top-1 accuracy (``top1``) with cross-entropy, nothing
            with another loss.
        cuda_graph: on a GPU the whole training step (forward, loss, gradients, update, top-1 counts) is replayed
            from a CUDA graph after two eager steps, with the eager step's numbers (see :class:`TrainableCallback`).
        precision: ``None``: under ``"bf16-mixed"``/``"16-mixed"`` the forward and loss run under the Trainer's
            autocast, as in ``training_step``, with float32 weights, logits and update; ``"32"``: no autocast.

    Raises:
        ValueError: for bad values, or a name already used on ``module``.
        TypeError: for arguments of the wrong type.
        RuntimeError: at the first batch, for missing keys, mismatched feature sizes or invalid targets.

    Examples:
        >>> import torch
        >>> import lightning.pytorch as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from sslprobe import Module
        >>> from sslprobe.callbacks import OnlineProbe
        >>> def forward(self, batch, stage):
        ...     return {"embedding": self.backbone(batch[0])}
        >>> model = Module(forward=forward, backbone=torch.nn.Linear(8, 16))
        >>> probe = OnlineProbe(model, "linear", input="embedding", target=1, probe=torch.nn.Linear(16, 3))
        >>> data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,))), batch_size=8)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[probe], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, data, data)
        >>> sorted(k for k in trainer.callback_metrics if k.startswith(("train/", "eval/")))
        ['eval/linear_top1', 'train/linear_loss', 'train/linear_top1']
    """

    def __init__(
        self,
        module: pl.LightningModule | None = None,
        name: str | None = None,
        input: Locator | None = None,
        target: Locator | None = None,
        probe: ModuleSpec | None = None,
        loss_fn: Any = None,
        optimizer: OptimizerSpec = None,
        scheduler: SchedulerSpec = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        metrics: _metrics.MetricsSpec = None,
        cuda_graph: bool | None = None,
        precision: Literal["32", "32-true", "bf16-mixed", "16-mixed"] | None = None,
    ) -> None:
        name = check_name(name, type(self).__name__)
        owner = f"{type(self).__name__}(name={name!r})"
        input = check_locator(input, "input", owner)
        target = check_locator(target, "target", owner)
        checks.check_loss_fn(owner, loss_fn)
        if probe is None:
            raise TypeError(f"{owner}: probe is required, e.g. probe=LinearProbe(num_classes=10).")
        _metrics.normalize_metrics(metrics, owner)  # a bad form fails now, even when the module is bound at setup
        self.input = input
        self.target = target
        self.loss_fn = loss_fn
        self.metrics = metrics
        self._loss = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
        self._loss_device: torch.device | None = None
        self._checked: set[str] = set()  # stages whose first batch was checked
        self._in_step: dict[str, Any] = {}  # train metrics updated inside the step (a CUDA graph can hold them)
        self._after_step: list[Any] = []  # the other train metrics, updated after it
        self._single_sample_batches = 0  # skipped: a batch-statistics layer cannot train on one sample
        self._unlabelled: Tensor | None = None  # batches whose every target was ignore_index (a device count)
        self._warned: set[str] = set()
        super().__init__(
            module,
            name,
            probe,
            optimizer=optimizer,
            scheduler=scheduler,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            cuda_graph=cuda_graph,
            precision=precision,
        )

    @override
    def register_metrics(self, module: nn.Module) -> None:
        _, callbacks_metrics = ensure_containers(module, self._owner)
        callbacks_metrics[self.name] = self.build_metrics(module.callbacks_modules[self.name])
        self._attach_layer(module)

    def build_metrics(self, probe: nn.Module) -> nn.ModuleDict:
        """``callbacks_metrics[name]``: one ModuleDict of metrics per stage (top-1 by default with cross-entropy)."""
        loss = self._loss
        top1 = isinstance(loss, nn.CrossEntropyLoss)
        default = {"top1": _metrics.Top1Accuracy(ignore_index=loss.ignore_index)} if top1 else {}
        splits = _metrics.normalize_metrics(self.metrics, self._owner, default)
        return nn.ModuleDict({_metrics.STAGE_KEY[split]: nn.ModuleDict(m) for split, m in splits.items()})

    # ------------------------------------------------------------------ the training step

    @override
    def select_inputs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> tuple[Tensor, Tensor] | None:
        features = probe_io.read_features(self.input, outputs, batch, self._owner)
        target = probe_io.read_target(self.target, outputs, batch, self._owner, required=True)
        if features.shape[0] < 2 and probe_io.normalises_batches(self.trainable_module(pl_module)):
            self._single_sample_batches += 1  # the probe is left as it is; said at the epoch's end
            return None
        train = self._split_metrics(pl_module, "train")
        self._in_step = {k: m for k, m in train.items() if _metrics.capturable_metric(m)}
        self._after_step = [m for k, m in train.items() if k not in self._in_step]
        return features, target

    @override
    def compute_step(self, probe: nn.Module, features: Tensor, target: Tensor) -> tuple[Tensor, Any]:
        preds = self._forward(probe, features, "train")
        self._check_target(preds, target, "train")
        self._unlabelled = probe_io.count_unlabelled(self._unlabelled, self._loss, target)
        loss, extras = self.compute_probe_loss(preds, target)
        preds = preds.detach()
        for metric in self._in_step.values():
            metric.update(preds, target)
        return loss, (preds, extras)

    def compute_probe_loss(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Any]:
        """The loss of the probe's predictions, and anything of it that :meth:`finish_step` keeps (default: none)."""
        return self._loss_on(preds.device)(preds, target), None

    @override
    def finish_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        inputs: tuple[Tensor, ...],
        extras: Any,
        shared: bool,
    ) -> None:
        preds, _ = extras
        if shared:
            preds = preds.clone()  # the graph's output is overwritten by the next replay
        probe_io.store_predictions(self.name, self.head_predictions(preds), outputs, batch)
        for metric in self._after_step:
            metric.update(preds, inputs[1])

    @override
    def collect_step_state(self, pl_module: pl.LightningModule) -> tuple[dict, dict, list[Tensor]]:
        modules = {"loss": self._loss} if isinstance(self._loss, nn.Module) else {}
        return modules, self._in_step, [] if self._unlabelled is None else [self._unlabelled]

    def head_predictions(self, preds: Tensor) -> Tensor:
        """The predictions of one probe, ``(B, C)``, for the batch and the target checks (a sweep: its best head)."""
        return preds

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``train/{name}_{metric}`` for the epoch, then the base's scheduler and warnings."""
        self._log_metrics(pl_module, "train")
        super().on_train_epoch_end(trainer, pl_module)
        if self._single_sample_batches and "single" not in self._warned:
            self._warned.add("single")
            warning_cache.warn(checks.single_sample_message(self._owner, self._single_sample_batches))

    @override
    def skipped_message(self, skipped: int) -> str:
        unlabelled = 0 if self._unlabelled is None else int(self._unlabelled)
        if not unlabelled:
            return super().skipped_message(skipped)
        return checks.unlabelled_message(self._owner, self._loss.ignore_index, unlabelled, skipped)

    # ------------------------------------------------------------------ evaluation

    @override
    def start_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        """Average the probe's statistics across processes; fresh exact normalisation statistics for this split."""
        probe_io.begin_evaluation(self.trainable_module(pl_module))

    @override
    def evaluate_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, split: str, loader: int
    ) -> None:
        """Predict in eval mode; update that loader's metrics (not in the sanity check; test: when labelled)."""
        probe = self.trainable_module(pl_module)
        if probe.training:
            probe.eval()
        lazy = has_uninitialized_params(probe)
        if split != "predict" and not trainer.sanity_checking and lazy:
            warning_cache.warn(f"{self._owner}: {checks.UNTRAINED_LAZY}")
        features = probe_io.read_features(self.input, outputs, batch, self._owner)
        loader = 0 if split == "predict" else loader
        freeze_norm_statistics(probe, loader > 0)  # a second loader (a shifted domain): the first loader's statistics
        # Lightning evaluates under inference mode; parameters materialised there could never be trained.
        inference = not lazy and torch.is_inference_mode_enabled()
        with torch.inference_mode(inference), torch.no_grad(), self._private_rng(probe), self.autocast(features.device):
            preds = self._forward(probe, features.clone() if lazy else features, split)
        probe_io.store_predictions(self.name, self.head_predictions(preds), outputs, batch, both=split == "predict")
        if split == "predict":
            return
        target = probe_io.read_target(self.target, outputs, batch, self._owner, required=split == "val")
        if target is None:
            warning_cache.warn(checks.no_test_target_message(self._owner, self.target))
            return
        self._check_target(preds, target, split)
        if not trainer.sanity_checking:
            for metric in self._split_metrics(pl_module, split, loader).values():
                metric.update(preds, target)

    @override
    def end_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        """Log ``eval/{name}_{metric}`` (``test/...``) over the whole split, every process's rows included."""
        probe_io.end_evaluation(self.trainable_module(pl_module))
        self._log_metrics(pl_module, split, skip=trainer.sanity_checking)  # the sanity check's: reset, not logged

    def log_metrics(self, pl_module: pl.LightningModule, split: str, loader: int, suffix: str, values: dict) -> None:
        """Log the computed metrics of one loader of ``split`` (``{prefix}/{name}_{metric}{suffix}``)."""
        _metrics.log_split_values(pl_module, self.name, split, suffix, values)

    def _log_metrics(self, pl_module: pl.LightningModule, split: str, skip: bool = False) -> None:
        container, owner, log = pl_module.callbacks_metrics[self.name], self._owner, self.log_metrics
        _metrics.log_loader_metrics(pl_module, container, self.name, split, skip=skip, owner=owner, log=log)

    def _forward(self, probe: nn.Module, features: Tensor, stage: str) -> Tensor:
        x = probe_io.probe_input(probe, features)
        preds = probe(x) if stage in self._checked else checks.run_probe_checked(self._owner, self.input, probe, x)
        # Logits of an autocast forward are 16-bit: the loss, the metrics and the stored predictions read float32.
        return preds.float() if self._autocast is not None and preds.dtype in _HALF else preds

    def _check_target(self, preds: Tensor, target: Tensor, stage: str) -> None:
        if stage not in self._checked:
            self._checked.add(stage)
            preds = self.head_predictions(preds)
            checks.check_target(self._owner, self._loss, self.input, self.target, preds, target)

    def _loss_on(self, device: torch.device) -> Any:
        if self._loss_device != device and isinstance(self._loss, nn.Module):  # a loss with weights follows the probe
            self._loss = self._loss.to(device)
        self._loss_device = device
        return self._loss

    def _split_metrics(self, pl_module: pl.LightningModule, split: str, loader: int = 0) -> nn.ModuleDict:
        return _metrics.loader_metrics(pl_module.callbacks_metrics[self.name], split, loader)
