"""OnlineProbe: train a small model on detached features while the main model trains, and log its metrics."""

from __future__ import annotations

import logging
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
    InPlaceReset,
    MetricsSpec,
    Top1Accuracy,
    capturable_metric,
    evaluated_loaders,
    loader_metrics,
    loader_suffix,
    mark_updated,
    metric_states,
    normalize_metrics,
    reset_metric,
)
from sslprobe._rng import needs_private_rng
from sslprobe.callbacks._step_graph import Rollback, StepGraph, host_settings, module_tensors
from sslprobe.callbacks.base import TrainableCallback, check_name, ensure_containers, restore_where_skipped
from sslprobe.layer import LayerReader
from sslprobe.optim.factories import OptimizerSpec, SchedulerSpec
from sslprobe.optim.stepper import Stepper
from sslprobe.probes.feature_norm import FeatureNorm

__all__ = ["OnlineProbe"]

log = logging.getLogger(__name__)
warning_cache = WarningCache()

# Eager training steps before the step is captured as a CUDA graph: the first creates the optimizer's state, the
# second runs on it as every later step will.
_GRAPH_WARMUP = 2
# Integer labels that cross-entropy and the metrics cannot index with: converted to int64.
_NARROW_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.uint8)
_POOL_HINT = (
    " HINT: pool the features to (B, D) first (mean over tokens or space, a CLS token, or sslprobe.Layer(path, "
    "pool='auto')), use a probe that flattens them (LinearProbe, MLPProbe), or use AttentiveProbe for tokens "
    "(B, N, D)."
)


def _known_module(module: nn.Module) -> bool:
    """A layer of torch.nn or of sslprobe: its forward reads no Python value that changes between steps."""
    return type(module).__module__.startswith(("torch.nn.", "sslprobe."))


def _first_param(module: nn.Module) -> Tensor | None:
    for p in module.parameters():
        return p
    for b in module.buffers():
        return b
    return None


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
        cuda_graph: on a GPU, capture the probe's whole training step (forward, loss, gradients, update, metric
            counts) as a CUDA graph after two eager steps and replay it: one launch instead of dozens, with the
            numbers of the eager step. ``None`` (default) does so where the step allows it: one process, no
            accumulation, no scheduler that moves the rate at every step (an epoch one is captured again at each
            change), a fused Adam(W) or LARS optimizer, no dropout, layers of ``torch.nn`` and sslprobe only.
            Batches of another shape run eagerly. ``True`` also captures other layers (their forward must read no
            Python value that changes and draw no random numbers) and warns where it cannot capture; ``False``
            never captures.

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
    ) -> None:
        name = check_name(name, type(self).__name__)
        owner = f"{type(self).__name__}(name={name!r})"
        if not (cuda_graph is None or isinstance(cuda_graph, bool)):
            raise TypeError(f"{owner}: cuda_graph must be None (when possible), True or False, got {cuda_graph!r}.")
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
        loss = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
        self.metrics = metrics
        self.input = input
        self.target = target
        self._loss = loss
        # Built now, so that a bad form fails at construction even when the module is bound at setup.
        self._unregistered_metrics: nn.ModuleDict | None = self._metric_modules(metrics, loss, owner)
        super().__init__(
            module,
            name,
            probe,
            optimizer=optimizer,
            scheduler=scheduler,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )
        self.input = input
        self.target = target
        self.loss_fn = loss_fn
        self._loss_device: torch.device | None = None
        self._checked: set[str] = set()
        self.cuda_graph = cuda_graph
        self._graph = StepGraph()
        self._graph_key: tuple[Any, ...] | None = None  # (probe, stepper, device) the answer below is for
        self._graph_blocker: str | None = None  # why this step cannot be captured, or None
        self._graph_found: Tensor | None = None
        self._graph_metrics: list[Any] = []  # train metrics updated inside the graph
        self._graph_failures = 0
        self._eager_steps = 0
        self._graphed_steps = 0
        self._single_sample_batches = 0  # skipped: a batch-statistics layer cannot train on one sample
        self._unlabelled: Tensor | None = None  # batches whose every target was ignore_index (a device count)
        self._batch_stat_layers: tuple[int, bool] | None = None  # (id of the probe, whether it has any)
        self._eval_warned: set[str] = set()

    @override
    def _register(self, module: nn.Module) -> None:
        metrics = self._unregistered_metrics
        self._unregistered_metrics = None
        if metrics is None:  # a second module: metrics of its own
            metrics = self._metric_modules(self.metrics, self._loss, self._owner)
        _, callbacks_metrics = ensure_containers(module, self._owner)
        callbacks_metrics[self.name] = metrics
        self._attach_layer(module)

    def _metric_modules(self, metrics: MetricsSpec, loss: Any, owner: str) -> nn.ModuleDict:
        """``callbacks_metrics[name]``: one ModuleDict of metrics per stage (top-1 by default with cross-entropy)."""
        default = (
            {"top1": Top1Accuracy(ignore_index=loss.ignore_index)} if isinstance(loss, nn.CrossEntropyLoss) else {}
        )
        splits = normalize_metrics(metrics, owner, default)
        return nn.ModuleDict({STAGE_KEY[split]: nn.ModuleDict(m) for split, m in splits.items()})

    # ------------------------------------------------------------------ the training loss

    @override
    def compute_loss(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> Tensor | None:
        probe = self.trainable_module(pl_module)
        features = self._features(outputs, batch)
        target = self._target(outputs, batch, required=True)
        if features.shape[0] < 2 and self._normalises_batches(probe):
            self._single_sample_batches += 1  # the probe is left as it is; said at the epoch's end
            return None
        preds = self._forward(probe, features, "train")
        self._check_target(preds, target, "train")
        self._count_unlabelled(target)
        loss, shown, extras = self._train_outputs(preds, target)
        self._record_step(extras)
        self._store_preds(shown, outputs, batch)
        for metric in self._split_metrics(pl_module, "train").values():
            metric.update(shown, target)
        return loss

    def _train_outputs(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Any]:
        """The device part of a training step after the forward.

        Returns the loss, the detached predictions that the metrics and the batch get, and anything
        :meth:`_record_step` keeps. It is replayed from a CUDA graph, so it must change state only in place.
        """
        return self._loss_on(preds.device)(preds, target), preds.detach(), None

    def _record_step(self, extras: Any) -> None:
        """The host part of a training step: keep ``extras`` of :meth:`_train_outputs`.

        It runs once per training step, after the forward; an eager step calls it before the optimizer step and a
        replayed one after, so it must not read the stepper.
        """

    def _graph_tensors(self) -> list[Tensor]:
        """Tensors of this callback that :meth:`_train_outputs` changes in place (held by a CUDA graph)."""
        return []

    # ------------------------------------------------------------------ the training step as a CUDA graph

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Train the probe one step on this batch: replayed from a CUDA graph where it can be, else eagerly."""
        if self.cuda_graph is False:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        probe = self.trainable_module(pl_module)
        if not probe.training:
            probe.train()
        stepper = self._stepper
        blocker = "the probe is still lazy" if stepper is None else self._graph_blocker_for(probe, stepper)
        features = target = None
        if blocker is None:
            features = self._features(outputs, batch)
            target = self._target(outputs, batch, required=True)
            blocker = self._input_blocker(stepper, features, target)
        graph = self._graph
        if blocker is not None or (graph.captured and not graph.fits(features, target)):
            # Another shape (the last, smaller batch) runs eagerly on the same tensors; the graph stays.
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if graph.captured and not graph.current(*self._graph_state(probe, stepper, self._graph_metrics)):
            # A move, a checkpoint load or a metric reset replaced tensors the graph writes to, or a learning rate
            # (an epoch scheduler, a user) or another host value changed: capture again.
            graph.drop()
        warming = self._eager_steps < _GRAPH_WARMUP
        if not graph.captured and (warming or not self._capture(pl_module, probe, stepper, features, target)):
            self._eager_steps += 1
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        loss, preds, extras = graph.replay(features, target)
        self._graphed_steps += 1
        stepper.end_step(self._graph_found)
        self._record_step(extras)
        preds = preds.clone()  # the graph's output is overwritten by the next replay
        self._store_preds(preds, outputs, batch)
        for metric in self._split_metrics(pl_module, "train").values():
            if any(metric is captured for captured in self._graph_metrics):
                mark_updated(metric)
            else:
                metric.update(preds, target)
        self._log_loss(trainer, pl_module, loss, shared=True)

    @property
    def graphed_steps(self) -> int:
        """Training steps replayed from a CUDA graph so far (see ``cuda_graph``); the others ran eagerly."""
        return self._graphed_steps

    def _graph_blocker_for(self, probe: nn.Module, stepper: Stepper) -> str | None:
        """Why this probe's step cannot be a CUDA graph (None: it can), decided once per probe, optimizer and device.

        A new optimizer (the probe's trainable parameters changed) or device starts afresh: two eager steps, and
        two tries at capturing.
        """
        key = (id(probe), id(stepper), stepper.params[0].device)
        if key != self._graph_key:
            self._graph_key = key
            self._graph.drop()
            self._eager_steps = self._graph_failures = 0
            self._set_blocker(self._graph_blocker_of(probe, stepper))
        return self._graph_blocker

    def _set_blocker(self, reason: str | None) -> None:
        self._graph_blocker = reason
        if reason is not None and self.cuda_graph:
            warning_cache.warn(f"{self._owner}: cuda_graph=True, but the training step runs eagerly: {reason}.")

    def _graph_blocker_of(self, probe: nn.Module, stepper: Stepper) -> str | None:
        device = stepper.params[0].device
        own = OnlineProbe
        if type(self).compute_loss is not own.compute_loss or type(self)._forward is not own._forward:
            return f"{type(self).__name__} overrides compute_loss or _forward, which a replay would not call"
        if not stepper.direct:
            return "it accumulates gradients or averages them across processes"
        if stepper.rate_moves_every_step:
            return (
                "a scheduler moves the learning rate at every step (a constant rate, or a scheduler with "
                "interval='epoch', lets the step be captured)"
            )
        if needs_private_rng(probe):
            return "the probe draws random numbers (dropout)"
        if self.cuda_graph is None:
            # Layers of torch.nn and sslprobe read no Python value that changes between steps; other code may (a
            # counter, a schedule, a random draw), and a replay would repeat the value it had at capture.
            unknown = sorted({type(m).__name__ for m in self._graph_modules(probe) if not _known_module(m)})
            if unknown or not isinstance(self._loss, nn.Module):
                what = ", ".join(unknown) if unknown else f"the loss {self._loss!r}"
                return (
                    f"it runs code sslprobe does not know ({what}). Pass cuda_graph=True to capture it anyway, if "
                    "its forward reads no Python value that changes between steps and draws no random numbers"
                )
        if any(t.device != device for t in [*probe.parameters(), *probe.buffers()]):
            return "the probe's tensors are on several devices"
        if device.type != "cuda":
            return f"the probe is on {device.type}, not on a CUDA device"
        return None

    def _input_blocker(self, stepper: Stepper, features: Tensor, target: Tensor) -> str | None:
        device = stepper.params[0].device
        if not features.is_floating_point() or features.device != device or target.device != device:
            return "the features are not floating point on the probe's device"
        return None

    def _graph_modules(self, probe: nn.Module) -> tuple[nn.Module, ...]:
        return (*probe.modules(), self._loss) if isinstance(self._loss, nn.Module) else tuple(probe.modules())

    def _graph_state(self, probe: nn.Module, stepper: Stepper, metrics: list[Any]) -> tuple[list[Tensor], tuple]:
        """What a replay depends on: the tensors and the host values it was captured with.

        The tensors are every one it reads or writes besides its inputs and outputs; the host values are the
        optimizer's hyperparameters and the layers' settings, which its kernels were given.
        """
        modules = self._graph_modules(probe)
        held = module_tensors(modules)
        held += stepper.tensors()
        held += self._buffers_of(probe)[1]
        held += self._graph_tensors()
        held += [t for t in (self._graph_found, self._unlabelled) if t is not None]
        for metric in metrics:
            held += metric_states(metric)
        return held, (stepper.settings(), host_settings(modules))

    def _capture(
        self, pl_module: pl.LightningModule, probe: nn.Module, stepper: Stepper, features: Tensor, target: Tensor
    ) -> bool:
        """Capture this probe's training step; False (with everything as it was) where it cannot be."""
        if self._graph_failures >= 2:
            return False
        if not stepper.capturable:
            # After the warm-up steps the optimizer's state exists, so this does not change by itself.
            hint = getattr(
                stepper.optimizer,
                "graph_hint",
                "use fused Adam/AdamW (the default for Adam/AdamW) or LARS without dampening",
            )
            self._set_blocker(
                f"its optimizer ({type(stepper.optimizer).__name__}) is not one a graph can replay: {hint}"
            )
            return False
        device = stepper.params[0].device
        if self._graph_found is None or self._graph_found.device != device:
            self._graph_found = torch.zeros((), dtype=torch.float32, device=device)
        found = self._graph_found
        # The first try updates the metrics inside the graph; if it fails, the second leaves them out.
        train_metrics = dict(self._split_metrics(pl_module, "train").items())
        captured = [m for m in train_metrics.values() if capturable_metric(m)] if self._graph_failures == 0 else []
        buffers, saved = self._buffers_of(probe)

        def body(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Any]:
            if buffers:
                torch._foreach_copy_(saved, buffers)
            self._count_unlabelled(y)
            with torch.enable_grad():
                loss, shown, extras = self._train_outputs(probe(x), y)
            for metric in captured:
                metric.update(shown, y)
            stepper.device_step(loss, found)
            if buffers:
                restore_where_skipped(buffers, saved, found)
            return loss.detach(), shown, extras

        # Capturing runs the body's Python once (its kernels are recorded, not run): what it rebinds is undone.
        modules = {f"probe {name}" if name else "probe": m for name, m in probe.named_modules()}
        if isinstance(self._loss, nn.Module):
            modules["loss"] = self._loss
        rollback = Rollback(
            modules, stepper.optimizer, {n: m for n, m in train_metrics.items() if m in captured}, owner=self
        )
        error: BaseException | None = None
        held, settings = self._graph_state(probe, stepper, captured)
        try:
            self._graph.capture(body, features, target, stepper.params[0].dtype, held, settings)
        except Exception as err:  # an operation a graph cannot hold, e.g. a host sync in a metric or a loss
            error = err
        if error is None and not self._graph.current(*self._graph_state(probe, stepper, captured)):
            error = RuntimeError("it rebinds state or changes Python values instead of updating tensors in place")
        replaced = rollback.restore(keep=error is None)
        if error is None:
            self._graph_metrics = captured
            log.debug("%s: captured the training step as a CUDA graph", self._owner)
            return True
        self._graph.drop()
        self._graph_failures += 1
        where = f" (it replaced {', '.join(replaced)})" if replaced else ""
        message = f"{self._owner}: capturing the training step as a CUDA graph failed: {error}{where}"
        if self._graph_failures < 2:
            log.debug("%s; trying once more, with the metrics updated outside the graph", message)
            return False
        message += (
            "; the step runs eagerly. HINT: update state in place (buffer.mul_(m).add_(x), not buffer = m * buffer "
            "+ x) and read no host value in the step, or pass cuda_graph=False to skip the attempt."
        )
        if self.cuda_graph:
            warning_cache.warn(message)
        else:
            log.info(message)
        return False

    # ------------------------------------------------------------------ evaluation hooks

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
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Release the CUDA graph and the tensors it keeps alive (the next fit warms up and captures afresh)."""
        self._graph.drop()
        self._graph_key = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Release the CUDA graph when a fit stops on an error, as at its end."""
        self.on_train_end(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``train/{name}_{metric}`` for the epoch, then the base's scheduler and warnings."""
        self._log_metrics(pl_module, "train")
        super().on_train_epoch_end(trainer, pl_module)
        if self._single_sample_batches and "single" not in self._eval_warned:
            self._eval_warned.add("single")
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

    # ------------------------------------------------------------------ internals

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, stage: str, loader: int = 0
    ) -> None:
        probe = self.trainable_module(pl_module)
        if probe.training:
            probe.eval()
        if stage != "predict" and not trainer.sanity_checking and has_uninitialized_params(probe):
            warning_cache.warn(
                f"{self._owner}: evaluating a lazy probe before any training batch; its numbers are those of an "
                "untrained probe."
            )
        features = self._features(outputs, batch)
        for norm in self._feature_norms(probe):
            # A second loader (a shifted domain) is normalised with the first loader's statistics.
            norm.frozen_eval = loader > 0
        if has_uninitialized_params(probe):
            # Lightning evaluates under inference mode; parameters materialised there could never be trained.
            with torch.inference_mode(False), torch.no_grad(), self._private_rng(probe):
                preds = self._forward(probe, features.clone(), stage)
        else:
            with torch.no_grad(), self._private_rng(probe):
                preds = self._forward(probe, features, stage)
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
        if trainer.sanity_checking:
            return
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

    def _normalises_batches(self, probe: nn.Module) -> bool:
        """Whether ``probe`` normalises with batch statistics (BatchNorm, FeatureNorm): one sample cannot train it."""
        cached = self._batch_stat_layers
        if cached is None or cached[0] != id(probe):
            has = any(isinstance(m, (nn.modules.batchnorm._NormBase, FeatureNorm)) for m in probe.modules())
            cached = self._batch_stat_layers = (id(probe), has)
        return cached[1]

    def _count_unlabelled(self, target: Tensor) -> None:
        """Count, on the device, a batch whose every target is the loss's ``ignore_index`` (its loss is NaN)."""
        if not isinstance(self._loss, nn.CrossEntropyLoss) or target.is_floating_point():
            return
        if self._unlabelled is None or self._unlabelled.device != target.device:
            self._unlabelled = torch.zeros((), dtype=torch.float32, device=target.device)
        self._unlabelled.add_((target != self._loss.ignore_index).any().logical_not())

    def _forward(self, probe: nn.Module, features: Tensor, stage: str) -> Tensor:
        reference = _first_param(probe)
        x = features.detach()
        if reference is not None and (
            (x.is_floating_point() and x.dtype != reference.dtype) or x.device != reference.device
        ):
            x = x.to(device=reference.device, dtype=reference.dtype if x.is_floating_point() else x.dtype)
        if stage in self._checked:
            return probe(x)
        expected = getattr(probe, "in_features", None)
        flattens = getattr(probe, "flattens_input", False) and x.ndim > 2
        size = x[0].numel() if flattens else x.shape[-1] if x.ndim >= 1 else 1
        if isinstance(expected, int) and expected > 0 and size != expected:
            flat = f", which it flattens to {size}" if flattens else ""
            raise RuntimeError(
                f"{self._owner}: features {self.input!r} have shape {tuple(x.shape)}{flat}, but the probe expects "
                f"{expected} input features. Build the probe with in_features={size} (or leave it None to infer it)."
                + (_POOL_HINT if x.ndim > 2 else "")
            )
        try:
            return probe(x)
        except RuntimeError as err:
            raise RuntimeError(
                f"{self._owner}: the probe failed on features {self.input!r} of shape {tuple(x.shape)} and dtype "
                f"{x.dtype}: {err}. Check that the probe's input size matches the features."
            ) from err

    def _check_target(self, preds: Tensor, target: Tensor, stage: str) -> None:
        if stage in self._checked:
            return
        self._checked.add(stage)
        if not isinstance(self._loss, nn.CrossEntropyLoss):
            return
        if target.is_floating_point() and target.shape == preds.shape:
            return  # class probabilities
        if target.is_floating_point() or target.dtype == torch.bool:
            raise RuntimeError(
                f"{self._owner}: cross-entropy needs integer class indices as target, got {target.dtype} of shape "
                f"{tuple(target.shape)}. Convert them with .long(), or pass loss_fn= for another kind of target."
            )
        if preds.ndim > 2 and target.ndim == 1:
            raise RuntimeError(
                f"{self._owner}: the probe returned predictions of shape {tuple(preds.shape)} (one per token or "
                f"position) for targets of shape {tuple(target.shape)}: it does not pool features of more than two "
                f"dimensions." + _POOL_HINT
            )
        if target.ndim == 1 and preds.ndim == 2 and preds.shape[0] != target.shape[0]:
            rows, labels = preds.shape[0], target.shape[0]
            views = f" ({rows // labels} views of each sample concatenated?)" if labels and rows % labels == 0 else ""
            raise RuntimeError(
                f"{self._owner}: features {self.input!r} have {rows} rows but the target {self.target!r} has {labels} "
                f"labels{views}. Probe one view (e.g. input=lambda out, batch: out[{self.input!r}][:{labels}]), or "
                f"give every row its label (e.g. target=lambda out, batch: batch[{self.target!r}].repeat("
                f"{max(rows // max(labels, 1), 1)}))."
            )
        if target.ndim != preds.ndim - 1 or target.shape[0] != preds.shape[0]:
            raise RuntimeError(
                f"{self._owner}: cross-entropy needs one class index per sample, a target of shape "
                f"{tuple(preds.shape[:1]) + tuple(preds.shape[2:])}, got {tuple(target.shape)}. Squeeze or flatten it "
                f"(e.g. target=lambda out, batch: batch[{self.target!r}].view(-1))."
            )
        if target.numel() == 0 or preds.ndim < 2:
            return
        num_classes = preds.shape[1]
        valid = target[target != self._loss.ignore_index]
        if valid.numel() == 0:
            return
        low, high = int(valid.min()), int(valid.max())  # one sync, at the first batch of each stage only
        if low < 0:
            raise RuntimeError(
                f"{self._owner}: targets must be class indices in [0, {num_classes}), got a negative one ({low}). "
                f"Map the labels to 0..{num_classes - 1}, or mark samples to skip with the loss's ignore_index."
            )
        if high >= num_classes:
            raise RuntimeError(
                f"{self._owner}: targets must be class indices in [0, {num_classes}) for a probe with {num_classes} "
                f"outputs, got values up to {high}. Give the probe {high + 1} outputs or fix the labels."
            )

    def _loss_on(self, device: torch.device) -> Any:
        if self._loss_device != device:
            # A loss with tensors of its own (class weights) follows the probe's device.
            if isinstance(self._loss, nn.Module):
                self._loss = self._loss.to(device)
            self._loss_device = device
        return self._loss

    def _store_preds(self, preds: Tensor, outputs: Any, batch: Any) -> None:
        key = f"{self.name}_preds"
        if isinstance(batch, MutableMapping):
            batch[key] = preds
        elif isinstance(outputs, MutableMapping):
            outputs[key] = preds

    def _split_metrics(self, pl_module: pl.LightningModule, split: str, loader: int = 0) -> nn.ModuleDict:
        return loader_metrics(pl_module.callbacks_metrics[self.name], split, loader)

    def _log_metrics(self, pl_module: pl.LightningModule, split: str) -> None:
        prefix = STAGE_PREFIX[split]
        for loader, metrics in evaluated_loaders(pl_module.callbacks_metrics[self.name], split):
            suffix = loader_suffix(pl_module.trainer, split, loader)
            for name, metric in metrics.items():
                if not metric.update_called:
                    continue
                if not self._has_labelled_samples(metric, f"{prefix}/{self.name}_{name}{suffix}"):
                    reset_metric(metric)
                    continue
                value = metric.compute()  # torchmetrics reduces across processes here, once per epoch
                reset_metric(metric)
                pl_module.log(
                    f"{prefix}/{self.name}_{name}{suffix}",
                    value,
                    on_step=False,
                    on_epoch=True,
                    sync_dist=False,
                    prog_bar=split == "val",
                    add_dataloader_idx=False,
                )

    def _has_labelled_samples(self, metric: nn.Module, key: str) -> bool:
        """False (with a warning, once per key) when a top-1 count saw no labelled sample: 0/0 is no number."""
        total = getattr(metric, "total", None)
        if not isinstance(metric, InPlaceReset) or not isinstance(total, Tensor):
            return True
        if world_size() > 1:
            total = total.clone()
            all_reduce_sum_([total])
        if int(total) > 0:  # one sync per epoch
            return True
        if key not in self._eval_warned:
            self._eval_warned.add(key)
            warning_cache.warn(
                f"{self._owner}: {key} is not logged: no sample of this epoch had a label (every target was the "
                "loss's ignore_index)."
            )
        return False

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
        """The probe's FeatureNorm layers (found once per probe)."""
        cached = self.__dict__.get("_norms")
        if cached is None or cached[0] is not probe:
            cached = self.__dict__["_norms"] = (probe, [m for m in probe.modules() if isinstance(m, FeatureNorm)])
        return cached[1]
