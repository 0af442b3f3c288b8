"""LARS: layer-wise adaptive rate scaling.

- [0] You, Gitman, Ginsburg, 2017, https://arxiv.org/abs/1708.03888
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sslprobe._internals import foreach_add, foreach_add_, foreach_mul, foreach_mul_, foreach_norm

__all__ = ["LARS"]


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling (LARS), SGD with a per-parameter trust ratio.

    For a parameter ``p`` with gradient ``g`` that is adapted (every parameter, or only those with more than one
    dimension when ``exclude_bias_n_norm``) and whose ``||p||`` and ``||g||`` are both non-zero, the trust ratio is
    ``t = eta * ||p|| / (||g|| + weight_decay * ||p|| + eps)`` (with ``clip_lr``: ``t = min(t / lr, 1)``) and the
    direction ``d = (g + weight_decay * p) * t``. Any other parameter uses ``d = g`` (no weight decay, no scaling).
    Then momentum as in SGD (``buf = momentum * buf + (1 - dampening) * d``, Nesterov if asked) and
    ``p -= lr * d``.

    Every computation stays on the parameters' device: no host sync, so it can run inside a step that must not
    stall the GPU. ``step(found_inf=...)`` takes a 0-dim tensor; where it is non-zero the step leaves the
    parameters and the momentum buffers exactly as they were (how an online probe skips a non-finite batch).

    - [0] You, Gitman, Ginsburg, 2017, https://arxiv.org/abs/1708.03888

    Args:
        params: parameters or parameter groups.
        lr: learning rate, > 0.
        momentum: momentum factor, >= 0.
        dampening: dampening for momentum.
        weight_decay: weight decay, >= 0, folded into the adapted direction only.
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        eta: trust coefficient, > 0.
        clip_lr: cap the trust ratio so that the effective rate never exceeds ``lr``.
        exclude_bias_n_norm: do not adapt parameters with fewer than two dimensions (biases, norm scales).
        eps: added to the trust-ratio denominator, >= 0.

    Raises:
        ValueError: for a value out of range.

    Examples:
        >>> import torch
        >>> from sslprobe.optim import LARS
        >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
        >>> opt = LARS([w], lr=1.0, eta=0.1)
        >>> w.grad = torch.tensor([[0.0, 1.0]])
        >>> opt.step()
        >>> w.data
        tensor([[3.0000, 3.5000]])
    """

    _accepts_found_inf = True  # conditional_step calls masked_step(found_inf) directly

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        eta: float = 1e-3,
        clip_lr: bool = False,
        exclude_bias_n_norm: bool = False,
        eps: float = 1e-8,
    ) -> None:
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise ValueError(f"LARS: lr must be a positive number, got {lr!r}.")
        if momentum < 0:
            raise ValueError(f"LARS: momentum must be >= 0, got {momentum!r}.")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay!r}.")
        if eta <= 0:
            raise ValueError(f"LARS: eta must be > 0, got {eta!r}.")
        if eps < 0:
            raise ValueError(f"LARS: eps must be >= 0, got {eps!r}.")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"LARS: nesterov needs momentum > 0 and dampening == 0, got momentum={momentum!r}, "
                f"dampening={dampening!r}."
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "eta": eta,
            "clip_lr": clip_lr,
            "exclude_bias_n_norm": exclude_bias_n_norm,
            "eps": eps,
        }
        super().__init__(params, defaults)

    @property
    def captures_safely(self) -> bool:
        """Whether a step can be replayed from a CUDA graph: every momentum buffer exists and changes in place."""
        for group in self.param_groups:
            if group["momentum"] == 0:
                continue
            if group["dampening"] != 0 or any(self.state[p].get("momentum_buffer") is None for p in group["params"]):
                return False
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, found_inf: Tensor | None = None) -> Tensor | None:
        """Performs one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
            found_inf: optional 0-dim tensor; where it is non-zero, nothing changes (no host sync).

        Returns:
            The closure's loss, if a closure was given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.masked_step(found_inf)
        return loss

    @torch.no_grad()
    def masked_step(self, found_inf: Tensor | None = None) -> None:
        """The update itself, without ``Optimizer.step``'s hooks (an online probe calls this every batch).

        All parameters of a group are updated with a few multi-tensor (``torch._foreach_*``) kernels: the norms of
        every parameter and gradient at once, the trust ratios as one small vector, one multiply, one update.
        """
        keep = None if found_inf is None else (found_inf == 0)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if keep is not None:
                # A masked-out step may carry NaN gradients: zero them, so every later quantity is finite and a
                # zero direction leaves the parameters exactly as they were.
                zero = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
                grads = [torch.where(keep, g, zero) for g in grads]
            directions = self._directions(params, grads, group)
            if group["momentum"] != 0 and group["dampening"] == 0:
                directions = self._undamped_momentum(params, directions, group, keep)
            elif group["momentum"] != 0:
                directions = [self._momentum(p, d, group, keep) for p, d in zip(params, directions)]
            foreach_add_(params, directions, alpha=-group["lr"])

    def _directions(self, params: list[Tensor], grads: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        adapted = [i for i, p in enumerate(params) if p.ndim > 1 or not group["exclude_bias_n_norm"]]
        if not adapted:
            return grads
        lr, wd, eta, eps = group["lr"], group["weight_decay"], group["eta"], group["eps"]
        n = len(adapted)
        # One multi-tensor kernel for every norm, then the trust ratios as one small vector: a handful of kernel
        # launches whatever the number of parameters (a probe steps every batch; launches are its cost).
        norms = torch.stack(foreach_norm([params[i] for i in adapted] + [grads[i] for i in adapted]))
        p_norm, g_norm = norms[:n], norms[n:]  # (A,), (A,)
        denominator = g_norm + wd * p_norm + eps if wd != 0 else g_norm + eps
        if not group["clip_lr"]:
            trust = eta * p_norm / denominator
        elif lr > 0:
            trust = ((eta / lr) * p_norm / denominator).clamp_(max=1.0)  # min(t / lr, 1)
        else:
            # A schedule that reached 0 (then a second fit, or a resume with more epochs): min(t / lr, 1) tends to 1
            # as lr -> 0, and the step lr * d is zero anyway; momentum buffers still follow the gradient.
            trust = torch.ones_like(p_norm)
        use = (p_norm * g_norm) > 0  # both norms non-zero (norms are >= 0)
        # d = (g + wd * p) * t where both norms are non-zero, else g: one scale factor per parameter.
        scale = torch.where(use, trust, 1.0)
        directions = list(grads)
        picked = [grads[i] for i in adapted]
        if wd != 0:
            decay = torch.where(use, wd, 0.0).to(trust.dtype)
            picked = foreach_add(picked, foreach_mul([params[i] for i in adapted], list(decay.unbind())))
        for i, d in zip(adapted, foreach_mul(picked, list(scale.unbind()))):
            directions[i] = d
        return directions

    def _undamped_momentum(
        self, params: list[Tensor], directions: list[Tensor], group: dict[str, Any], keep: Tensor | None
    ) -> list[Tensor]:
        # Without dampening, a buffer that starts at zero gives SGD's first step exactly (0 * m + d = d), so no
        # "started" flag is needed, and every buffer moves in two multi-tensor kernels. A skipped step has d = 0
        # exactly (its gradients were zeroed), so a momentum factor of 1 leaves the buffers bit for bit.
        momentum = group["momentum"]
        buffers = []
        for p in params:
            state = self.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        # The factor as a tensor in the buffers' precision: a float32 0.9 would round a float64 buffer's step.
        factor: float | Tensor = momentum
        if keep is not None:
            dtype = torch.float64 if any(b.dtype == torch.float64 for b in buffers) else torch.float32
            factor = torch.where(keep, torch.full((), momentum, dtype=dtype, device=keep.device), 1.0)
        foreach_mul_(buffers, factor)
        foreach_add_(buffers, directions)
        steps = foreach_add(directions, buffers, alpha=momentum) if group["nesterov"] else list(buffers)
        if keep is None:
            return steps
        zero = torch.zeros((), dtype=steps[0].dtype, device=steps[0].device)
        return [torch.where(keep, step, zero) for step in steps]  # a skip moves nothing

    def _momentum(self, p: Tensor, direction: Tensor, group: dict[str, Any], keep: Tensor | None) -> Tensor:
        momentum, dampening = group["momentum"], group["dampening"]
        state = self.state[p]
        buf = state.get("momentum_buffer")
        started = state.get("momentum_started")
        if keep is None and started is None:
            # The plain SGD path: the first step copies the direction, later ones blend it in.
            buf = direction.clone() if buf is None else buf.mul_(momentum).add_(direction, alpha=1 - dampening)
        else:
            # A step that may be masked out on the device: a skipped first step must leave the buffer
            # "not started", so the next real step still copies the direction as SGD would.
            if buf is None:
                buf = torch.zeros_like(direction)
                started = torch.zeros((), dtype=torch.bool, device=direction.device)
            elif started is None:
                started = torch.ones((), dtype=torch.bool, device=direction.device)
            blended = buf.mul(momentum).add_(direction, alpha=1 - dampening)
            candidate = torch.where(started, blended, direction)
            if keep is None:
                buf, started = candidate, torch.ones_like(started)
            else:
                # torch.where keeps both branches bit-exact; arithmetic masks would round.
                buf = torch.where(keep, candidate, buf)
                started = started | keep
            state["momentum_started"] = started
        state["momentum_buffer"] = buf
        step = direction.add(buf, alpha=momentum) if group["nesterov"] else buf
        if keep is not None:
            step = torch.where(
                keep, step, torch.zeros((), dtype=step.dtype, device=step.device)
            )  # a skip moves nothing
        return step
