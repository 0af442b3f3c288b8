"""ProbeSweep: a bank of linear probes over a learning-rate x weight-decay grid, trained as one computation."""

from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from sslprobe._batch import Locator
from sslprobe._metrics import (
    STAGE_KEY,
    STAGE_PREFIX,
    InPlaceReset,
    MetricsSpec,
    normalize_metrics,
)
from sslprobe.callbacks.base import check_name
from sslprobe.callbacks.online_probe import OnlineProbe
from sslprobe.optim.sweep_optimizer import SweepOptimizer
from sslprobe.probes.linear_bank import LinearHeadBank

__all__ = ["ProbeSweep"]

_ALLOWED_KINDS = ("AdamW", "SGD", "LARS")
# Default grids: eight learning rates around each optimizer's usual value, with and without weight decay.
_DEFAULT_LRS = {
    "AdamW": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "SGD": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0),
    "LARS": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0),
}
_DEFAULT_WEIGHT_DECAYS = (0.0, 5e-4)
# What the heads of each kind of sweep share (SweepOptimizer's arguments besides the per-head lrs/weight decays).
_SHARED_KWARGS = {"AdamW": ("betas", "eps"), "SGD": ("momentum",), "LARS": ("momentum", "eta", "clip_lr", "eps")}


class HeadsTop1(InPlaceReset):
    """Top-1 accuracy of every head at once: logits ``(H, B, C)``, targets ``(B,)``; ``compute()`` is ``(H,)``.

    As :class:`~sslprobe._metrics.Top1Accuracy`, targets equal to ``ignore_index`` are left out and soft targets
    ``(B, C)`` count by their most likely class.
    """

    full_state_update = False
    updates_in_place = True  # its update can be replayed from a CUDA graph (see `capturable_metric`)
    higher_is_better = True
    correct: Tensor
    total: Tensor

    def __init__(self, num_heads: int, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("correct", default=torch.zeros(num_heads, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        if target.is_floating_point() and target.ndim == 2:
            target = target.argmax(dim=-1)  # class probabilities
        labelled = target != self.ignore_index  # (B,): unlabelled samples count neither way
        self.correct.add_(((logits.argmax(dim=-1) == target) & labelled).sum(dim=-1))
        self.total.add_(labelled.sum())

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class PerHead(nn.Module):
    """``H`` copies of a user metric, updated from logits ``(H, B, C)``; ``compute()`` stacks them to ``(H,)``."""

    def __init__(self, metric: Metric, num_heads: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(copy.deepcopy(metric) for _ in range(num_heads))
        self.higher_is_better = getattr(metric, "higher_is_better", True)

    @property
    def update_called(self) -> bool:
        return self.heads[0].update_called

    def update(self, logits: Tensor, target: Tensor) -> None:
        for head, head_logits in zip(self.heads, logits):
            head.update(head_logits, target)

    def compute(self) -> Tensor:
        return torch.stack([head.compute().float().reshape(()) for head in self.heads])

    def reset(self) -> None:
        for head in self.heads:
            head.reset()


def _label(value: float) -> str:
    return f"{value:g}"


def _grid_values(values: Any, arg: str, owner: str) -> list[float]:
    """``values`` of the ``lrs`` or ``weight_decays`` grid as floats, checked: finite, distinct, > 0 (lrs), >= 0."""
    example = "lrs=[1e-3, 1e-2]" if arg == "lrs" else "weight_decays=[0.0, 5e-4]"
    if isinstance(values, numbers.Number) or (isinstance(values, Tensor) and values.ndim == 0):
        raise TypeError(
            f"{owner}: {arg} must be a list of numbers, got the single number {values!r}. Give a list even for one "
            f"value: {arg}=[{values!r}]."
        )
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise TypeError(
            f"{owner}: {arg} must be a list of numbers, got {values!r} ({type(values).__name__}). Use e.g. {example}."
        )
    floats = []
    for i, value in enumerate(values):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"{owner}: {arg} must hold numbers, got {value!r} ({type(value).__name__}) at index {i}. Use e.g. "
                f"{example}."
            )
        value = float(value)
        if not math.isfinite(value) or value < 0 or (arg == "lrs" and value == 0):
            raise ValueError(
                f"{owner}: learning rates must be > 0 and weight decays >= 0, all finite; {arg} holds {value!r} at "
                f"index {i}. Use e.g. {example}."
            )
        floats.append(value)
    if not floats:
        raise ValueError(
            f"{owner}: lrs and weight_decays must each hold at least one value; {arg} is empty. Use e.g. {example}, "
            "or None for the default."
        )
    repeated = sorted({v for v in floats if floats.count(v) > 1})
    if repeated:
        raise ValueError(
            f"{owner}: {arg} holds {', '.join(map(_label, repeated))} more than once; every head of the grid needs its "
            "own value (and log name). Give each value once."
        )
    return floats


def build_sweep_optimizer(
    params: list[nn.Parameter], *, lrs: list[float], weight_decays: list[float], kind: str, **shared: Any
) -> SweepOptimizer:
    """The :class:`SweepOptimizer` of a bank's parameters: the weights ``(H, C, D)`` decay, the biases do not."""
    weights = [p for p in params if p.ndim == 3]
    biases = [p for p in params if p.ndim != 3]
    groups = [{"params": weights}, {"params": biases, "decay": False, "adapt": False}]
    return SweepOptimizer([g for g in groups if g["params"]], lrs=lrs, weight_decays=weight_decays, kind=kind, **shared)


class ProbeSweep(OnlineProbe):
    """A hyper-parameter sweep of linear probes, trained together as one computation.

    Each head of a :class:`~sslprobe.probes.linear_bank.LinearHeadBank` is a :class:`~sslprobe.probes.LinearProbe`
    with its own learning rate and weight decay from the grid ``lrs x weight_decays``. The bank runs as one
    matmul, one loss and one :class:`~sslprobe.optim.sweep_optimizer.SweepOptimizer` step: on an H200 with
    ResNet-50 features (2048 -> 100), 16 heads cost 0.3 ms a step, less than two single ``LinearProbe`` (0.17 ms each).
    At every validation the best head (highest first eval metric; lowest
    when the metric says lower is better) is reported under the probe's usual names, as DINOv2's linear evaluation
    does:

    - ``train/{name}_loss`` (per step, the best head), ``train/{name}_{metric}`` (per epoch, the best head);
    - ``eval/{name}_{metric}``, ``test/{name}_{metric}`` (the best head), ``eval/{name}_best_lr``,
      ``eval/{name}_best_wd``;
    - every head: ``eval/{name}_lr{lr}_wd{wd}_{metric}`` and, per epoch, ``train/{name}_lr{lr}_wd{wd}_loss``.

    Args:
        module: the LightningModule to probe.
        name: unique id on that module.
        input: where the features are (as for :class:`OnlineProbe`).
        target: where the integer labels are.
        num_classes: number of classes.
        lrs: learning rates of the grid; default eight values around the optimizer's usual one.
        weight_decays: weight decays of the grid; default ``(0, 5e-4)``.
        optimizer: ``"AdamW"`` (default), ``"SGD"`` or ``"LARS"``, or ``{"type": ..., **shared_kwargs}``
            (``momentum``, ``betas``, ``eps``, ``eta``, ``clip_lr``).
        metrics: as for :class:`OnlineProbe`; each metric is tracked for every head. ``None`` tracks top-1
            accuracy (``top1``) for all heads in one vectorised update.
        cuda_graph: as for :class:`OnlineProbe`: on a GPU the whole sweep's step (the bank, the heads' losses,
            the AdamW update of every head, the top-1 counts) is replayed from a CUDA graph; the SGD and LARS
            sweeps run eagerly.
        precision: as for :class:`OnlineProbe`: ``None`` follows the Trainer's mixed precision (the bank's forward
            under its autocast, float32 weights and update); ``"32"``: no autocast.

    Raises:
        ValueError: for an empty grid, a repeated, non-finite or non-positive value in it, or an unknown optimizer.
        TypeError: for a grid that is not a list of numbers, or an optimizer dict with ``lr``/``weight_decay`` or a
            keyword its kind does not take.

    Examples:
        >>> import torch
        >>> from sslprobe import Module
        >>> model = Module(forward=lambda self, b, stage: {"h": self.net(b[0])}, net=torch.nn.Linear(4, 8))
        >>> sweep = ProbeSweep(model, "sweep", "h", 1, num_classes=3, lrs=[0.01, 0.1], weight_decays=[0.0])
        >>> sweep.head_labels
        ['lr0.01_wd0', 'lr0.1_wd0']
    """

    def __init__(
        self,
        module: pl.LightningModule | None = None,
        name: str | None = None,
        input: Locator | None = None,
        target: Locator | None = None,
        num_classes: int | None = None,
        lrs: Sequence[float] | None = None,
        weight_decays: Sequence[float] | None = None,
        optimizer: str | Mapping[str, Any] | None = None,
        metrics: MetricsSpec = None,
        cuda_graph: bool | None = None,
        precision: Literal["32", "32-true", "bf16-mixed", "16-mixed"] | None = None,
    ) -> None:
        name = check_name(name, type(self).__name__)
        owner = f"{type(self).__name__}(name={name!r})"
        kind, shared = self._parse_optimizer(optimizer, owner)
        lrs = _grid_values(_DEFAULT_LRS[kind] if lrs is None else lrs, "lrs", owner)
        weight_decays = _grid_values(
            _DEFAULT_WEIGHT_DECAYS if weight_decays is None else weight_decays, "weight_decays", owner
        )
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"{owner}: num_classes must be a positive int, got {num_classes!r}.")
        grid = [(lr, wd) for lr in lrs for wd in weight_decays]
        num_heads = len(grid)
        # A partial of a module-level function, not a closure: the callback pickles (ddp_spawn, torch.save).
        build_optimizer = functools.partial(
            build_sweep_optimizer,
            lrs=[lr for lr, _ in grid],
            weight_decays=[wd for _, wd in grid],
            kind=kind,
            **shared,
        )

        super().__init__(
            module,
            name,
            input,
            target,
            probe=LinearHeadBank(num_heads, num_classes),
            optimizer=build_optimizer,
            metrics=metrics,
            cuda_graph=cuda_graph,
            precision=precision,
        )
        self.lrs, self.weight_decays, self.num_classes = lrs, weight_decays, num_classes
        self.grid = grid
        self.head_labels = [f"lr{_label(lr)}_wd{_label(wd)}" for lr, wd in grid]
        self.optimizer_kind, self.optimizer_kwargs = kind, shared
        self._best = 0
        self._head_loss_sum: Tensor | None = None  # every head's loss summed over the epoch, then their count
        self._head_loss_count = 0
        self._last_head_losses: Tensor | None = None

    @override
    def build_metrics(self, probe: nn.Module) -> nn.ModuleDict:
        """Each metric for every head of the bank: top-1 in one vectorised update by default."""
        return nn.ModuleDict(
            {
                STAGE_KEY[split]: nn.ModuleDict(
                    {"top1": HeadsTop1(probe.num_heads)}
                    if self.metrics is None
                    else {key: PerHead(metric, probe.num_heads) for key, metric in named.items()}
                )
                for split, named in normalize_metrics(self.metrics, self._owner).items()
            }
        )

    @staticmethod
    def _parse_optimizer(optimizer: Any, owner: str) -> tuple[str, dict[str, Any]]:
        if optimizer is None:
            return "AdamW", {}
        if isinstance(optimizer, str):
            kind, shared = optimizer, {}
        elif isinstance(optimizer, Mapping):
            shared = dict(optimizer)
            kind = shared.pop("type", "AdamW")
        else:
            raise TypeError(f"{owner}: optimizer must be None, a name or a dict, got {type(optimizer).__name__}.")
        matches = [k for k in _ALLOWED_KINDS if k.lower() == str(kind).lower()]
        if not matches:
            raise ValueError(f"{owner}: optimizer must be one of {_ALLOWED_KINDS}, got {kind!r}.")
        kind = matches[0]
        for key, grid in (("lr", "lrs"), ("lrs", "lrs"), ("weight_decay", "weight_decays")):
            if key in shared:
                value = shared[key]
                values = repr(list(value)) if isinstance(value, (list, tuple)) else f"[{value!r}]"
                raise TypeError(
                    f"{owner}: the optimizer dict sets {key!r}={value!r}, but every head takes its own from the grid: "
                    f"pass {grid}={values} (or several values) instead, and leave {key!r} out of optimizer=."
                )
        unknown = sorted(set(shared) - set(_SHARED_KWARGS[kind]))
        if unknown:
            raise TypeError(
                f"{owner}: the {kind} sweep takes no {', '.join(map(repr, unknown))}; its optimizer dict accepts "
                f"{', '.join(map(repr, _SHARED_KWARGS[kind]))} (all heads share them; lr and weight decay come from "
                "lrs= and weight_decays=)."
            )
        return kind, shared

    @property
    def best_head(self) -> int:
        """Index of the head reported under the probe's own names (chosen at the latest validation)."""
        return self._best

    @override
    def compute_probe_loss(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The sum of the heads' losses (which gives every head exactly its own gradient), and each head's."""
        h, b, c = preds.shape  # the bank's (H, B, C) logits, a view of a contiguous (B, H, C) tensor
        by_sample = preds.transpose(0, 1).reshape(b * h, c)
        if target.is_floating_point():  # class probabilities (B, C)
            targets = target.unsqueeze(1).expand(b, h, c).reshape(b * h, c)
            per_head = F.cross_entropy(by_sample, targets, reduction="none").view(b, h).mean(0)
        else:
            targets = target.unsqueeze(1).expand(b, h).reshape(b * h)
            # The mean over labelled samples (as cross-entropy's own mean): NaN, so skipped, when none is labelled.
            labelled = (target != -100).sum()
            per_head = F.cross_entropy(by_sample, targets, reduction="none").view(b, h).sum(0) / labelled
        detached = per_head.detach()
        kept = self._head_loss_sum
        if kept is None or (kept.shape[0], kept.device, kept.dtype) != (h + 1, detached.device, detached.dtype):
            # Every head's loss summed over the epoch's finite batches, then their count: (H + 1,)
            self._head_loss_sum = detached.new_zeros(h + 1)  # (a capture comes after eager warm-up steps)
        finite = torch.isfinite(detached).all()  # a skipped batch adds nothing to the epoch's means
        zero = torch.zeros((), dtype=detached.dtype, device=detached.device)
        # In place: a CUDA graph replay adds into the same tensor.
        self._head_loss_sum.add_(torch.cat([torch.where(finite, detached, zero), finite.to(detached.dtype)[None]]))
        return per_head.sum(), detached

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the per-head training losses afresh (on the device this fit runs on)."""
        super().on_train_start(trainer, pl_module)
        self._head_loss_sum, self._head_loss_count = None, 0

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
        super().finish_step(trainer, pl_module, outputs, batch, inputs, extras, shared)
        self._last_head_losses = extras[1]  # read by logged_loss in this step only
        self._head_loss_count += 1

    @override
    def collect_step_state(self, pl_module: pl.LightningModule) -> tuple[dict, dict, list[Tensor]]:
        modules, metrics, tensors = super().collect_step_state(pl_module)
        return modules, metrics, tensors if self._head_loss_sum is None else [*tensors, self._head_loss_sum]

    @override
    def logged_loss(self, loss: Tensor, extras: Any) -> Tensor:
        return extras[1][self._best]

    @override
    def head_predictions(self, preds: Tensor) -> Tensor:
        # One head of the bank's (H, B, C) view is strided: a contiguous (B, C) tensor, as a probe gives.
        return preds[self._best].contiguous() if preds.ndim == 3 else preds

    @override
    def log_metrics(self, pl_module: pl.LightningModule, split: str, loader: int, suffix: str, values: dict) -> None:
        """Log the best head's values under the probe's names, and (in evaluation) every head's under its own.

        The best head is chosen at each validation on the first loader's first metric, and reported on every loader.
        """
        values = {key: value.reshape(-1) for key, value in values.items()}  # (H,); one head's is a scalar
        if split == "val" and loader == 0 and values:
            first_key = next(iter(values))
            metric = pl_module.callbacks_metrics[self.name][STAGE_KEY[split]][first_key]
            higher = getattr(metric, "higher_is_better", True)
            self._best = int(values[first_key].argmax() if higher is not False else values[first_key].argmin())
            lr, wd = self.grid[self._best]
            pl_module.log(f"eval/{self.name}_best_lr", float(lr), on_step=False, on_epoch=True)
            pl_module.log(f"eval/{self.name}_best_wd", float(wd), on_step=False, on_epoch=True)
        super().log_metrics(pl_module, split, loader, suffix, {key: v[self._best] for key, v in values.items()})
        if split != "train":
            for key, heads in values.items():
                for label, value in zip(self.head_labels, heads):
                    pl_module.log(
                        f"{STAGE_PREFIX[split]}/{self.name}_{label}_{key}{suffix}",
                        value,
                        on_step=False,
                        on_epoch=True,
                        add_dataloader_idx=False,
                    )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's metrics and every head's mean training loss, ``train/{name}_lr{lr}_wd{wd}_loss``."""
        super().on_train_epoch_end(trainer, pl_module)
        if self._head_loss_sum is not None and self._head_loss_count:
            sums = self._head_loss_sum
            if bool(sums[-1] > 0):  # one sync per epoch: an epoch of skipped batches has no mean loss
                means = sums[:-1] / sums[-1]
                for label, value in zip(self.head_labels, means):
                    pl_module.log(f"train/{self.name}_{label}_loss", value, on_step=False, on_epoch=True)
            self._head_loss_sum.zero_()  # in place, as a CUDA graph adds into it
            self._head_loss_count = 0

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["best_head"] = self._best
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self._best = int(state.pop("best_head", 0))
        super().load_state_dict(state)
