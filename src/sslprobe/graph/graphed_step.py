"""GraphedStep: runs a callback's training step eagerly, or captured once as a CUDA graph and replayed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import Tensor, nn
from torchmetrics import Metric

from sslprobe._internals import record_metric_update
from sslprobe._metrics import metric_states
from sslprobe._rng import needs_private_rng
from sslprobe.graph.capture import StepGraph
from sslprobe.graph.rollback import Rollback, host_settings, module_tensors

__all__ = ["GraphedStep", "StepParts"]

log = logging.getLogger(__name__)
warning_cache = WarningCache()

# Eager steps before the step is captured: the first creates the optimizer's state, the second runs on it as every
# later step will.
WARMUP = 2


def _known_module(module: nn.Module) -> bool:
    """A layer of torch.nn or of sslprobe: its forward reads no Python value that changes between steps."""
    return type(module).__module__.startswith(("torch.nn.", "sslprobe."))


@dataclass
class StepParts:
    """What a training step reads and writes besides its inputs: what a captured step must watch.

    Attributes:
        module: the module the step trains.
        stepper: its :class:`~sslprobe.optim.stepper.Stepper` (gradients, check, update): the graph reads its
            ``direct``, ``rate_moves_every_step``, ``capturable``, ``optimizer``, ``params``, ``settings()`` and
            ``tensors()``, and calls ``prepare_capture()`` before a capture.
        modules: other modules the step runs (a loss with weights), by name.
        metrics: metrics the step updates (their states must change in place), by name.
        tensors: other tensors the step changes in place (saved copies of buffers).
        owner: the object whose tensor attributes a capture must not rebind (the callback); the ones the step
            changes in place are listed in ``tensors``.
        known_code: whether the step is sslprobe's own code (else it is captured only with ``cuda_graph=True``).
    """

    module: nn.Module
    stepper: Any
    modules: Mapping[str, nn.Module] = field(default_factory=dict)
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    tensors: Sequence[Tensor] = ()
    owner: Any = None
    known_code: bool = True

    def all_modules(self) -> tuple[nn.Module, ...]:
        return (*self.module.modules(), *self.modules.values())

    def state(self) -> tuple[list[Tensor], tuple]:
        """What a replay depends on: every tensor it reads or writes, and the host values baked into its kernels."""
        modules = self.all_modules()
        held = module_tensors(modules) + self.stepper.tensors() + list(self.tensors)
        for metric in self.metrics.values():
            held += metric_states(metric)
        return held, (self.stepper.settings(), host_settings(modules))


class GraphedStep:
    """Runs ``step(*inputs)``: eagerly, or from a CUDA graph captured after :data:`WARMUP` eager runs.

    It owns the whole policy: whether the step can be a graph (decided once per module, stepper and device, with the
    reason logged or warned), the eager warm-up, the capture (with everything its Python rebinds put back), the
    replay while the graph is still valid for the inputs and the watched state, the eager fallback for inputs of
    other shapes, a new capture when the watched tensors or host values change, and the release.

    A replay does not run the step's Python: the step must change state only in place, and its outputs are the same
    tensors at every replay (:meth:`run` says so: copy what you keep). The metrics in :class:`StepParts` are
    recorded as updated after each replay.

    Args:
        owner: how messages name the caller, e.g. ``"OnlineProbe(name='linear')"``.
        mode: ``None`` (capture where the step allows it), ``True`` (also sslprobe-unknown code, and warn where it
            cannot) or ``False`` (never).

    Examples:
        >>> import torch
        >>> from sslprobe.optim.stepper import Stepper
        >>> lin = torch.nn.Linear(2, 1)
        >>> stepper = Stepper(list(lin.parameters()), torch.optim.SGD(lin.parameters(), lr=0.1))
        >>> graphed = GraphedStep("example", mode=None)
        >>> step = lambda x: stepper.device_step(lin(x).pow(2).mean())
        >>> _, shared = graphed.run(step, (torch.ones(4, 2),), StepParts(lin, stepper))
        >>> shared, graphed.blocker  # on the CPU it runs eagerly, and says why
        (False, 'the module is on cpu, not on a CUDA device')
    """

    def __init__(self, owner: str, mode: bool | None = None) -> None:
        self.owner = owner
        self.mode = mode
        self.graph = StepGraph()
        self.graphed_steps = 0
        self._key: tuple[Any, ...] | None = None
        self._blocker: str | None = None
        self._eager_runs = 0
        self._failed = False

    @property
    def blocker(self) -> str | None:
        """Why the step runs eagerly (``None``: it is, or will be, replayed from a graph)."""
        return self._blocker

    def run(self, step: Callable[..., Any], inputs: Sequence[Tensor], parts: StepParts) -> tuple[Any, bool]:
        """Run the step on ``inputs``; returns its outputs and whether they are a graph's (overwritten next time)."""
        if self.mode is False or self._static_blocker(parts) is not None:
            return step(*inputs), False
        graph = self.graph
        if not self._fit_inputs(inputs, parts):
            return step(*inputs), False
        if graph.captured and not graph.fits(inputs):
            return step(*inputs), False  # another shape (the last, smaller batch); the graph stays
        if graph.captured and not graph.current(*parts.state()):
            # A move, a checkpoint load or a metric reset replaced watched tensors, or a learning rate (an epoch
            # scheduler, a user) or another host value changed: capture again.
            graph.drop()
        if not graph.captured and (self._eager_runs < WARMUP or self._failed or not self._capture(step, inputs, parts)):
            self._eager_runs += 1
            return step(*inputs), False
        outputs = graph.replay(inputs)
        self.graphed_steps += 1
        for metric in parts.metrics.values():
            record_metric_update(metric)
        return outputs, True

    def release(self) -> None:
        """Drop the graph and what it keeps alive; the next run starts afresh (warm-up, then a capture)."""
        self.graph.drop()
        self._key = None

    # ------------------------------------------------------------------ internals

    def _static_blocker(self, parts: StepParts) -> str | None:
        stepper = parts.stepper
        key = (id(parts.module), id(stepper), stepper.params[0].device)
        if key != self._key:
            # A new optimizer (the trainable parameters changed) or device starts afresh: warm-up, one capture try.
            self._key = key
            self.graph.drop()
            self._eager_runs, self._failed = 0, False
            self._set_blocker(self._reason(parts))
        return self._blocker

    def _set_blocker(self, reason: str | None) -> None:
        self._blocker = reason
        if reason is not None and self.mode:
            warning_cache.warn(f"{self.owner}: cuda_graph=True, but the training step runs eagerly: {reason}.")

    def _reason(self, parts: StepParts) -> str | None:
        stepper, module = parts.stepper, parts.module
        device = stepper.params[0].device
        if not stepper.direct:
            return "it accumulates gradients or averages them across processes"
        if stepper.rate_moves_every_step:
            return (
                "a scheduler moves the learning rate at every step (a constant rate, or a scheduler with "
                "interval='epoch', lets the step be captured)"
            )
        if needs_private_rng(module):
            return "the module draws random numbers (dropout)"
        if self.mode is None:
            # Layers of torch.nn and sslprobe read no Python value that changes between steps; other code may (a
            # counter, a schedule, a random draw), and a replay would repeat the value it had at capture.
            unknown = sorted({type(m).__name__ for m in parts.all_modules() if not _known_module(m)})
            if unknown or not parts.known_code:
                what = ", ".join(unknown) if unknown else "its own training step"
                return (
                    f"it runs code sslprobe does not know ({what}). Pass cuda_graph=True to capture it anyway, if "
                    "it reads no Python value that changes between steps, draws no random numbers and changes "
                    "state only in place"
                )
        if any(t.device != device for t in module_tensors(parts.all_modules())):
            return "the module's tensors are on several devices"
        if device.type != "cuda":
            return f"the module is on {device.type}, not on a CUDA device"
        return None

    @staticmethod
    def _fit_inputs(inputs: Sequence[Tensor], parts: StepParts) -> bool:
        device = parts.stepper.params[0].device
        return bool(inputs) and all(isinstance(x, Tensor) and x.device == device for x in inputs)

    def _capture(self, step: Callable[..., Any], inputs: Sequence[Tensor], parts: StepParts) -> bool:
        """Capture the step; False (with everything as it was, and the step left eager) where it cannot be."""
        stepper = parts.stepper
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
        stepper.prepare_capture()
        # Capturing runs the step's Python once (its kernels are recorded, not run): what it rebinds is undone.
        named = {f"module {name}" if name else "module": m for name, m in parts.module.named_modules()}
        rollback = Rollback({**named, **parts.modules}, stepper.optimizer, parts.metrics, owner=parts.owner)
        error: BaseException | None = None
        try:
            self.graph.capture(step, inputs, *parts.state())
        except Exception as err:  # an operation a graph cannot hold, e.g. a host sync in a metric or a loss
            error = err
        if error is None and not self.graph.current(*parts.state()):
            error = RuntimeError("it rebinds state or changes Python values instead of updating tensors in place")
        replaced = rollback.restore(keep=error is None)
        if error is None:
            log.debug("%s: captured the training step as a CUDA graph", self.owner)
            return True
        self.graph.drop()
        self._failed = True
        where = f" (it replaced {', '.join(replaced)})" if replaced else ""
        message = (
            f"{self.owner}: capturing the training step as a CUDA graph failed: {error}{where}; the step runs "
            "eagerly. HINT: update state in place (buffer.mul_(m).add_(x), not buffer = m * buffer + x) and read no "
            "host value in the step, or pass cuda_graph=False to skip the attempt."
        )
        if self.mode:
            warning_cache.warn(message)
        else:
            log.info(message)
        return False
