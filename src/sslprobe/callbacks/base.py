"""TrainableCallback: the base of callbacks that train their own module beside the main model."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import operator
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from typing_extensions import override

from sslprobe._build import ModuleSpec, build_module, has_uninitialized_params
from sslprobe._containers import WITH_PROBES, CallbackModuleDict, ensure_containers, is_reserved_key
from sslprobe._distributed import all_reduce_mean_, all_reduce_sum, broadcast_, world_size
from sslprobe._internals import foreach_copy_, logs_this_step
from sslprobe._rng import PrivateRNG, needs_private_rng
from sslprobe._run_length import run_length
from sslprobe.graph import GraphedStep, StepParts
from sslprobe.optim.factories import (
    OptimizerSpec,
    SchedulerSpec,
    check_optimizer_spec,
    check_scheduler_spec,
    create_optimizer,
    create_scheduler,
    split_interval,
)
from sslprobe.optim.stepper import Stepper

__all__ = ["TrainableCallback", "ensure_containers"]

log = logging.getLogger(__name__)

_ALLOWED_CLIP_ALGORITHMS = ("norm", "value")
_ALLOWED_PRECISIONS = (None, "32", "32-true", "bf16-mixed", "16-mixed")
# The autocast of each mixed precision (Lightning's names); every other precision runs the probe as it is.
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# State keys of sslprobe's callbacks in a checkpoint (their class names), and the mark of a checkpoint already read.
_PROBE_CLASSES = ("OnlineProbe", "ProbeSweep", "OnlineKNN", "RefitProbe", "TrainableCallback")
_SAID_KEY = "_sslprobe_read"
# Strategies whose module holds full, unsharded parameters on every process.
_REPLICATED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


def cached_state_key(callback: Callback) -> str:
    """``callback``'s state key (class and name), built once: Lightning reads it for every hook of every step."""
    key = callback.__dict__.get("_state_key")
    if key is None:
        key = callback.__dict__["_state_key"] = callback._generate_state_key(name=callback.name)
    return key


def check_name_free(name: str, module: nn.Module, owner: str) -> None:
    """Raise if ``name`` is taken on ``module`` by any probe (a trained one or a kNN)."""
    taken = list(dict.fromkeys([*module.callbacks_modules, *module.callbacks_metrics]))
    if name in taken:
        raise ValueError(
            f"{owner}: the name {name!r} is already used on this {type(module).__name__} "
            f"(taken: {', '.join(repr(k) for k in taken)}). Give each probe its own name. Probes made anew for each "
            "fit/validate/test (in configure_callbacks()) take module=None: they bind to the Trainer's module at "
            "setup and find their trained probe of that name there."
        )


def is_bound(name: str, module: nn.Module) -> bool:
    """Whether ``module`` already holds the probe (or kNN) called ``name`` (bound by this or an earlier callback)."""
    containers = [getattr(module, attr, None) for attr in ("callbacks_modules", "callbacks_metrics")]
    return any(isinstance(c, nn.ModuleDict) and name in c for c in containers)


def check_module(module: Any, owner: str) -> None:
    """Raise unless ``module`` is a module to probe, or ``None`` (bound to the Trainer's module at setup)."""
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(
            f"{owner}: module must be the LightningModule to probe (or None, to bind to the Trainer's module at "
            f"setup), got {type(module).__name__}."
        )


def check_name(name: Any, cls: str) -> str:
    """Check a callback name: a non-empty string without '.', usable as a ModuleDict key and a log name."""
    if name is None:
        raise TypeError(f"{cls}: name is required: a unique id used in log names and checkpoints, e.g. name='linear'.")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{cls}: name must be a non-empty string without '.', got {name!r}. Use e.g. name='linear'.")
    if is_reserved_key(name):
        raise ValueError(
            f"{cls}(name={name!r}): the name {name!r} is an attribute of nn.ModuleDict, where the probe is stored "
            f"(module.callbacks_modules[name]), so it cannot be a probe's name. Use another, e.g. name='{name}_probe'."
        )
    return name


class TrainableCallback(Callback):
    """Base of callbacks that train their own module on the side, with their own optimizer and schedule.

    The module lives in ``module.callbacks_modules[name]``. After every training batch the callback takes the
    batch's inputs (:meth:`select_inputs`, on the host) and runs one training step on them, written once in this
    class: :meth:`compute_step` (the forward and the loss), then a :class:`~sslprobe.optim.stepper.Stepper` turns
    the loss into an update: gradients by ``torch.autograd.grad`` (the main optimizer never sees them, even when it
    was built over ``self.parameters()``), accumulation over ``accumulate_grad_batches`` batches, clipping, and a
    step that a non-finite batch cannot corrupt, all without a host sync. On a GPU that step is captured once as a
    CUDA graph and replayed (see ``cuda_graph`` and :class:`~sslprobe.graph.GraphedStep`); :meth:`finish_step`
    then does the host's part. Under DDP the module is kept out of the main model's gradient reduction and its own
    gradients are averaged in one collective per step.

    A subclass supplies the module (``trainable``), :meth:`select_inputs` and :meth:`compute_loss` (or
    :meth:`compute_step`); it logs ``train/{name}_loss``.

    Args:
        module: the LightningModule whose training the callback rides on.
        name: unique id on that module; used for storage, checkpoints and log names.
        trainable: an ``nn.Module``, a callable returning one, or a Hydra-style config with ``_target_``. Modules
            built here (and lazy modules materialised at the first batch) draw from a private RNG stream.
        optimizer: see :func:`~sslprobe.optim.create_optimizer` (``None``: LARS with the probe default).
        scheduler: see :func:`~sslprobe.optim.create_scheduler`; a dict may add ``"interval"`` (``"step"`` or
            ``"epoch"``).
        accumulate_grad_batches: step once every N training batches, on the mean gradient of those N.
        gradient_clip_val: clip the module's gradients to this value before its step, or ``None``.
        gradient_clip_algorithm: ``"norm"`` (total L2 norm) or ``"value"`` (element-wise).
        cuda_graph: on a GPU, capture the training step as a CUDA graph after two eager steps and replay it: one
            launch instead of dozens, with the numbers of the eager step. ``None`` (default) does so where the step
            allows it: one process, no accumulation, no scheduler that moves the rate at every step (an epoch one is
            captured again at each change), a fused Adam(W) or LARS optimizer, no dropout, layers of ``torch.nn``
            and sslprobe only, and sslprobe's own :meth:`compute_step`. Inputs of other shapes run eagerly.
            ``True`` also captures other code (it must read no Python value that changes, draw no random numbers
            and change state only in place) and warns where it cannot capture; ``False`` never captures.
        precision: ``None`` (default) follows the Trainer: under ``"bf16-mixed"`` or ``"16-mixed"`` the forward and
            the loss run under the same autocast as the training step (float32 weights and update; ``16-mixed``
            with the module's own loss scale), under any other precision as they are. ``"32"`` (or ``"32-true"``)
            runs the forward without autocast, in the module's own dtype (float32 but under a ``*-true`` half
            precision, which builds the module in it); ``"bf16-mixed"``/``"16-mixed"`` ask for that autocast.

    Raises:
        ValueError: for a bad value or a name already used on ``module``.
        TypeError: for an argument of the wrong type.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from sslprobe import Module
        >>> class RegressionProbe(TrainableCallback):
        ...     def select_inputs(self, trainer, pl_module, outputs, batch, batch_idx):
        ...         return outputs["embedding"], batch[1]
        ...     def compute_loss(self, module, features, target):
        ...         return F.mse_loss(module(features), target)
        >>> model = Module(forward=lambda self, b, stage: {"embedding": self.net(b[0])}, net=torch.nn.Linear(4, 8))
        >>> probe = RegressionProbe(model, "regression", torch.nn.Linear(8, 1), optimizer="SGD")
        >>> model.callbacks_modules["regression"]
        Linear(in_features=8, out_features=1, bias=True)
    """

    def __init__(
        self,
        module: pl.LightningModule | None = None,
        name: str | None = None,
        trainable: ModuleSpec | None = None,
        optimizer: OptimizerSpec = None,
        scheduler: SchedulerSpec = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        cuda_graph: bool | None = None,
        precision: Literal["32", "32-true", "bf16-mixed", "16-mixed"] | None = None,
    ) -> None:
        cls = type(self).__name__
        name = check_name(name, cls)
        owner = f"{cls}(name={name!r})"
        check_module(module, owner)
        if trainable is None:
            raise TypeError(f"{owner}: the module to train is required (an nn.Module, a factory or a config).")
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int):
            raise TypeError(
                f"{owner}: accumulate_grad_batches must be a positive int, got {accumulate_grad_batches!r}. "
                "Use 1 to step every batch."
            )
        if accumulate_grad_batches < 1:
            raise ValueError(
                f"{owner}: accumulate_grad_batches must be a positive int, got {accumulate_grad_batches}. "
                "Use 1 to step every batch."
            )
        if gradient_clip_val is not None and (
            isinstance(gradient_clip_val, bool)
            or not isinstance(gradient_clip_val, (int, float))
            or not gradient_clip_val > 0
            or not math.isfinite(gradient_clip_val)
        ):
            raise ValueError(
                f"{owner}: gradient_clip_val must be a positive number or None, got {gradient_clip_val!r}. "
                "Use None to disable clipping."
            )
        if gradient_clip_algorithm not in _ALLOWED_CLIP_ALGORITHMS:
            raise ValueError(
                f"{owner}: gradient_clip_algorithm must be one of {_ALLOWED_CLIP_ALGORITHMS}, "
                f"got {gradient_clip_algorithm!r}."
            )
        if precision not in _ALLOWED_PRECISIONS:
            raise ValueError(
                f"{owner}: precision must be one of {_ALLOWED_PRECISIONS}, got {precision!r}. Use None to follow the "
                "Trainer's precision, or '32' to keep the probe's forward in float32."
            )
        if not (cuda_graph is None or isinstance(cuda_graph, bool)):
            raise TypeError(f"{owner}: cuda_graph must be None (when possible), True or False, got {cuda_graph!r}.")
        self._check_optimizer_forms(optimizer, scheduler, owner)
        self._rng = PrivateRNG()
        self._trainable_spec = trainable
        self.name = name
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.cuda_graph = cuda_graph
        self.precision = precision
        self._autocast: torch.dtype | None = None  # the forward's autocast in this run, set at setup
        self._owner = owner
        self._graphed = GraphedStep(owner, cuda_graph)
        # Whether the captured code (compute_step and compute_loss) is sslprobe's own (see `cuda_graph`).
        self._known_step = all(
            getattr(type(self), name).__module__.startswith("sslprobe.") for name in ("compute_step", "compute_loss")
        )
        self._stepper: Stepper | None = None
        self._parked_state: dict[str, Any] | None = None
        self._rng_needed: tuple[tuple[int, bool], bool, bool] | None = None
        self._skip_warned = False
        self._binds_at_setup = module is None
        if module is not None:
            self._bind(module)

    def _bind(self, module: nn.Module) -> None:
        """Register the trainable module (and what a subclass keeps) in ``module``."""
        callbacks_modules, _ = ensure_containers(module, self._owner)
        check_name_free(self.name, module, self._owner)
        built = build_module(self._trainable_spec, self._rng, self._owner)
        if isinstance(self.optimizer, Optimizer):
            # Catch an instance over other parameters now rather than at the first batch.
            create_optimizer(self.optimizer, built.parameters(), owner=self._owner)
        callbacks_modules[self.name] = built
        self.register_metrics(module)

    def register_metrics(self, module: nn.Module) -> None:
        """Register what a subclass keeps in ``module`` beside the trainable module (``OnlineProbe``: its metrics)."""

    @staticmethod
    def _check_optimizer_forms(optimizer: Any, scheduler: Any, owner: str) -> None:
        if not (optimizer is None or isinstance(optimizer, (str, Mapping, Optimizer, type)) or callable(optimizer)):
            raise TypeError(
                f"{owner}: optimizer must be None, a name, a dict with 'type', an Optimizer class, a callable taking "
                f"the parameters, or an Optimizer instance, got {type(optimizer).__name__}."
            )
        if isinstance(optimizer, type) and not issubclass(optimizer, Optimizer):
            raise TypeError(f"{owner}: optimizer class {optimizer.__name__} is not a torch.optim.Optimizer.")
        if not (scheduler is None or isinstance(scheduler, (str, Mapping, LRScheduler, type)) or callable(scheduler)):
            raise TypeError(
                f"{owner}: scheduler must be None, a name, a dict with 'type', a scheduler class, a callable taking "
                f"the optimizer, or a scheduler instance, got {type(scheduler).__name__}."
            )
        check_optimizer_spec(optimizer, owner=owner)
        check_scheduler_spec(scheduler, owner=owner)
        if isinstance(scheduler, LRScheduler) and scheduler.optimizer is not optimizer:
            raise ValueError(
                f"{owner}: a scheduler instance must be bound to this probe's optimizer: pass that optimizer "
                "instance as optimizer= too, or give the scheduler as a name, dict or partial."
            )

    # ------------------------------------------------------------------ what a subclass supplies

    def select_inputs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> tuple[Tensor, ...] | None:
        """The tensors this training batch's step reads (features, targets), or ``None`` to skip the batch.

        Runs on the host after the main model's step, every batch; check the inputs here. They are detached before
        the step, so the loss never reaches the main model.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement select_inputs().")

    def compute_loss(self, module: nn.Module, *inputs: Tensor) -> Tensor:
        """The loss of ``module`` on the inputs :meth:`select_inputs` gave (detached), as a 0-dim tensor.

        Runs with gradients enabled and the module in train mode, eagerly or captured in a CUDA graph (see
        ``cuda_graph``): change state only in place.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss() or compute_step().")

    def compute_step(self, module: nn.Module, *inputs: Tensor) -> tuple[Tensor, Any]:
        """The loss and anything else of the step that :meth:`finish_step` needs (default: no extras).

        The device part of the step before the update; like :meth:`compute_loss`, it must change state only in
        place. A replay returns the very tensors the capture returned, overwritten at each replay.
        """
        return self.compute_loss(module, *inputs), None

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
        """The host part of every step, after the update: use the ``extras`` of :meth:`compute_step`.

        ``shared`` is True when they are a CUDA graph's outputs, which the next replay overwrites: copy what you keep.
        """

    def collect_step_state(
        self, pl_module: pl.LightningModule
    ) -> tuple[dict[str, nn.Module], dict[str, Any], list[Tensor]]:
        """What the step reads or writes beyond the module and its optimizer, for the CUDA graph to watch.

        Returns other modules it runs (a loss with weights), metrics it updates, and tensors it changes in place,
        each by name where named. The graph is captured again when any of them is replaced.
        """
        return {}, {}, []

    def logged_loss(self, loss: Tensor, extras: Any) -> Tensor:
        """The value logged as ``train/{name}_loss`` for a step's loss and extras (default: the loss)."""
        return loss

    # ------------------------------------------------------------------ accessors

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(self)

    @property
    def stepper(self) -> Stepper | None:
        """The optimizer, scheduler and accumulation state, once built (at the first training batch)."""
        return self._stepper

    @property
    def skipped_batches(self) -> int:
        """Training batches skipped so far because their features or loss were not finite (reading syncs)."""
        return 0 if self._stepper is None else int(self._stepper.skipped)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast the module's forward runs under in this fit (see ``precision``), or a no-op."""
        if self._autocast is None:
            return contextlib.nullcontext()
        # No weight cache: a CUDA graph cannot hold one, and a probe's weights change at every step anyway.
        return torch.autocast(torch.device(device).type, dtype=self._autocast, cache_enabled=False)

    @property
    def graphed_steps(self) -> int:
        """Training steps replayed from a CUDA graph so far (see ``cuda_graph``); the others ran eagerly."""
        return self._graphed.graphed_steps

    def trainable_module(self, pl_module: nn.Module) -> nn.Module:
        """This callback's module inside ``pl_module``."""
        try:
            return pl_module.callbacks_modules[self.name]
        except (AttributeError, KeyError):
            raise RuntimeError(
                f"{self._owner}: {type(pl_module).__name__} holds no callbacks_modules[{self.name!r}]. Create the "
                f"callback with the module you give the Trainer: {type(self).__name__}(module=model, ...), or with "
                "module=None to bind it to the Trainer's module at setup."
            ) from None

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Bind to the Trainer's module if not yet; check the strategy; keep the probe out of DDP's reduction."""
        if self._binds_at_setup and not is_bound(self.name, pl_module):
            self._bind(pl_module)
        self._autocast = autocast_dtype(trainer, self.precision)  # for this run's training and evaluation
        module = self.trainable_module(pl_module)
        kind = self._check_strategy(trainer, pl_module, module)
        if stage == "fit" and kind == "ddp" and world_size_of(trainer) > 1:
            self._exclude_from_ddp(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start every process from rank 0's module (DDP no longer broadcasts it)."""
        module = self.trainable_module(pl_module)
        if _strategy_names(trainer) & {"FSDPStrategy"}:
            # FSDP does not move the modules it ignores; the probe follows the root device itself.
            module.to(trainer.strategy.root_device)
        if world_size() > 1 and not has_uninitialized_params(module):
            broadcast_([*module.parameters(), *module.buffers()])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the optimizer (unless the module is still lazy) or move its state to the module's device."""
        module = self.trainable_module(pl_module)
        self.__dict__.pop("_buffer_cache", None)  # the module may have moved: its buffers are new tensors
        if has_uninitialized_params(module):
            return
        if self._stepper is None and world_size() > 1:
            # A lazy module may have been built since on_fit_start's broadcast, by the sanity check's evaluation.
            broadcast_([*module.parameters(), *module.buffers()])
        stepper = self._ensure_stepper(trainer, module)
        stepper.to(stepper.params[0].device)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Train the module one step on this batch: replayed from a CUDA graph where it can be, else eagerly."""
        module = self.trainable_module(pl_module)
        if not module.training:
            module.train()
        inputs = self.select_inputs(trainer, pl_module, outputs, batch, batch_idx)
        if inputs is None:
            return
        inputs = tuple(inputs)
        step = functools.partial(self._step, trainer, module)
        stepper = self._stepper
        if stepper is None:  # a lazy module: its parameters, and so its optimizer, exist after this first step
            (loss, extras), shared = step(*inputs), False
        else:
            modules, metrics, tensors = self.collect_step_state(pl_module)
            tensors = [*tensors, *self._buffers_of(module)[1]]
            parts = StepParts(module, stepper, modules, metrics, tensors, owner=self, known_code=self._known_step)
            (loss, extras), shared = self._graphed.run(step, inputs, parts)
        self._stepper.end_step()
        self.finish_step(trainer, pl_module, outputs, batch, inputs, extras, shared)
        self._log_loss(trainer, pl_module, loss, extras, shared)

    def _step(self, trainer: pl.Trainer, module: nn.Module, *inputs: Tensor) -> tuple[Tensor, Any]:
        """The training step on the device, written once: run eagerly, or captured and replayed by the graph."""
        lazy = self._stepper is None and has_uninitialized_params(module)
        # Running statistics (BatchNorm) change in the forward: keep a copy to undo a non-finite batch.
        buffers, saved = ([], []) if lazy else self._buffers_of(module)
        if buffers:
            foreach_copy_(saved, buffers)
        with self._private_rng(module), torch.enable_grad(), self.autocast(inputs[0].device):
            loss, extras = self.compute_step(module, *(x.detach() for x in inputs))
        if lazy and world_size() > 1:
            broadcast_([*module.parameters(), *module.buffers()])
        # Parameters are checked against the module at on_train_start; per step only a lazy first build remains
        # (never under a capture, which comes after eager steps).
        stepper = self._stepper if self._stepper is not None else self._ensure_stepper(trainer, module)
        found = stepper.device_step(loss)
        if buffers:
            restore_where_skipped(buffers, saved, found)
        elif lazy and bool(found):
            # A lazy module's first batch made its buffers, so none were saved: when that batch is skipped, its
            # running statistics start afresh (one sync, at the first batch only).
            reset_running_stats(module)
        return loss.detach(), extras

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Step an epoch-interval scheduler and warn (once) about skipped non-finite batches."""
        if self._stepper is None:
            return
        self._stepper.epoch_end()
        if not self._skip_warned:
            skipped = self.skipped_batches  # one sync per epoch
            if skipped:
                self._skip_warned = True
                rank_zero_warn(self.skipped_message(skipped), category=RuntimeWarning)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Release the CUDA graph and the tensors it keeps alive (the next fit warms up and captures afresh)."""
        self._graphed.release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Release the CUDA graph when a fit stops on an error, as at its end."""
        self._graphed.release()

    def skipped_message(self, skipped: int) -> str:
        """What the warning about ``skipped`` skipped batches says (once, at an epoch's end); a subclass adds why."""
        scaling = (
            " With a float16 probe or forward the first few are its own loss scale settling, which is expected."
            if self._stepper is not None and self._stepper.scaling
            else ""
        )
        return (
            f"{self._owner}: skipped {skipped} training batch(es) whose features, loss or gradients were not "
            f"finite; the probe was left unchanged by them.{scaling} HINT: check the main model for NaN/Inf "
            "outputs (callback.skipped_batches counts them)."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        state = dict(self._stepper.state_dict()) if self._stepper is not None else dict(self._parked_state or {})
        state["rng"] = self._rng.state_dict()
        return state

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """In a process that ``ddp_spawn`` started, let the model's state carry the probes back to the main process."""
        # Lightning returns a spawned run's weights as the model's state_dict, which otherwise leaves probes out: the
        # main process's model (a notebook's) would keep its untrained probes for the next fit or validate.
        if type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher":
            pl_module.__dict__[WITH_PROBES] = True

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Put the probe's weights beside its training state (the model's own ``state_dict`` leaves them out)."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None:
            state["module"] = self.trainable_module(pl_module).state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Load the probe's weights from its state in ``checkpoint``; say which probes start fresh or are dropped."""
        states = checkpoint.get("callbacks")
        if not isinstance(states, Mapping):
            return  # a weights-only checkpoint: the model alone
        if not checkpoint.get(_SAID_KEY):
            checkpoint[_SAID_KEY] = True  # once per checkpoint, whichever probe reads it first
            ours = {c.state_key for c in trainer.callbacks}
            dropped = [k for k in states if k.startswith(_PROBE_CLASSES) and k not in ours]
            if dropped:
                rank_zero_info(
                    f"sslprobe: the checkpoint holds state for {', '.join(dropped)}, which this run does not have; "
                    "that state is dropped."
                )
        state = states.get(self.state_key)
        if state is None:
            rank_zero_info(f"{self._owner}: the checkpoint holds no state for this probe; it starts fresh.")
            return
        if "module" in state:
            self.trainable_module(pl_module).load_state_dict(state["module"])

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        state.pop("module", None)  # the probe's weights: loaded by on_load_checkpoint, which sees the module
        if "rng" in state:
            self._rng.load_state_dict(state.pop("rng"))
        if not state:
            return
        if self._stepper is not None:
            self._stepper.load_state_dict(state)
        else:
            # The optimizer does not exist before the first training batch: apply the state when it does.
            self._parked_state = state

    # ------------------------------------------------------------------ internals

    def _buffers_of(self, module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """The module's buffers, and as many tensors to save them into before each training forward."""
        cached = self.__dict__.get("_buffer_cache")
        if cached is None or cached[0] is not module:
            buffers = [b for b in module.buffers() if b.numel()]
            cached = self.__dict__["_buffer_cache"] = (module, buffers, [torch.empty_like(b) for b in buffers])
        return cached[1], cached[2]

    def _private_rng(self, module: nn.Module) -> contextlib.AbstractContextManager:
        key = (id(module), module.training)
        cached = self._rng_needed
        if cached is None or cached[0] != key or cached[2]:
            # Recomputed while the module is lazy (materialising draws random numbers), cached after.
            cached = self._rng_needed = (key, needs_private_rng(module), has_uninitialized_params(module))
        return self._rng if cached[1] else contextlib.nullcontext()

    def _ensure_stepper(self, trainer: pl.Trainer, module: nn.Module) -> Stepper:
        params = [p for p in module.parameters() if p.requires_grad]
        current = self._stepper
        same = current is not None and len(params) == len(current.params)
        if same and all(map(operator.is_, params, current.params)):
            current.use_loss_scale(self._autocast == torch.float16)  # this fit's precision may not be the last one's
            return current
        optimizer = create_optimizer(self.optimizer, params, owner=self._owner)
        scheduler, interval = self._build_scheduler(trainer, optimizer)
        self._stepper = Stepper(
            params,
            optimizer,
            scheduler,
            interval=interval,
            accumulate_grad_batches=self.accumulate_grad_batches,
            gradient_clip_val=self.gradient_clip_val,
            gradient_clip_algorithm=self.gradient_clip_algorithm,
            all_reduce=all_reduce_sum if world_size() > 1 else None,
            world_size=world_size(),
            scale_loss=self._autocast == torch.float16,
        )
        if self._parked_state is not None:
            self._stepper.load_state_dict(self._parked_state)
            self._parked_state = None
        log.debug("%s: built %s and %s", self._owner, type(optimizer).__name__, type(scheduler).__name__)
        return self._stepper

    def _build_scheduler(self, trainer: pl.Trainer, optimizer: Optimizer) -> tuple[Any, str]:
        spec, interval = split_interval(self.scheduler, owner=self._owner)
        if spec is None and not all("lr" in group for group in optimizer.param_groups):
            return None, interval  # per-parameter rates (ProbeSweep's heads), which no default schedule moves
        total = run_length(trainer, interval, every=self.accumulate_grad_batches)
        return create_scheduler(spec, optimizer, total=total, owner=self._owner), interval

    def _log_loss(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor, extras: Any, shared: bool
    ) -> None:
        # A Lightning log call costs about a millisecond of Python; a per-step value only ever reaches the
        # logger on its log_every_n_steps cadence. So the loss is logged on exactly those steps (and the last
        # step of each epoch, so callback_metrics holds a fresh value), averaged across processes only then.
        # A `shared` loss is overwritten by the next step (a CUDA graph's output): the logged value is a copy.
        logger_step = logs_this_step(trainer)
        if not (logger_step or _last_step_of_epoch(trainer)):
            return
        value = self.logged_loss(loss, extras).detach()
        if shared:
            value = value.clone()
        if world_size() > 1 and trainer.loggers and logger_step:
            value = value.float().clone()
            all_reduce_mean_([value])
        pl_module.log(f"train/{self.name}_loss", value, on_step=True, on_epoch=False, sync_dist=False)

    def _check_strategy(self, trainer: pl.Trainer, pl_module: nn.Module, module: nn.Module) -> str:
        names = _strategy_names(trainer)
        if names & set(_REPLICATED_STRATEGIES):
            return "ddp" if "DDPStrategy" in names else "single"
        if "FSDPStrategy" in names:
            kwargs = getattr(trainer.strategy, "kwargs", {}) or {}
            ignored = list(kwargs.get("ignored_modules") or []) + list(kwargs.get("ignored_states") or [])
            containers = (pl_module.callbacks_modules, module)
            if any(any(item is c for c in containers) for item in ignored):
                return "fsdp"
            raise RuntimeError(
                f"{self._owner}: under FSDP the probes must stay whole on every process, not sharded. Create the "
                "strategy with FSDPStrategy(ignored_modules=[model.callbacks_modules], ...); see docs/distributed.md."
            )
        raise RuntimeError(
            f"{self._owner}: the strategy {type(trainer.strategy).__name__} is not supported: probes need a full copy "
            "of their parameters on every process. Use a single device, the DDP family (strategy='ddp', "
            "'ddp_spawn', 'ddp_notebook') or FSDP with ignored_modules; see docs/distributed.md."
        )

    def _exclude_from_ddp(self, pl_module: pl.LightningModule) -> None:
        module = self.trainable_module(pl_module)
        probe_ids = {id(p) for m in pl_module.callbacks_modules.values() for p in m.parameters()}
        if not any(p.requires_grad and id(p) not in probe_ids for p in pl_module.parameters()):
            # Nothing else trains: DDP refuses a module without trainable parameters, so leave the probe
            # registered. Its gradients come from autograd.grad, which fires no DDP hook.
            if has_uninitialized_params(module):
                raise RuntimeError(
                    f"{self._owner}: under DDP with a frozen main model the probe cannot be lazy. Give its input "
                    "size (e.g. LinearProbe(num_classes, in_features=D) or nn.Linear(D, C))."
                )
            if isinstance(pl_module.callbacks_modules, CallbackModuleDict):
                pl_module.callbacks_modules.listed_in_parent = True  # so that DDP sees them
            return
        prefix = f"callbacks_modules.{self.name}."
        names = [prefix + n for n, _ in module.named_parameters()] + [prefix + n for n, _ in module.named_buffers()]
        ignored = list(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []))
        # torch's documented hook for parameters DDP must not reduce (DistributedDataParallel reads it on wrap).
        pl_module._ddp_params_and_buffers_to_ignore = ignored + [n for n in names if n not in ignored]


@torch.no_grad()
def reset_running_stats(module: nn.Module) -> None:
    """Reset the running statistics of every normalisation layer in ``module`` (BatchNorm, FeatureNorm)."""
    for layer in module.modules():
        reset = getattr(layer, "reset_running_stats", None)
        if callable(reset) and getattr(layer, "track_running_stats", True):
            reset()


@torch.no_grad()
def restore_where_skipped(buffers: list[Tensor], saved: list[Tensor], found: Tensor) -> None:
    """Put the values in ``saved`` back into ``buffers`` where ``found`` flags the batch as skipped (no host sync)."""
    keep = found == 0
    for buffer, old in zip(buffers, saved):
        torch.where(keep, buffer, old, out=buffer)


def _strategy_names(trainer: pl.Trainer) -> set[str]:
    # Class names, not isinstance: the standalone pytorch_lightning package has its own strategy classes.
    return {c.__name__ for c in type(trainer.strategy).__mro__}


def world_size_of(trainer: pl.Trainer) -> int:
    """The Trainer's world size (known in ``setup``, before the process group may exist)."""
    return int(getattr(trainer, "world_size", 1) or 1)


def _last_step_of_epoch(trainer: pl.Trainer) -> bool:
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.is_last_batch or progress.current.ready >= trainer.num_training_batches:
        return True
    return 0 < trainer.max_steps <= trainer.global_step


def autocast_dtype(trainer: pl.Trainer, precision: str | None) -> torch.dtype | None:
    """The autocast dtype of a probe's forward: ``precision`` where given (``"32"``: none), else the Trainer's.

    Examples:
        >>> from types import SimpleNamespace
        >>> trainer = SimpleNamespace(precision="bf16-mixed")
        >>> autocast_dtype(trainer, None), autocast_dtype(trainer, "32")
        (torch.bfloat16, None)
    """
    chosen = str(getattr(trainer, "precision", "32-true")) if precision is None else precision
    return _AUTOCAST.get(chosen)
