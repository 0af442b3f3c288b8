"""Metric forms accepted by the callbacks, normalised to named torchmetrics objects, and the default top-1."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from sslprobe._containers import is_reserved_key
from sslprobe._distributed import all_reduce_sum_, world_size
from sslprobe._internals import metric_state_names

warning_cache = WarningCache()

__all__ = [
    "STAGE_KEY",
    "STAGE_PREFIX",
    "InPlaceReset",
    "MetricsSpec",
    "Top1Accuracy",
    "capturable_metric",
    "computed_loader_metrics",
    "evaluated_loaders",
    "loader_metrics",
    "loader_suffix",
    "log_loader_metrics",
    "log_split_values",
    "metric_states",
    "normalize_metrics",
    "reset_metric",
    "snake_case",
]

MetricsSpec = Metric | Sequence[Metric] | Mapping[str, Any] | None
_SPLIT_KEYS = ("train", "val")
#: Log prefix of each split.
STAGE_PREFIX = {"train": "train", "val": "eval", "test": "test"}
#: Keys inside ``callbacks_metrics[name]``: Lightning's stage names ("train" would clash with ``nn.Module.train``).
STAGE_KEY = {"train": "fit", "val": "validate", "test": "test"}


def reset_metric(metric: torch.nn.Module) -> None:
    """Reset outside inference mode: states made under Lightning's evaluation could not be updated later."""
    with torch.inference_mode(False):
        metric.reset()


def loader_metrics(container: torch.nn.ModuleDict, split: str, loader: int = 0) -> torch.nn.ModuleDict:
    """The metrics of evaluation loader ``loader`` of ``split`` in a probe's ``callbacks_metrics[name]``.

    Loader 0's are ``container[STAGE_KEY[split]]``; another loader's are fresh copies of them, made at its first
    batch and kept beside them (so they move with the module), so that two validation sets never mix.

    Examples:
        >>> container = torch.nn.ModuleDict({"validate": torch.nn.ModuleDict({"top1": Top1Accuracy()})})
        >>> sorted(loader_metrics(container, "val", 1)), sorted(container)
        (['top1'], ['validate', 'validate_1'])
    """
    key = STAGE_KEY[split] if loader == 0 else f"{STAGE_KEY[split]}_{loader}"
    if key not in container:
        with torch.inference_mode(False):  # (made during an evaluation) as the originals, outside inference mode
            copied = copy.deepcopy(container[STAGE_KEY[split]])
            for metric in copied.values():
                reset_metric(metric)
        container[key] = copied
    return container[key]


def evaluated_loaders(container: torch.nn.ModuleDict, split: str) -> list[tuple[int, torch.nn.ModuleDict]]:
    """``(loader, metrics)`` of every loader of ``split`` that :func:`loader_metrics` has made, loader 0 first."""
    base = STAGE_KEY[split]
    found = [(0, container[base])] if base in container else []
    for key in container:
        head, _, index = key.rpartition("_")
        if head == base and index.isdigit():
            found.append((int(index), container[key]))
    return sorted(found, key=lambda item: item[0])


def loader_suffix(trainer: Any, split: str, loader: int) -> str:
    """``/dataloader_idx_{loader}`` (Lightning's own suffix) when ``split`` has several loaders, else ``""``.

    Examples:
        >>> from types import SimpleNamespace
        >>> loader_suffix(SimpleNamespace(num_val_batches=[4, 2]), "val", 1), loader_suffix(None, "train", 0)
        ('/dataloader_idx_1', '')
    """
    return f"/dataloader_idx_{loader}" if _loader_count(trainer, split) > 1 else ""


def _loader_count(trainer: Any, split: str) -> int:
    """How many loaders the Trainer runs for ``split`` (1 for training, or when it cannot say)."""
    counts = {"val": "num_val_batches", "test": "num_test_batches"}.get(split)
    batches = getattr(trainer, counts, None) if counts else None
    return len(batches) if isinstance(batches, Sequence) else 1


def computed_loader_metrics(
    pl_module: Any, container: torch.nn.ModuleDict, name: str, split: str, *, skip: bool = False, owner: str = ""
) -> list[tuple[int, str, dict[str, Tensor]]]:
    """``(loader, log suffix, {metric: value})`` of every evaluated loader of ``split``; every metric reset after.

    One loader gets the plain names; several get Lightning's own suffix (:func:`loader_suffix`), one number per
    loader. A metric that saw no batch gives no value, nor does a count that saw no labelled sample (0/0 is no
    number: said once per key); with ``skip`` (a sanity check) nothing does. ``compute`` reduces across processes.
    """
    computed = []
    if world_size() > 1 and STAGE_KEY.get(split) in container:
        # Every process holds every loader's metrics, also those of a loader whose shard it found empty: the
        # reductions below must meet on the same list everywhere.
        for loader in range(1, _loader_count(pl_module.trainer, split)):
            loader_metrics(container, split, loader)
    loaders = list(evaluated_loaders(container, split))
    updated = _updated_anywhere([m for _, metrics in loaders for m in metrics.values()], pl_module, skip)
    for loader, metrics in loaders:
        suffix = loader_suffix(pl_module.trainer, split, loader)
        values = {}
        for key, metric in metrics.items():
            if next(updated) and not skip:
                log_key = f"{STAGE_PREFIX[split]}/{name}_{key}{suffix}"
                if _has_labelled_samples(metric, log_key, owner):
                    with warnings.catch_warnings():
                        # A process that saw no batch of this loader (an uneven or empty shard) still joins the
                        # reduction in compute; torchmetrics would warn that compute came before update.
                        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
                        values[key] = metric.compute()
            reset_metric(metric)
        computed.append((loader, suffix, values))
    return computed


def _updated_anywhere(metrics: list[torch.nn.Module], pl_module: Any, skip: bool) -> Iterator[bool]:
    """Whether each metric saw a batch on any process (one collective under DDP), so every process computes it.

    A process whose shard of the evaluation was empty has ``update_called`` false where the others have it true; if
    it skipped ``compute`` (a reduction) the others would wait for it forever.
    """
    flags = [bool(getattr(m, "update_called", False)) for m in metrics]
    if world_size() > 1 and not skip and metrics:
        counts = torch.tensor(flags, dtype=torch.float32, device=pl_module.device)
        all_reduce_sum_([counts])
        flags = [v > 0 for v in counts.tolist()]
    return iter(flags)


def log_loader_metrics(
    pl_module: Any,
    container: torch.nn.ModuleDict,
    name: str,
    split: str,
    *,
    skip: bool = False,
    owner: str = "",
    log: Callable[[Any, str, int, str, dict[str, Any]], None] | None = None,
) -> None:
    """Log ``{prefix}/{name}_{metric}`` of every evaluated loader of ``split`` (once per epoch), then reset them all.

    See :func:`computed_loader_metrics` for what is logged; ``log(pl_module, split, loader, suffix, values)``, where
    given, logs each loader's values instead (a sweep logs its best head and every head).
    """
    for loader, suffix, values in computed_loader_metrics(pl_module, container, name, split, skip=skip, owner=owner):
        if log is None:
            log_split_values(pl_module, name, split, suffix, values)
        else:
            log(pl_module, split, loader, suffix, values)


def log_split_values(pl_module: Any, name: str, split: str, suffix: str, values: Mapping[str, Any]) -> None:
    """Log ``{prefix}/{name}_{key}{suffix}`` of each value once per epoch (evaluation's in the progress bar)."""
    for key, value in values.items():
        pl_module.log(
            f"{STAGE_PREFIX[split]}/{name}_{key}{suffix}",
            value,
            on_step=False,
            on_epoch=True,
            sync_dist=False,
            prog_bar=split == "val",
            add_dataloader_idx=False,
        )


def _has_labelled_samples(metric: torch.nn.Module, key: str, owner: str) -> bool:
    """False (with a warning, once per key) when a top-1 count saw no labelled sample on any process."""
    total = getattr(metric, "total", None)
    if not isinstance(metric, InPlaceReset) or not isinstance(total, Tensor):
        return True
    if world_size() > 1:
        total = total.clone()
        all_reduce_sum_([total])
    if int(total) > 0:  # one sync per epoch
        return True
    warning_cache.warn(
        f"{owner}: {key} is not logged: no sample of this epoch had a label (every target was the loss's ignore_index)."
    )
    return False


def capturable_metric(metric: torch.nn.Module) -> bool:
    """Whether ``metric.update`` can run inside a CUDA graph.

    It must change its tensor states in place (``self.count.add_(n)``, not ``self.count = self.count + n``, which
    most torchmetrics classes do) and never read a value on the host. A metric says so with a class attribute
    ``updates_in_place = True``, as :class:`Top1Accuracy` does; any other is updated after each replay instead.

    Examples:
        >>> import torchmetrics
        >>> capturable_metric(Top1Accuracy()), capturable_metric(torchmetrics.MeanMetric())
        (True, False)
    """
    return (
        isinstance(metric, Metric)
        and getattr(metric, "updates_in_place", False) is True
        and not metric.compute_on_cpu
        and all(isinstance(getattr(metric, name), Tensor) for name in metric_state_names(metric))
    )


def metric_states(metric: Metric) -> list[Tensor]:
    """The tensors that hold ``metric``'s state (torchmetrics' ``add_state`` table)."""
    return [getattr(metric, name) for name in metric_state_names(metric)]


def snake_case(name: str) -> str:
    """``MulticlassAccuracy`` -> ``multiclass_accuracy``.

    Examples:
        >>> snake_case("MulticlassAccuracy"), snake_case("F1Score"), snake_case("MulticlassAUROC")
        ('multiclass_accuracy', 'f1_score', 'multiclass_auroc')
    """
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    name = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return name.lower()


class InPlaceReset(Metric):
    """A metric whose ``reset`` zeroes its tensor states where they are.

    A CUDA graph that updates the states then keeps writing to the right memory across epochs (torchmetrics' own
    reset makes new tensors).

    Examples:
        >>> metric = Top1Accuracy()
        >>> before = metric.correct
        >>> metric.reset()
        >>> metric.correct is before
        True
    """

    def reset(self) -> None:
        kept = {name: getattr(self, name) for name in metric_state_names(self)}
        super().reset()
        for name, old in kept.items():
            new = getattr(self, name)
            if (
                isinstance(old, Tensor)
                and old.device == new.device
                and old.shape == new.shape
                and not old.is_inference()
            ):
                setattr(self, name, old.copy_(new))


class Top1Accuracy(InPlaceReset):
    """Top-1 accuracy of logits ``(B, C)`` (or class indices ``(B,)``) against targets ``(B,)``.

    Needs no ``num_classes``, so it can be the default metric of a probe whose size is inferred. Targets equal to
    ``ignore_index`` (unlabelled samples, as cross-entropy skips them) count neither as right nor in the
    denominator; soft targets ``(B, C)`` (mixup, label smoothing) count by their most likely class. Its update is
    a few device reductions with no host sync.

    Args:
        ignore_index: the target value of samples to leave out, or ``None`` to count every sample.

    Examples:
        >>> import torch
        >>> metric = Top1Accuracy()
        >>> metric.update(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, -100]))
        >>> metric.compute()
        tensor(0.5000)
    """

    full_state_update = False
    updates_in_place = True  # its update can be replayed from a CUDA graph (see `capturable_metric`)
    higher_is_better = True
    is_differentiable = False
    correct: Tensor
    total: Tensor

    def __init__(self, ignore_index: int | None = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise TypeError(f"Top1Accuracy: ignore_index must be an int or None, got {ignore_index!r}.")
        self.ignore_index = ignore_index
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if target.is_floating_point() and target.ndim == preds.ndim and target.ndim > 1:
            target = target.argmax(dim=-1)  # class probabilities
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=-1)
        hits = preds == target
        if self.ignore_index is None:
            self.correct.add_(hits.sum())
            self.total.add_(target.numel())
        else:
            labelled = target != self.ignore_index
            self.correct.add_((hits & labelled).sum())
            self.total.add_(labelled.sum())

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)


def _check_name(name: Any, owner: str) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(
            f"{owner}: metric names must be non-empty strings without '.', got {name!r}. Rename it, e.g. 'top1'."
        )
    if is_reserved_key(name):
        raise ValueError(
            f"{owner}: the metric name {name!r} is an attribute of nn.ModuleDict, where the metrics are stored, so it "
            f"cannot name a metric. Rename it in metrics=, e.g. {{'{name}_top1': ...}}."
        )
    return name


def _check_metric(value: Any, name: str, owner: str) -> Metric:
    if not isinstance(value, Metric):
        raise TypeError(
            f"{owner}: metric {name!r} must be a torchmetrics.Metric, got {type(value).__name__}. "
            "Pass e.g. torchmetrics.classification.MulticlassAccuracy(num_classes=10)."
        )
    return value


def _plain(spec: Any, owner: str) -> dict[str, Metric]:
    if spec is None:
        return {}
    if isinstance(spec, Metric):
        return {_check_name(snake_case(type(spec).__name__), owner): spec}
    if isinstance(spec, MetricCollection):
        return {_check_name(k, owner): _check_metric(v, k, owner) for k, v in spec.items()}
    if isinstance(spec, Mapping):
        return {_check_name(k, owner): _check_metric(v, str(k), owner) for k, v in spec.items()}
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        named: dict[str, Metric] = {}
        for i, value in enumerate(spec):
            metric = _check_metric(value, f"#{i}", owner)
            base = snake_case(type(metric).__name__)
            name, n = base, 1
            while name in named:
                n += 1
                name = f"{base}_{n}"
            named[_check_name(name, owner)] = metric
        return named
    raise TypeError(
        f"{owner}: metrics must be a torchmetrics.Metric, a list/tuple of them, a dict name -> Metric, or "
        f"{{'train': ..., 'val': ...}}, got {type(spec).__name__}."
    )


def normalize_metrics(spec: MetricsSpec, owner: str, default: dict[str, Metric] | None = None) -> dict[str, dict]:
    """Turn any accepted metrics form into ``{"train": {...}, "val": {...}, "test": {...}}`` of separate copies.

    ``None`` gives ``default`` (if any) on every split. A dict whose keys are only ``train``/``val`` is the split
    form; each side takes any plain form, and ``val`` also serves ``test``. A plain form is tracked in every split.

    Examples:
        >>> out = normalize_metrics([Top1Accuracy(), Top1Accuracy()], "probe")
        >>> sorted(out["train"]), sorted(out["test"])
        (['top1_accuracy', 'top1_accuracy_2'], ['top1_accuracy', 'top1_accuracy_2'])
    """
    if spec is None:
        spec = default or {}
    if isinstance(spec, Mapping) and not isinstance(spec, MetricCollection):
        split, other = [k for k in spec if k in _SPLIT_KEYS], [k for k in spec if k not in _SPLIT_KEYS]
        if split and other:
            raise ValueError(
                f"{owner}: metrics mixes the split keys {split} with other keys {other}. The split form takes only "
                "'train' and 'val' ('val' also serves test): write {'train': ..., 'val': ...}; or, for metrics "
                "tracked in every split, name none of them 'train' or 'val'."
            )
    if isinstance(spec, Mapping) and not isinstance(spec, MetricCollection) and spec and set(spec) <= set(_SPLIT_KEYS):
        # Copies even here: the same object given for both sides must not mix training and eval batches.
        train = {name: copy.deepcopy(m) for name, m in _plain(spec.get("train"), owner).items()}
        val = {name: copy.deepcopy(m) for name, m in _plain(spec.get("val"), owner).items()}
    else:
        train = _plain(spec, owner)
        val = {name: copy.deepcopy(metric) for name, metric in train.items()}
        train = {name: copy.deepcopy(metric) for name, metric in train.items()}
    test = {name: copy.deepcopy(metric) for name, metric in val.items()}
    return {"train": train, "val": val, "test": test}
