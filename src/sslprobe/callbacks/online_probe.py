"""OnlineProbe: train a small model on detached features while the main model trains, and log its metrics."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import Tensor, nn
from typing_extensions import override

from sslprobe._batch import Locator, check_locator, features_of, target_of
from sslprobe._build import ModuleSpec, class_name, has_uninitialized_params
from sslprobe._distributed import all_reduce_mean_, all_reduce_sum_, world_size
from sslprobe._metrics import (
    STAGE_KEY,
    STAGE_PREFIX,
    MetricsSpec,
    Top1Accuracy,
    capturable_metric,
    computed_loader_metrics,
    loader_metrics,
    normalize_metrics,
    reset_metric,
)
from sslprobe.callbacks._probe_checks import check_features, check_target
from sslprobe.callbacks.base import TrainableCallback, autocast_dtype, check_name, ensure_containers
from sslprobe.layer import LayerReader
from sslprobe.optim.factories import OptimizerSpec, SchedulerSpec
from sslprobe.probes.feature_norm import FeatureNorm

__all__ = ["OnlineProbe"]

warning_cache = WarningCache()

# Integer labels that cross-entropy and the metrics cannot index with: converted to int64.
_NARROW_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.uint8)


class OnlineProbe(LayerReader, TrainableCallback):
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
        module: the LightningModule to probe (``sslprobe.Module`` or any LightningModule whose steps return
            dicts).
        name: unique id on that module, used for storage and log names.
        input: where the features are: a key of the step's outputs dict, else of the batch dict (outputs first); a
            dotted path (``"views.0"``); an int index into a tuple/list batch; or ``(outputs, batch) -> Tensor``.
        target: where the labels are, in the same forms (batch first, then outputs), e.g. ``1`` for ``(x, y)``.
        probe: an ``nn.Module``, a callable returning one, or a Hydra-style config (``_target_``). Lazy modules
            are supported.
        loss_fn: the probe's loss, ``(preds, target) -> Tensor``; ``None`` is ``nn.CrossEntropyLoss()``.
        optimizer: ``None`` (LARS, the SSL probe standard), a name, ``{"type": ..., **kwargs}``, a partial or
            class, or an instance over this probe's parameters.
        scheduler: ``None`` (constant), a name, a dict (may add ``"interval"``), a partial or class, or an
            instance bound to this probe's optimizer.
        accumulate_grad_batches: step once every N training batches, on their mean gradient.
        gradient_clip_val: clip the probe's gradients to this value, or ``None``.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        metrics: a ``torchmetrics.Metric``, a list/tuple of them, a dict name -> Metric, or
            ``{"train": ..., "val": ...}``; ``None`` tracks top-1 accuracy (``top1``) with cross-entropy, nothing
            with another loss.
        cuda_graph: on a GPU, the probe's whole training step (forward, loss, gradients, update, top-1 counts)
            is captured as a CUDA graph after two eager steps and replayed, with the numbers of the eager step;
            ``None`` where the step allows it, ``True`` also for layers sslprobe does not know, ``False`` never
            (see :class:`TrainableCallback`).
        precision: ``None`` (default): under a mixed precision (``"bf16-mixed"``, ``"16-mixed"``) the probe's
            forward and loss run under the Trainer's autocast, as a probe written in ``training_step`` would, with
            float32 weights and update; ``"32"`` keeps them in float32 (see :class:`TrainableCallback`).

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
        metrics: MetricsSpec = None,
        cuda_graph: bool | None = None,
        precision: Literal["32", "bf16-mixed", "16-mixed"] | None = None,
    ) -> None:
        name = check_name(name, type(self).__name__)
        owner = f"{type(self).__name__}(name={name!r})"
        input = check_locator(input, "input", owner)
        target = check_locator(target, "target", owner)
        if isinstance(loss_fn, type):
            raise TypeError(
                f"{owner}: loss_fn is the class {class_name(loss_fn)}, not a loss: it would be called with (preds, "
                f"target) as its constructor arguments. Pass an instance, e.g. loss_fn={class_name(loss_fn)}()."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"{owner}: loss_fn must be callable (preds, target) -> Tensor, got {type(loss_fn).__name__}."
            )
        if probe is None:
            raise TypeError(f"{owner}: probe is required, e.g. probe=LinearProbe(num_classes=10).")
        normalize_metrics(metrics, owner)  # a bad form fails now, even when the module is bound at setup
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
    def _register(self, module: nn.Module) -> None:
        _, callbacks_metrics = ensure_containers(module, self._owner)
        callbacks_metrics[self.name] = self.build_metrics(module.callbacks_modules[self.name])
        self._attach_layer(module)

    def build_metrics(self, probe: nn.Module) -> nn.ModuleDict:
        """``callbacks_metrics[name]``: one ModuleDict of metrics per stage (top-1 by default with cross-entropy)."""
        loss = self._loss
        default = (
            {"top1": Top1Accuracy(ignore_index=loss.ignore_index)} if isinstance(loss, nn.CrossEntropyLoss) else {}
        )
        splits = normalize_metrics(self.metrics, self._owner, default)
        return nn.ModuleDict({STAGE_KEY[split]: nn.ModuleDict(m) for split, m in splits.items()})

    # ------------------------------------------------------------------ the training step

    @override
    def select_inputs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> tuple[Tensor, Tensor] | None:
        features = self._features(outputs, batch)
        target = self._target(outputs, batch, required=True)
        if features.shape[0] < 2 and self._normalises_batches(self.trainable_module(pl_module)):
            self._single_sample_batches += 1  # the probe is left as it is; said at the epoch's end
            return None
        train = self._split_metrics(pl_module, "train")
        self._in_step = {k: m for k, m in train.items() if capturable_metric(m)}
        self._after_step = [m for k, m in train.items() if k not in self._in_step]
        return features, target

    @override
    def compute_step(self, probe: nn.Module, features: Tensor, target: Tensor) -> tuple[Tensor, Any]:
        preds = self._forward(probe, features, "train")
        self._check_target(preds, target, "train")
        self._count_unlabelled(target)
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
        self._store_preds(preds, outputs, batch)
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
            warning_cache.warn(
                f"{self._owner}: skipped {self._single_sample_batches} training batch(es) of a single sample: the "
                "probe normalises with batch statistics (BatchNorm/FeatureNorm), which one sample cannot give; the "
                "probe was left unchanged by them. HINT: DataLoader(..., drop_last=True) avoids such a last batch."
            )

    @override
    def _skipped_message(self, skipped: int) -> str:
        unlabelled = 0 if self._unlabelled is None else int(self._unlabelled)
        if not unlabelled:
            return super()._skipped_message(skipped)
        rest = skipped - unlabelled
        message = (
            f"{self._owner}: skipped {unlabelled} training batch(es) with no labelled sample (every target was the "
            f"loss's ignore_index={self._loss.ignore_index}): there was nothing to learn from"
        )
        if rest > 0:
            message += f", and {rest} whose features, loss or gradients were not finite (check the main model)"
        return message + "; the probe was left unchanged by them."

    # ------------------------------------------------------------------ evaluation

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Average normalisation statistics across processes, and start a new evaluation of them."""
        self._start_evaluation(pl_module)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Average normalisation statistics across processes, and start a new evaluation of them."""
        self._start_evaluation(pl_module)

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
        """Predict, and update the eval metrics of this loader (not during the sanity check)."""
        self._evaluate(trainer, pl_module, outputs, batch, "val", dataloader_idx)

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
        """Predict, and update the test metrics of this loader when the batch has labels."""
        self._evaluate(trainer, pl_module, outputs, batch, "test", dataloader_idx)

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
        """Predict only: no target is needed."""
        self._evaluate(trainer, pl_module, outputs, batch, "predict")
        if isinstance(outputs, MutableMapping) and isinstance(batch, MutableMapping):
            outputs[f"{self.name}_preds"] = batch[f"{self.name}_preds"]

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``eval/{name}_{metric}`` over the whole validation set (all processes)."""
        self._end_evaluation(pl_module)
        if trainer.sanity_checking:
            for metric in self._split_metrics(pl_module, "val").values():
                reset_metric(metric)
            return
        self._log_metrics(pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``test/{name}_{metric}`` over the whole test set (all processes)."""
        self._end_evaluation(pl_module)
        self._log_metrics(pl_module, "test")

    def log_metrics(self, pl_module: pl.LightningModule, split: str, loader: int, suffix: str, values: dict) -> None:
        """Log the computed metrics of one loader of ``split`` (``{prefix}/{name}_{metric}{suffix}``)."""
        for key, value in values.items():
            pl_module.log(
                f"{STAGE_PREFIX[split]}/{self.name}_{key}{suffix}",
                value,
                on_step=False,
                on_epoch=True,
                sync_dist=False,
                prog_bar=split == "val",
                add_dataloader_idx=False,
            )

    # ------------------------------------------------------------------ internals

    def _log_metrics(self, pl_module: pl.LightningModule, split: str) -> None:
        container = pl_module.callbacks_metrics[self.name]
        for loader, suffix, values in computed_loader_metrics(
            pl_module, container, self.name, split, owner=self._owner
        ):
            self.log_metrics(pl_module, split, loader, suffix, values)

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, stage: str, loader: int = 0
    ) -> None:
        probe = self.trainable_module(pl_module)
        if probe.training:
            probe.eval()
        lazy = has_uninitialized_params(probe)
        if stage != "predict" and not trainer.sanity_checking and lazy:
            warning_cache.warn(
                f"{self._owner}: evaluating a lazy probe before any training batch; its numbers are those of an "
                "untrained probe."
            )
        features = self._features(outputs, batch)
        for norm in self._feature_norms(probe):
            norm.frozen_eval = loader > 0  # a second loader (a shifted domain): the first loader's statistics
        # Lightning evaluates under inference mode; parameters materialised there could never be trained.
        inference = not lazy and torch.is_inference_mode_enabled()
        self._autocast = autocast_dtype(trainer, self.precision)
        with torch.inference_mode(inference), torch.no_grad(), self._private_rng(probe), self.autocast(features.device):
            preds = self._forward(probe, features.clone() if lazy else features, stage)
        self._store_preds(preds, outputs, batch)
        if stage == "predict":
            return
        target = self._target(outputs, batch, required=stage == "val")
        if target is None:
            warning_cache.warn(
                f"{self._owner}: the test batches hold no target {self.target!r}; the probe only predicts and "
                "test metrics are not logged."
            )
            return
        self._check_target(preds, target, stage)
        if not trainer.sanity_checking:
            for metric in self._split_metrics(pl_module, stage, loader).values():
                metric.update(preds, target)

    def _features(self, outputs: Any, batch: Any) -> Tensor:
        features = features_of(self.input, outputs, batch, self._owner)
        if features.is_inference() and not torch.is_inference_mode_enabled():
            # A frozen backbone run under torch.inference_mode(): its features cannot be saved for the probe's
            # backward; a copy made here can (they are detached anyway).
            features = features.clone()
        return features

    def _target(self, outputs: Any, batch: Any, *, required: bool) -> Tensor | None:
        target = target_of(self.target, outputs, batch, self._owner, required=required)
        if target is not None and target.dtype in _NARROW_INTEGERS:
            target = target.long()  # cross-entropy and the metrics index with int64
        return target

    def _forward(self, probe: nn.Module, features: Tensor, stage: str) -> Tensor:
        x = features.detach()
        reference = next(iter(probe.parameters()), None)
        reference = reference if reference is not None else next(iter(probe.buffers()), None)
        if reference is not None:
            # The probe's dtype (its statistics are kept in it); under autocast its matmuls then cast them down.
            dtype = reference.dtype if x.is_floating_point() else x.dtype
            if x.dtype != dtype or x.device != reference.device:
                x = x.to(device=reference.device, dtype=dtype)
        if stage in self._checked:
            return probe(x)
        check_features(self._owner, self.input, x, probe)
        try:
            return probe(x)
        except RuntimeError as err:
            raise RuntimeError(
                f"{self._owner}: the probe failed on features {self.input!r} of shape {tuple(x.shape)} and dtype "
                f"{x.dtype}: {err}. Check that the probe's input size matches the features."
            ) from err

    def _check_target(self, preds: Tensor, target: Tensor, stage: str) -> None:
        if stage not in self._checked:
            self._checked.add(stage)
            check_target(self._owner, self._loss, self.input, self.target, self.head_predictions(preds), target)

    def _normalises_batches(self, probe: nn.Module) -> bool:
        """Whether ``probe`` normalises with batch statistics (BatchNorm, FeatureNorm): one sample cannot train it."""
        return any(isinstance(m, (nn.modules.batchnorm._NormBase, FeatureNorm)) for m in probe.modules())

    def _count_unlabelled(self, target: Tensor) -> None:
        """Count, on the device, a batch whose every target is the loss's ``ignore_index`` (its loss is NaN)."""
        if not isinstance(self._loss, nn.CrossEntropyLoss) or target.is_floating_point():
            return
        if self._unlabelled is None or self._unlabelled.device != target.device:
            self._unlabelled = torch.zeros((), dtype=torch.float32, device=target.device)
        self._unlabelled.add_((target != self._loss.ignore_index).any().logical_not())

    def _loss_on(self, device: torch.device) -> Any:
        if self._loss_device != device:
            # A loss with tensors of its own (class weights) follows the probe's device.
            if isinstance(self._loss, nn.Module):
                self._loss = self._loss.to(device)
            self._loss_device = device
        return self._loss

    def _store_preds(self, preds: Tensor, outputs: Any, batch: Any) -> None:
        preds = self.head_predictions(preds)
        key = f"{self.name}_preds"
        if isinstance(batch, MutableMapping):
            batch[key] = preds
        elif isinstance(outputs, MutableMapping):
            outputs[key] = preds

    def _split_metrics(self, pl_module: pl.LightningModule, split: str, loader: int = 0) -> nn.ModuleDict:
        return loader_metrics(pl_module.callbacks_metrics[self.name], split, loader)

    def _start_evaluation(self, pl_module: pl.LightningModule) -> None:
        probe = self.trainable_module(pl_module)
        if world_size() > 1 and not has_uninitialized_params(probe):  # (a lazy probe in the sanity check has none)
            # Every rank then evaluates the same probe (the training windows' sums keep sum / count exact).
            all_reduce_mean_([b for b in probe.buffers() if b.is_floating_point()])
        for norm in self._feature_norms(probe):
            norm._reduce = all_reduce_sum_ if world_size() > 1 else None  # evaluation rows of every rank
            norm.frozen_eval = False
            norm.start_evaluation()

    def _end_evaluation(self, pl_module: pl.LightningModule) -> None:
        # Outside an evaluation that every rank runs, a probe called on one rank alone must not wait for the others.
        probe = self.trainable_module(pl_module)
        for norm in self._feature_norms(probe):
            norm._reduce = None
            norm.frozen_eval = False
        # Back in training mode, as Lightning puts the model's own modules back after an evaluation: it does not see
        # the probe (not among the model's modules()), which would otherwise stay in eval mode until its next batch.
        probe.train()

    def _feature_norms(self, probe: nn.Module) -> list[FeatureNorm]:
        return [m for m in probe.modules() if isinstance(m, FeatureNorm)]
