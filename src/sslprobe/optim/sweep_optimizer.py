"""SweepOptimizer: one optimizer step for a bank of heads, each with its own learning rate and weight decay."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from sslprobe._internals import foreach_add_, foreach_sub_, fused_adam_kernel, tensor_version

__all__ = ["SweepOptimizer"]

_ALLOWED_KINDS = ("AdamW", "SGD", "LARS")
# Where torch has its fused AdamW kernel (torch >= 2.4); elsewhere the bank's AdamW runs as tensor ops.
_FUSED_DEVICES = ("cuda", "cpu", "xpu", "mps")
_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class SweepOptimizer(Optimizer):
    """AdamW, SGD or LARS over parameters whose first dimension indexes heads, with per-head ``lr``/``weight_decay``.

    A bank of ``H`` linear heads stored as one ``(H, C, D)`` weight trains in a handful of kernels instead of ``H``
    optimizer calls. Every hyper-parameter but the learning rate and weight decay is shared; those two are
    vectors of length ``H`` and act on each head exactly as a separate optimizer with that value would. Weight
    decay applies only to groups with ``decay=True`` (the weights, not the biases). LARS computes one trust ratio
    per head, for groups with ``adapt=True`` (biases get the plain gradient, as ``exclude_bias_n_norm`` does).
    ``step(found_inf=...)`` skips the step on the device, leaving parameters and state unchanged.

    Args:
        params: parameters (or groups; a group may set ``decay=False``, ``adapt=False``), each of shape ``(H, ...)``.
        lrs: learning rates, shape ``(H,)``.
        weight_decays: weight decays, shape ``(H,)``.
        kind: ``"AdamW"``, ``"SGD"`` or ``"LARS"``.
        momentum: SGD/LARS momentum.
        betas: AdamW betas.
        eps: AdamW epsilon, or LARS trust-ratio epsilon.
        eta: LARS trust coefficient.
        clip_lr: LARS: cap the trust ratio at the head's learning rate.

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2, 3))
        >>> opt = SweepOptimizer([w], lrs=[0.1, 1.0], weight_decays=[0.0, 0.0], kind="SGD", momentum=0.0)
        >>> w.grad = torch.ones(2, 3)
        >>> opt.step()
        >>> w.data
        tensor([[0.9000, 0.9000, 0.9000],
                [0.0000, 0.0000, 0.0000]])
    """

    _accepts_found_inf = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lrs: Sequence[float] | Tensor,
        weight_decays: Sequence[float] | Tensor,
        kind: Literal["AdamW", "SGD", "LARS"] = "AdamW",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eta: float = 0.02,
        clip_lr: bool = True,
    ) -> None:
        if kind not in _ALLOWED_KINDS:
            raise ValueError(f"SweepOptimizer: kind must be one of {_ALLOWED_KINDS}, got {kind!r}.")
        # Kept in float64 and rounded once to the parameters' precision (float32 for lower ones), as a Python float
        # hyper-parameter of a separate optimizer would be.
        lrs = torch.as_tensor(lrs, dtype=torch.float64).flatten()
        weight_decays = torch.as_tensor(weight_decays, dtype=torch.float64).flatten()
        if lrs.shape != weight_decays.shape or lrs.numel() == 0:
            raise ValueError(
                f"SweepOptimizer: lrs and weight_decays must have one value per head, got {lrs.numel()} and "
                f"{weight_decays.numel()}."
            )
        if (lrs <= 0).any() or (weight_decays < 0).any():
            raise ValueError("SweepOptimizer: learning rates must be > 0 and weight decays >= 0.")
        defaults = {
            "lrs": lrs,
            "weight_decays": weight_decays,
            "kind": kind,
            "momentum": momentum,
            "betas": betas,
            "eps": eps,
            "eta": eta,
            "clip_lr": clip_lr,
            "decay": True,
            "adapt": True,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.shape[0] != lrs.numel():
                    raise ValueError(
                        f"SweepOptimizer: every parameter's first dimension must index the {lrs.numel()} heads, "
                        f"got shape {tuple(p.shape)}."
                    )

    graph_hint = "use the AdamW sweep (its SGD and LARS kinds run eagerly)"

    def graph_tensors(self) -> list[Tensor]:
        """Tensors a step reads or writes besides the state: scratch updates and the per-head values on the device."""
        scratch = list(self.__dict__.get("_scratch_buffers", {}).values())
        copies = [entry[2] for entry in self.__dict__.get("_device_copies", {}).values()]
        return scratch + [t for value in copies for t in (value if isinstance(value, tuple) else (value,))]

    @property
    def captures_safely(self) -> bool:
        """Whether a step can be replayed from a CUDA graph: AdamW's fused path, once its state exists."""
        return all(
            group["kind"] == "AdamW"
            and p.device.type in _FUSED_DEVICES
            and p.dtype in _FUSED_DTYPES
            and bool(self.state.get(p))
            for group in self.param_groups
            for p in group["params"]
        )

    @torch.no_grad()
    def step(self, closure: Any = None, *, found_inf: Tensor | None = None) -> Any:
        """One step for every head; with ``found_inf`` non-zero, nothing changes (decided on the device)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.masked_step(found_inf)
        return loss

    @torch.no_grad()
    def masked_step(self, found_inf: Tensor | None = None) -> None:
        """The update itself, without ``Optimizer.step``'s hooks (an online probe calls this every batch)."""
        fused: dict[tuple[Any, ...], list[tuple[dict[str, Any], Tensor]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["kind"] == "AdamW" and p.device.type in _FUSED_DEVICES and p.dtype in _FUSED_DTYPES:
                    key = (p.device, p.dtype, tuple(group["betas"]), group["eps"])
                    fused.setdefault(key, []).append((group, p))
                else:
                    self._update(p, group, found_inf)
        for entries in fused.values():
            self._fused_adamw(entries, found_inf)

    def _fused_adamw(self, entries: list[tuple[dict[str, Any], Tensor]], found_inf: Tensor | None) -> None:
        # The heads share every AdamW hyper-parameter but lr and weight decay, and AdamW's moments do not depend
        # on either. So torch's fused kernel runs once over the whole bank with lr=1 and no decay, writing the
        # unit update u = -m_hat / (sqrt(v_hat) + eps) into scratch tensors of (negative) zeros; each head then takes
        # p * (1 - lr * wd) + lr * u. A skipped step (found_inf set) leaves the moments, the step count and the
        # zeroed scratch as they were, and its decay factor is exactly 1: nothing changes, bit for bit. About
        # twelve passes over the bank in six kernels.
        params = [p for _, p in entries]
        states = [self._adam_state(p) for p in params]
        scratch = self._scratch(params)
        for buffer in scratch:
            # Negative zero: x + (-0) is x for every x, -0 included, so a skipped step keeps even the sign of a zero.
            # One fill over the whole GPU each (a multi-tensor zero runs one block per 64K elements).
            buffer.fill_(-0.0)
        steps = [state["step"] for state in states]
        foreach_add_(steps, 1.0)
        group = entries[0][0]
        beta1, beta2 = group["betas"]
        found = None if found_inf is None else found_inf.to(device=params[0].device, dtype=torch.float32)
        fused_adam_kernel(decoupled=True)(
            scratch,
            [p.grad for p in params],
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],
            steps,
            lr=1.0,
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=0.0,
            eps=float(group["eps"]),
            amsgrad=False,
            maximize=False,
            grad_scale=None,
            found_inf=found,
        )
        if found is not None:
            foreach_sub_(steps, [found] * len(steps))
        keep = None if found is None else found == 0
        for (group, p), update in zip(entries, scratch):
            view = (-1,) + (1,) * (p.ndim - 1)
            lr = self._on_device(group, "lrs", p).view(view)
            if group["decay"]:
                ones, lr_wd = self._decay_terms(group, p)
                # 1 - lr * wd, or exactly 1 for a skipped step.
                factor = torch.addcmul(ones, lr_wd, torch.ones_like(ones) if keep is None else keep, value=-1.0)
                p.mul_(factor.view(view))
            p.addcmul_(update, lr)

    def _adam_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _scratch(self, params: list[Tensor]) -> list[Tensor]:
        # Not optimizer state (it holds nothing between steps), so it stays out of the state_dict.
        cache = self.__dict__.setdefault("_scratch_buffers", {})
        out = []
        for p in params:
            buffer = cache.get(p)
            if buffer is None or buffer.device != p.device or buffer.shape != p.shape:
                buffer = cache[p] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            out.append(buffer)
        return out

    def _decay_terms(self, group: dict[str, Any], p: Tensor) -> tuple[Tensor, Tensor]:
        def make() -> tuple[Tensor, Tensor]:
            lr_wd = (group["lrs"] * group["weight_decays"]).to(p.device, _math_dtype(p))
            return torch.ones_like(lr_wd), lr_wd

        return self._device_copy("lr_wd", (group["lrs"], group["weight_decays"]), p, make)

    def _on_device(self, group: dict[str, Any], key: str, p: Tensor) -> Tensor:
        return self._device_copy(key, (group[key],), p, lambda: group[key].to(p.device, _math_dtype(p)))

    def _device_copy(self, name: str, sources: tuple[Tensor, ...], p: Tensor, make: Callable[[], Any]) -> Any:
        # A host-to-device copy of the per-head values every step would sync: keep one per device and precision
        # (off the param groups, so the state_dict stays plain). It is made again when a source was edited in
        # place (lrs.mul_); the entry holds its sources, so their ids cannot be reused while it stands.
        cache = self.__dict__.setdefault("_device_copies", {})
        tag = (name, p.device, _math_dtype(p), *map(id, sources))
        versions = tuple(map(tensor_version, sources))
        entry = cache.get(tag)
        if entry is None or entry[1] != versions:
            entry = cache[tag] = (sources, versions, make())
        return entry[2]

    @staticmethod
    def _adamw(
        p: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        lr: Tensor,
        wd: Tensor | None,
        keep: Tensor | None,
    ) -> None:
        # In place and written so that a skipped step (keep False, grad zeroed) changes nothing, bit for bit:
        # lerp with weight 0 returns its start, a multiply by 1 and an added 0 are exact, a zero step size moves
        # nothing. About ten passes over the weights, where copying and masking new tensors would take twice that.
        beta1, beta2 = group["betas"]
        kept = torch.ones((), device=p.device) if keep is None else keep.to(torch.float32)
        step = state["step"].add_(kept)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, kept * (1 - beta1))
        exp_avg_sq.mul_(torch.where(kept > 0, beta2, 1.0)).addcmul_(grad, grad, value=1 - beta2)
        # In float64 as torch's kernels do (1 - 0.999 loses four digits in float32), and clamped so that a skipped
        # very first step (step 0) divides nothing by zero.
        wide = step.double()
        bias1 = (1 - beta1**wide).clamp_(min=1e-30).to(p.dtype)
        bias2 = (1 - beta2**wide).clamp_(min=1e-30).to(p.dtype)
        denom = (exp_avg_sq / bias2).sqrt_().add_(group["eps"])
        step_size = lr * (kept / bias1)  # (H, 1, ...)
        if wd is not None:
            p.mul_(1 - lr * wd * kept)
        p.sub_(step_size * exp_avg / denom)

    def _update(self, p: Tensor, group: dict[str, Any], found_inf: Tensor | None) -> None:
        view = (-1,) + (1,) * (p.ndim - 1)
        lr = self._on_device(group, "lrs", p).view(view)
        wd = self._on_device(group, "weight_decays", p).view(view) if group["decay"] else None
        keep = None if found_inf is None else (found_inf == 0)
        grad = p.grad if keep is None else torch.where(keep, p.grad, torch.zeros((), device=p.device, dtype=p.dtype))
        state = self.state[p]
        kind = group["kind"]
        if kind == "AdamW":
            self._adamw(p, grad, self._adam_state(p), group, lr, wd, keep)
            return
        else:
            direction = grad
            if kind == "LARS" and group["adapt"]:
                p_norm = p.flatten(1).norm(dim=1).view(view)
                g_norm = grad.flatten(1).norm(dim=1).view(view)
                wd_ = wd if wd is not None else torch.zeros_like(lr)
                trust = group["eta"] * p_norm / (g_norm + wd_ * p_norm + group["eps"])
                if group["clip_lr"]:
                    trust = torch.clamp(trust / lr, max=1.0)
                adapted = (grad + wd_ * p) * trust
                direction = torch.where((p_norm > 0) & (g_norm > 0), adapted, grad)
            elif kind == "SGD" and wd is not None:
                direction = grad + wd * p
            updates = {}
            if group["momentum"]:
                buf = state.get("momentum_buffer")
                started = state.get("momentum_started", torch.zeros((), dtype=torch.bool, device=p.device))
                blended = direction if buf is None else buf * group["momentum"] + direction
                candidate = torch.where(started, blended, direction)
                direction = candidate
                updates = {
                    "momentum_buffer": candidate,
                    "momentum_started": started | (True if keep is None else keep),
                }
            new_p = p - lr * direction
        if keep is None:
            p.copy_(new_p)
            state.update(updates)
            return
        p.copy_(torch.where(keep, new_p, p))
        for key, value in updates.items():
            old = state.get(key)
            state[key] = value if old is None else torch.where(keep, value, old)


def _math_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32
