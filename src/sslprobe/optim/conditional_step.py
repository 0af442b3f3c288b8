"""Optimizer steps that a device-side flag can cancel, with no host sync."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sslprobe._internals import foreach_add_, foreach_sub_, fused_adam_kernel
from sslprobe.optim._pieces import PieceCache, cut_alike

__all__ = ["captures_safely", "conditional_step", "forget_plan", "uses_fused_adam"]


@torch.no_grad()
def conditional_step(optimizer: Optimizer, skip: Tensor, pieces: PieceCache | None = None) -> None:
    """Step ``optimizer`` unless ``skip`` is non-zero, deciding on the device.

    Reading a flag on the host would stall the GPU once per step; instead the step is computed and then kept or
    discarded element-wise. Three paths, fastest first:

    - :class:`~sslprobe.optim.LARS` and the sweep's optimizer mask their own update (``masked_step(found_inf)``);
    - fused Adam and AdamW (``fused=True``) take ``found_inf`` as ``torch.amp.GradScaler`` passes it;
    - any other optimizer steps on zeroed gradients, then its parameters and tensor state are restored where
      ``skip`` is set. State that the skipped step created is reset to zeros, which is its initial value for
      Adam-like optimizers.

    Args:
        optimizer: the optimizer to step; its parameters' ``.grad`` are set.
        skip: 0-dim tensor on the parameters' device, non-zero to keep everything unchanged.
        pieces: where given, the fused Adam(W) kernel runs on flat pieces of each tensor (views kept in this
            cache), which spreads a single large weight over many GPU blocks; the result is bit-identical.

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adam([w], lr=0.1)
        >>> w.grad = torch.tensor([float("nan"), 1.0])
        >>> conditional_step(opt, torch.tensor(1.0))
        >>> w.data
        tensor([1., 1.])
        >>> w.grad = torch.ones(2)
        >>> conditional_step(opt, torch.tensor(0.0))
        >>> w.data
        tensor([0.9000, 0.9000])
    """
    if getattr(optimizer, "_accepts_found_inf", False):
        optimizer.masked_step(skip)  # type: ignore[attr-defined]  # our own optimizers mask on the device
        return
    # Fused SGD is left out on purpose: a skipped first step leaves its momentum buffer uninitialised.
    if uses_fused_adam(optimizer):
        if not _fused_adam_step(optimizer, skip, pieces):
            optimizer.grad_scale = None  # type: ignore[attr-defined]  # the attributes GradScaler sets
            optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
        return
    _restoring_step(optimizer, skip)


def _fused_adam_step(optimizer: Optimizer, skip: Tensor, pieces: PieceCache | None = None) -> bool:
    """The fused Adam(W) kernel called directly, as ``optimizer.step()`` would with ``found_inf=skip``.

    ``Optimizer.step`` spends a few hundred microseconds of Python per call (hooks, profiling scopes, grouping
    tensors by device); a probe steps every batch, so its step calls the same kernels without that, from a plan
    of the groups and their state tensors made once. Returns False (and does nothing) where the state does not
    exist yet or an option needs the regular path.
    """
    plan = _fused_plan(optimizer)
    if plan is None:
        return False
    for group, params, _, _, _ in plan:
        if isinstance(group["lr"], Tensor) or any(p.grad is None for p in params):
            return False
    found = skip.to(torch.float32)
    # Every group's step counters move in one multi-tensor kernel (and back, for a skipped step, in one more).
    steps = [step for _, _, _, group_steps, _ in plan for step in group_steps]
    foreach_add_(steps, 1)
    for group, params, moments, group_steps, kernel in plan:
        # With a cache: flat pieces of every tensor, so the kernel runs on many blocks (see `cut_alike`). The
        # kernel only reads the step counts, so each piece gets its parameter's counter.
        lists = [params, [p.grad for p in params], *moments]
        counts = [1] * len(params)
        if pieces is not None:
            lists, counts = cut_alike(lists, cache=pieces)
        beta1, beta2 = group["betas"]
        kernel(
            lists[0],
            lists[1],
            lists[2],
            lists[3],
            lists[4] if group["amsgrad"] else [],
            [step for step, count in zip(group_steps, counts) for _ in range(count)],
            amsgrad=group["amsgrad"],
            lr=group["lr"],
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            grad_scale=None,
            found_inf=found,
        )
    foreach_sub_(steps, [found] * len(steps))
    return True


_Plan = list[tuple[dict[str, Any], list[Tensor], list[list[Tensor]], list[Tensor], Callable[..., Any]]]


def _fused_plan(optimizer: Optimizer) -> _Plan | None:
    """Per group: the group, its parameters, their moment tensors, step counts and the kernel; made once.

    Kept with the optimizer's ``state`` object it was read from and the number of parameters of each group:
    ``load_state_dict`` replaces that object, ``add_param_group`` changes the count, and :func:`forget_plan` is
    called where the state tensors move, so a stale plan is never used.
    """
    cached = optimizer.__dict__.get("_sslprobe_fused_plan")
    shape = tuple(len(group["params"]) for group in optimizer.param_groups)  # changed by add_param_group
    if cached is not None and cached[0] is optimizer.state and cached[1] == shape:
        return cached[2]
    plan: _Plan = []
    for group in optimizer.param_groups:
        if group.get("differentiable") or group.get("capturable"):
            return None
        params = list(group["params"])
        states = [optimizer.state.get(p) for p in params]
        if not params:
            continue
        if any(not state for state in states):
            return None  # the first step creates the state: let the optimizer do it
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
        decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
        kernel = fused_adam_kernel(decoupled)
        moments = [[state[key] for state in states] for key in keys]
        plan.append((group, params, moments, [state["step"] for state in states], kernel))
    optimizer.__dict__["_sslprobe_fused_plan"] = (optimizer.state, shape, plan)
    return plan


def forget_plan(optimizer: Optimizer) -> None:
    """Drop the cached plan of :func:`conditional_step` (after the optimizer's state tensors were replaced)."""
    optimizer.__dict__.pop("_sslprobe_fused_plan", None)


def uses_fused_adam(optimizer: Optimizer) -> bool:
    """Whether :func:`conditional_step` steps ``optimizer`` with torch's fused Adam(W) kernel."""
    fused = any(group.get("fused") for group in optimizer.param_groups)
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and fused


def captures_safely(optimizer: Optimizer) -> bool:
    """Whether :func:`conditional_step` on ``optimizer`` can be captured in a CUDA graph and replayed.

    A replay repeats the same kernels on the same memory with the hyperparameters of the capture, so the step
    must change its state in place and read no host value that moves. That holds for the fused Adam(W) kernel
    once its state exists (step counts on the device) and for optimizers that say so (``captures_safely``, as
    :class:`~sslprobe.optim.LARS` does without dampening); the generic path, which rebuilds its state, never.

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> captures_safely(torch.optim.SGD([w], lr=0.1))
        False
    """
    if getattr(optimizer, "_accepts_found_inf", False):
        return bool(getattr(optimizer, "captures_safely", False))
    if not uses_fused_adam(optimizer) or any(isinstance(g["lr"], Tensor) for g in optimizer.param_groups):
        return False
    return _fused_plan(optimizer) is not None


def _restoring_step(optimizer: Optimizer, skip: Tensor) -> None:
    keep = skip == 0
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    zero = torch.zeros((), device=skip.device)
    for p in params:
        p.grad = torch.where(keep, p.grad, zero.to(p.grad.dtype))
    saved_params = [p.detach().clone() for p in params]
    saved_state = {
        p: {k: v.clone() for k, v in optimizer.state[p].items() if isinstance(v, Tensor)}
        for p in params
        if p in optimizer.state
    }
    optimizer.step()
    for p, old in zip(params, saved_params):
        p.copy_(torch.where(keep, p, old))
    for p in params:
        state, old_state = optimizer.state[p], saved_state.get(p, {})
        for key, value in list(state.items()):
            if not isinstance(value, Tensor):
                continue
            before = old_state.get(key)
            # Non-fused, non-capturable Adam keeps its step count on the host: masking it costs a copy of
            # the flag (a sync), which the fused variants that the factories pick avoid.
            state[key] = torch.where(
                keep.to(value.device), value, torch.zeros_like(value) if before is None else before
            )
