"""A probe's own training step: gradients, accumulation, loss scaling, clipping and a skippable update."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sslprobe._internals import (
    foreach_add_,
    foreach_div,
    foreach_mul,
    foreach_mul_,
    non_finite_check_and_unscale_,
    tensor_version,
    update_loss_scale_,
)
from sslprobe.optim._pieces import PieceCache, cut_alike, is_cut
from sslprobe.optim.conditional_step import captures_safely, conditional_step, forget_plan, uses_fused_adam

__all__ = ["Stepper"]

_ALLOWED_CLIP = ("norm", "value")
_INIT_SCALE = 2.0**16
_GROWTH_INTERVAL = 2000


class Stepper:
    """Trains a set of parameters on losses handed to it, one batch at a time, without a host sync.

    Each step is :meth:`device_step` (all device work, which a CUDA graph can capture) then :meth:`end_step` (the
    host's counters and the scheduler); :meth:`backward` does both. A step takes the gradient of one batch's loss
    with ``torch.autograd.grad`` (nothing is written to ``.grad``, so another optimizer over the same parameters
    never sees it) and checks it for non-finite values on the device. With ``accumulate_grad_batches=1`` on one
    process the batch steps at once, or is skipped exactly when it is not finite. Otherwise its gradient is summed
    across processes by ``all_reduce`` (when given) into the "global batch" of this step, which joins the window
    only if every part of it is finite (a non-finite one adds nothing and does not count, as for one process holding
    the whole batch); the parameters step, after clipping, on the mean gradient once the window holds
    ``accumulate_grad_batches`` finite global batches. Which batch completes a window is decided on the device, so
    the step is computed every batch and kept only then. ``steps`` and an LR schedule count windows of
    ``accumulate_grad_batches`` batches on the host. Non-finite batches are counted in :attr:`skipped`. Parameters
    in float16 (or with ``scale_loss``) get their own dynamic loss scale.

    Args:
        params: the parameters to train.
        optimizer: their optimizer.
        scheduler: its LR scheduler, or ``None``.
        interval: when the scheduler steps: after every optimizer ``"step"`` or at every ``"epoch"`` end.
        accumulate_grad_batches: batches per optimizer step.
        gradient_clip_val: clip threshold, or ``None``.
        gradient_clip_algorithm: ``"norm"`` (total L2 norm) or ``"value"`` (element-wise).
        all_reduce: returns the sums of a list of tensors across processes, or ``None`` on one process.
        world_size: the number of processes ``all_reduce`` sums over.
        scale_loss: give the loss a dynamic scale even for float32 parameters (a float16 autocast forward).

    Examples:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1)
        >>> stepper = Stepper(list(lin.parameters()), torch.optim.SGD(lin.parameters(), lr=0.1))
        >>> before = lin.weight.detach().clone()
        >>> stepper.backward(lin(torch.ones(4, 2)).pow(2).mean())
        True
        >>> bool((lin.weight != before).all()), stepper.steps
        (True, 1)
        >>> stepper.backward(lin(torch.full((4, 2), float("nan"))).mean())
        True
        >>> int(stepper.skipped), stepper.steps
        (1, 2)
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        optimizer: Optimizer,
        scheduler: Any = None,
        interval: Literal["step", "epoch"] = "step",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        all_reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
        world_size: int = 1,
        scale_loss: bool = False,
    ) -> None:
        if gradient_clip_algorithm not in _ALLOWED_CLIP:
            raise ValueError(f"Stepper: gradient_clip_algorithm must be one of {_ALLOWED_CLIP}.")
        self.params = list(params)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.interval = interval
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.all_reduce = all_reduce
        self.world_size = world_size
        # ConstantLR(factor=1.0), the default, changes nothing: skip its per-step Python work.
        self._steps_scheduler = scheduler is not None and not (
            isinstance(scheduler, torch.optim.lr_scheduler.ConstantLR) and scheduler.factor == 1.0
        )
        device = self.params[0].device
        self._scaling = scale_loss or any(p.dtype == torch.float16 for p in self.params)
        self._scale = torch.tensor(_INIT_SCALE if self._scaling else 1.0, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self._skipped = torch.zeros((), dtype=torch.float32, device=device)
        self._found = torch.zeros((), dtype=torch.float32, device=device)  # 1.0 when the latest batch was not finite
        self._good = torch.zeros((), dtype=torch.float32, device=device)
        self._sums: list[Tensor] | None = None
        # On a GPU, the fused Adam(W) kernel and the non-finite check run on flat pieces of each tensor, which
        # spreads one probe weight over many blocks (see `cut_alike`; measured: 0.6 points of a ResNet-50 step with
        # 8 probes). The views of long-lived tensors are kept, and gradients are copied into long-lived buffers.
        self._pieces = PieceCache() if _cuts(self.params, optimizer) else None
        self._grad_buffers: dict[int, Tensor] = {}
        self._grad_buffer_ids: set[int] = set()
        if self._pieces is not None:
            self._make_grad_buffers([i for i, p in enumerate(self.params) if is_cut(p)])
        self.batches = 0  # batches in the current window
        self.steps = 0  # optimizer steps taken

    @property
    def skipped(self) -> Tensor:
        """Number of non-finite batches skipped so far (a device tensor: reading it syncs)."""
        return self._skipped

    @property
    def scaling(self) -> bool:
        """True when the loss gets a dynamic scale (float16 parameters, or ``scale_loss`` for a float16 forward)."""
        return self._scaling

    @property
    def loss_scale(self) -> Tensor:
        """The current loss scale (a 0-dim device tensor; 1.0 when not :attr:`scaling`)."""
        return self._scale

    @property
    def last_found(self) -> Tensor:
        """1.0 (a 0-dim device tensor) when the latest batch was not finite; the same tensor at every step."""
        return self._found

    @property
    def direct(self) -> bool:
        """True when each batch steps at once on its own gradient (no window, no collective)."""
        return self.accumulate_grad_batches == 1 and self.all_reduce is None

    def backward(self, loss: Tensor) -> bool:
        """Add one batch's gradient of ``loss``; step when the window is full. Returns True if it stepped."""
        self.device_step(loss)
        return self.end_step()

    def device_step(self, loss: Tensor) -> Tensor:
        """The device half of a step: gradients, check, the skippable update, the skipped count; no host sync.

        Returns :attr:`last_found`. The host half is :meth:`end_step`. A CUDA graph captures this half (for a
        :attr:`direct` step) and replays it; it writes only tensors that keep their memory from step to step.
        """
        found = self._found
        found.zero_()
        grads = self._checked_grads(loss, found)
        if self.direct:
            self._step(grads, found)  # the optimizer takes the pieces the check made, then `_step` releases them
        else:
            self._window_step(grads, found)
        self._skipped.add_(found)
        return found

    def _window_step(self, grads: list[Tensor], found: Tensor) -> None:
        if self._pieces is not None:
            self._release(grads)  # the window steps on other tensors (sums, masked copies)
        # The batch of all processes at this step (the "global batch") counts only when every part of it is finite:
        # a non-finite one adds nothing and does not count, as for one process with the whole batch. The host cannot
        # know which without a sync, so each batch runs a step that the device keeps only when a window is full.
        keep = found == 0
        zero = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
        grads = [torch.where(keep, g, zero) for g in grads]
        finite = keep.to(grads[0].dtype)
        if self.all_reduce is not None:
            # One collective per batch carries the gradients and the number of processes whose batch was finite.
            *grads, finite = self.all_reduce([*grads, finite])
        ok = (finite >= self.world_size).to(grads[0].dtype)  # the whole global batch was finite
        if self.accumulate_grad_batches == 1:
            # A window of one global batch: step on its mean unless any part of it was not finite.
            foreach_mul_(grads, ok / self.world_size)  # finite values: the multiply by 0 or 1/W is exact
            self._step(grads, 1.0 - ok)
            return
        if self._sums is None:
            self._sums = [torch.zeros_like(g) for g in grads]
        foreach_add_(self._sums, foreach_mul(grads, ok))
        self._good.add_(ok)
        full = self._good >= self.accumulate_grad_batches
        mean = foreach_div(self._sums, self._good.clamp(min=1.0) * self.world_size)
        self._step(mean, (~full).to(torch.float32))
        still_open = (~full).to(self._good.dtype)
        foreach_mul_(self._sums, still_open)  # sums are finite, so a multiply by 0 or 1 is exact
        self._good.mul_(still_open)

    def _checked_grads(self, loss: Tensor, found: Tensor) -> list[Tensor]:
        """The gradients of ``loss``, unscaled, with ``found`` (zero before) set where any is not finite."""
        if self._scaling:
            scaled = loss * self._scale
            found.copy_(torch.isfinite(loss.detach()).logical_not())
        else:
            scaled = loss
        grads = list(torch.autograd.grad(scaled, self.params, allow_unused=True))
        # A parameter the loss does not reach gets zeros; one it reaches only through a sum gets an expanded
        # gradient (stride 0), which the in-place check below cannot write: it gets its own memory.
        grads = [
            torch.zeros_like(p) if g is None else g if g.is_contiguous() else g.contiguous()
            for p, g in zip(self.params, grads)
        ]
        # One fused kernel flags any NaN/Inf in `found` and divides by the loss scale. Unscaled, the loss itself
        # rides along (multiplied by exactly 1), which saves the separate isfinite of the loss.
        # Where the optimizer's kernel runs on flat pieces (see `cut_alike`), the gradients that are cut are first
        # copied into long-lived buffers: one copy kernel, where cutting a new tensor into views every step would
        # cost ~100 us of host time. The check and the optimizer then take the buffers' cached pieces.
        pieces = grads
        if self._pieces is not None:
            for i, buffer in self._grad_buffers.items():
                grads[i] = buffer.copy_(grads[i])
            (pieces,), _ = cut_alike([grads], cache=self._pieces)
        if self._scaling:
            non_finite_check_and_unscale_(pieces, found, self._scale.reciprocal())
            update_loss_scale_(self._scale, self._growth_tracker, found, _GROWTH_INTERVAL)
        else:
            non_finite_check_and_unscale_([*pieces, loss.detach().reshape(1)], found, self._scale)
        return grads

    # ------------------------------------------------------------------ a step split for CUDA graphs

    @property
    def capturable(self) -> bool:
        """Whether a direct step can be captured as a CUDA graph: it must read the same tensors every step.

        That needs a direct step (no window, no collective), a learning rate that does not move at every step (no
        step-interval scheduler; an epoch-interval one means a new capture per epoch) and an optimizer that
        updates its state in place (see :func:`~sslprobe.optim.conditional_step.captures_safely`).
        """
        return self.direct and not self.rate_moves_every_step and captures_safely(self.optimizer)

    @property
    def rate_moves_every_step(self) -> bool:
        """Whether a scheduler changes the learning rate after every optimizer step."""
        return self._steps_scheduler and self.interval == "step"

    def settings(self) -> tuple:
        """What a captured step bakes into its kernels: every hyperparameter of every group.

        A tensor hyperparameter (the sweep's per-head rates) stands as its identity and in-place version.
        """
        return tuple(
            tuple(
                (key, ("tensor", id(value), tensor_version(value)) if isinstance(value, Tensor) else value)
                for key, value in group.items()
                if key != "params"
            )
            for group in self.optimizer.param_groups
        )

    def end_step(self) -> bool:
        """The host half of a step; returns True where it completed a window (an optimizer step).

        Windows of ``accumulate_grad_batches`` batches are what the LR schedule and :attr:`steps` count; the weights
        follow the device's count of finite batches.
        """
        self.batches += 1
        if self.batches < self.accumulate_grad_batches:
            return False
        self.batches = 0
        self.steps += 1
        if self.rate_moves_every_step:
            self.scheduler.step()
        return True

    def use_loss_scale(self, on: bool) -> None:
        """Give the loss a dynamic scale from now on (a float16 forward), or none; float16 parameters keep theirs.

        A new fit may run another precision than the one this stepper was built for (a first fit in float32, a second
        under ``16-mixed``); a switch starts the scale afresh.
        """
        on = on or any(p.dtype == torch.float16 for p in self.params)
        if on != self._scaling:
            self._scaling = on
            self._scale.fill_(_INIT_SCALE if on else 1.0)
            self._growth_tracker.zero_()

    def prepare_capture(self) -> None:
        """Before a CUDA graph captures :meth:`device_step`: it needs no long-lived gradient buffers.

        They spare an eager step the host time of cutting new gradients into pieces; a captured step cuts once, at
        capture, and keeps its gradients in the graph's pool. Eager steps after it (a smaller last batch) cut
        afresh.
        """
        self._grad_buffers, self._grad_buffer_ids = {}, set()

    def tensors(self) -> list[Tensor]:
        """Every tensor a step reads or writes besides the loss: parameters, optimizer state and the stepper's own."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
        own = [self._scale, self._growth_tracker, self._skipped, self._found, *self._grad_buffers.values()]
        extra = self.optimizer.graph_tensors() if hasattr(self.optimizer, "graph_tensors") else []
        return [*self.params, *state, *own, *extra]

    def _step(self, grads: list[Tensor], skip: Tensor) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g
        if self.gradient_clip_val is not None:
            if self.gradient_clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clip_val, foreach=True)
            else:
                torch.nn.utils.clip_grad_value_(self.params, self.gradient_clip_val, foreach=True)
        conditional_step(self.optimizer, skip, self._pieces)
        for p in self.params:
            p.grad = None
        if self._pieces is not None:
            self._release(grads)

    def _make_grad_buffers(self, indices: list[int]) -> None:
        # Shaped, typed and placed as the parameters are now (a move or a cast gives them new memory).
        self._grad_buffers = {
            i: torch.empty_like(self.params[i], memory_format=torch.contiguous_format) for i in indices
        }
        self._grad_buffer_ids = {id(b) for b in self._grad_buffers.values()}

    def _release(self, tensors: list[Tensor]) -> None:
        self._pieces.release(t for t in tensors if id(t) not in self._grad_buffer_ids)

    def epoch_end(self) -> None:
        """Step an epoch-interval scheduler."""
        if self._steps_scheduler and self.interval == "epoch":
            self.scheduler.step()

    def to(self, device: torch.device) -> None:
        """Move the stepper's tensors and the optimizer's state to ``device``."""
        if self._pieces is not None:
            self._pieces.clear()
            self._make_grad_buffers(list(self._grad_buffers))
        forget_plan(self.optimizer)  # the state tensors below are replaced
        for name in ("_scale", "_growth_tracker", "_skipped", "_found", "_good"):
            setattr(self, name, getattr(self, name).to(device))
        if self._sums is not None:
            self._sums = [t.to(device) for t in self._sums]
        # torch's non-fused, non-capturable Adam-like optimizers (those with a "capturable" option) keep their step
        # count on the host; everything else, our optimizers' step counts included, follows the params.
        host_steps = "capturable" in self.optimizer.defaults and not any(
            g.get("fused") or g.get("capturable") for g in self.optimizer.param_groups
        )
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and not (key == "step" and host_steps and value.device.type == "cpu"):
                    state[key] = value.to(device)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: optimizer, scheduler, partial window, counters, loss scale."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "accumulated": None if self._sums is None else [t.detach().clone() for t in self._sums],
            "good": self._good.clone(),
            "batches": self.batches,
            "steps": self.steps,
            "skipped": self.skipped.clone(),
            "scale": self._scale.clone(),
            "growth_tracker": self._growth_tracker.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`."""
        device = self.params[0].device
        self.optimizer.load_state_dict(state["optimizer"])
        if self._pieces is not None:
            self._pieces.clear()  # the optimizer's state tensors are new
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        accumulated = state.get("accumulated")
        self._sums = None if accumulated is None else [t.to(device) for t in accumulated]
        self._good = state["good"].to(device)
        self.batches = int(state["batches"])
        self.steps = int(state["steps"])
        self._skipped = state["skipped"].to(device=device, dtype=torch.float32)
        self._scale = state["scale"].to(device)
        self._growth_tracker = state["growth_tracker"].to(device)


def _cuts(params: list[nn.Parameter], optimizer: Optimizer) -> bool:
    """Pieces pay on a GPU (more blocks per kernel) and for the fused Adam(W) step (which takes them)."""
    return params[0].device.type == "cuda" and uses_fused_adam(optimizer)
