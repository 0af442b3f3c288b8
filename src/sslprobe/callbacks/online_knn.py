"""OnlineKNN: a weighted kNN classifier over a bank of recent training features, evaluated on validation."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from sslprobe._batch import Locator, check_locator, features_of, target_of
from sslprobe._distributed import all_gather_rows, all_reduce_sum, world_size
from sslprobe._metrics import (
    STAGE_KEY,
    STAGE_PREFIX,
    MetricsSpec,
    Top1Accuracy,
    loader_metrics,
    log_loader_metrics,
    normalize_metrics,
)
from sslprobe.callbacks.base import (
    check_module,
    check_name,
    check_name_free,
    ensure_containers,
)
from sslprobe.callbacks.evaluation import EvaluationCallback
from sslprobe.probes.knn import ALLOWED_DISTANCES, Distance, knn_predict

__all__ = ["OnlineKNN"]

_HALF = (torch.bfloat16, torch.float16)  # features kept in their own dtype by default

warning_cache = WarningCache()

_ALLOWED_DISTANCES = ALLOWED_DISTANCES
_SPLIT_WORD = {"val": "validation", "test": "test"}


class _EvalBank(NamedTuple):
    """The bank one evaluation votes over: every process's rows, gathered once at its start."""

    features: Tensor  # (N, D)
    labels: Tensor  # (N,), all >= 0
    num_classes: int  # width of the vote scores
    widen: bool  # whether eval labels beyond the width widen the scores (width inferred from labels only)


class OnlineKNN(EvaluationCallback):
    """Weighted kNN accuracy of the current representation, with no training at all.

    During training it keeps the most recent labelled features in a bounded bank (a ring buffer of ``queue_size``
    rows on the module's device); at validation and test it classifies each batch by its ``k`` nearest bank entries,
    computed in chunks so memory stays bounded. Two vote rules (``distance=``):

    - ``"cosine"`` (default): nearest by cosine similarity ``s``, votes ``exp(s / temperature)`` (Wu et al. 2018).
    - ``"euclidean"``: nearest by L2 distance ``d`` on the raw (un-normalised) features, votes
      ``1 / (d + temperature)``.

    The scores are the normalised vote totals per class, ``(B, C)``. It logs ``eval/{name}_top1`` (and
    ``eval/{name}_{metric}`` for metrics given; they receive the scores), ``test/{name}_...`` in ``trainer.test``.
    With several validation (or test) loaders each gets its own numbers, under Lightning's names
    ``eval/{name}_top1/dataloader_idx_{i}``.

    The bank holds at most one epoch of samples (the most recent ones), so with several epochs a sample is never
    its own neighbour's duplicate. Training rows with a negative label (``-100``: unlabelled) or with non-finite
    features never enter it; rows of the second kind are counted and warned about once per fit. At evaluation,
    samples with a negative target or non-finite features are left out of the metrics (the latter counted and
    warned about once). Under DDP each process fills its own bank during training (no collective and no host sync
    per step) and the banks are gathered once at the start of each evaluation, so every process votes over all
    processes' features.

    Args:
        module: the LightningModule to probe.
        name: unique id, used in log names.
        input: where the features are (as for :class:`OnlineProbe`).
        target: where the integer labels are; negative labels mark samples to leave out.
        k: neighbours.
        temperature: vote temperature ``T`` (a finite number > 0).
        queue_size: bank rows (over all processes).
        num_classes: number of classes; ``None`` takes the largest ``num_classes`` of the metrics given, else
            infers it from the labels seen (the bank's at each evaluation, and each eval batch's).
        metrics: extra torchmetrics metrics on the vote scores.
        distance: ``"cosine"`` or ``"euclidean"``, as above.
        bank_dtype: the bank's dtype. ``None``: the features' own when they are 16-bit (bfloat16/float16 under
            mixed precision: half the memory, ``queue_size x D x 2`` bytes), else float32 (``queue_size x D x 4``;
            65,536 x 2,048 is 512 MiB). Similarities are computed in float32 either way.

    Raises:
        TypeError: for a ``k``, ``queue_size`` or ``temperature`` that is not a number.
        ValueError: for a non-positive ``k``, ``temperature`` or ``queue_size``, a non-finite ``temperature``, an
            unknown ``distance``, or a duplicate name.
        RuntimeError: at an evaluation, when the bank holds a label ``>= num_classes``.

    Examples:
        >>> import torch
        >>> from sslprobe import Module
        >>> model = Module(forward=lambda self, b, stage: {"h": self.net(b[0])}, net=torch.nn.Linear(4, 8))
        >>> knn = OnlineKNN(model, "knn", input="h", target=1, k=5, distance="euclidean")
        >>> knn.k, knn.queue_size, knn.distance
        (5, 65536, 'euclidean')
    """

    _features: Tensor | None  # (Q, D) ring buffer of usable training rows
    _labels: Tensor | None  # (Q,)
    _eval_bank: _EvalBank | None

    def __init__(
        self,
        module: pl.LightningModule | None = None,
        name: str | None = None,
        input: Locator | None = None,
        target: Locator | None = None,
        k: int = 20,
        temperature: float = 0.07,
        queue_size: int = 65536,
        num_classes: int | None = None,
        metrics: MetricsSpec = None,
        distance: Distance = "cosine",
        bank_dtype: torch.dtype | None = None,
    ) -> None:
        name = check_name(name, type(self).__name__)
        owner = f"{type(self).__name__}(name={name!r})"
        check_module(module, owner)
        input = check_locator(input, "input", owner)
        target = check_locator(target, "target", owner)
        for arg, value, example in (("k", k, 20), ("queue_size", queue_size, 65536)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"{owner}: {arg} must be a positive int, got {value!r} ({type(value).__name__}). "
                    f"Pass e.g. {arg}={example}."
                )
            if value < 1:
                raise ValueError(f"{owner}: {arg} must be a positive int, got {value!r}. Pass e.g. {arg}={example}.")
        if isinstance(temperature, bool) or not isinstance(temperature, Real):
            raise TypeError(
                f"{owner}: temperature must be a number > 0, got {temperature!r} ({type(temperature).__name__}). "
                "Pass a float, e.g. temperature=0.07."
            )
        if not math.isfinite(temperature) or not temperature > 0:
            raise ValueError(
                f"{owner}: temperature must be > 0 and finite, got {temperature!r}. Pass e.g. temperature=0.07."
            )
        if distance not in _ALLOWED_DISTANCES:
            raise ValueError(
                f"{owner}: distance must be one of {', '.join(map(repr, _ALLOWED_DISTANCES))}, got {distance!r}. "
                "Pass distance='euclidean' for the L2 distance on the raw features, or 'cosine'."
            )
        if bank_dtype is not None and (not isinstance(bank_dtype, torch.dtype) or not bank_dtype.is_floating_point):
            raise TypeError(
                f"{owner}: bank_dtype must be a floating torch.dtype or None, got {bank_dtype!r}. Pass e.g. "
                "bank_dtype=torch.float32 to keep the bank in full precision under mixed precision."
            )
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(
                f"{owner}: num_classes must be a positive int or None, got {num_classes!r}. Pass the number of "
                "classes, or None to infer it."
            )
        normalize_metrics(metrics, owner)  # a bad form fails now, even when the module is bound at setup
        self.name, self.input, self.target = name, input, target
        self.k, self.temperature, self.queue_size, self.num_classes = k, float(temperature), queue_size, num_classes
        self.metrics = metrics
        self.distance = distance
        self.bank_dtype = bank_dtype
        self._owner = owner
        self._binds_at_setup = module is None
        self._features = None
        self._labels = None
        # Ring-buffer counters, kept on the bank's device so that pushing a batch never reads a value on the host.
        self._ptr = torch.zeros((), dtype=torch.long)  # next row to write
        self._filled = torch.zeros((), dtype=torch.long)  # rows written, at most the capacity
        self._seen_this_epoch = torch.zeros((), dtype=torch.long)  # usable rows pushed this epoch
        self._seen_last_epoch = torch.zeros((), dtype=torch.long)
        self._nonfinite_this_epoch = torch.zeros((), dtype=torch.long)  # rows left out for non-finite features
        self._rows_this_epoch = 0  # every row offered this epoch
        self._eval_bank = None
        self._eval_nonfinite: Tensor | None = None  # (), this evaluation's samples with non-finite features
        self._warned: set[str] = set()  # the once-per-run warnings given in this fit / validate / test
        if module is not None:
            self.register_metrics(module)
            self._attach_layer(module)

    @property
    def bank_size(self) -> int:
        """Rows of this process's bank that an evaluation uses (at most one epoch of usable samples; one sync)."""
        return self._window()[0]

    def _window(self) -> tuple[int, int]:
        """``(bank_size, ptr)``, read on the host in one sync."""
        counters = [self._filled, self._seen_this_epoch, self._seen_last_epoch, self._ptr]
        filled, this, last, ptr = torch.stack([c.to(self._filled.device) for c in counters]).tolist()
        per_epoch = last or this
        return (min(filled, per_epoch) if per_epoch else filled), ptr

    def register_metrics(self, module: nn.Module) -> None:
        """Register this kNN's metrics in ``module.callbacks_metrics[name]``."""
        _, callbacks_metrics = ensure_containers(module, self._owner)
        check_name_free(self.name, module, self._owner)
        splits = normalize_metrics(self.metrics, self._owner)
        callbacks_metrics[self.name] = nn.ModuleDict(
            {STAGE_KEY[s]: nn.ModuleDict({"top1": Top1Accuracy(), **splits[s]}) for s in ("val", "test")}
        )

    # ------------------------------------------------------------------ filling the bank

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start counting this epoch's samples (on the device: no sync)."""
        this = self._seen_this_epoch
        self._seen_last_epoch = torch.where(this > 0, this, self._seen_last_epoch)
        self._seen_this_epoch = torch.zeros_like(this)
        self._nonfinite_this_epoch = torch.zeros_like(self._nonfinite_this_epoch)
        self._rows_this_epoch = 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Push this batch's usable features and labels into the ring buffer (device copies, no sync)."""
        features, labels = self._locate(outputs, batch)
        assert labels is not None  # required in training
        self._push(*self._rows(features, labels, "training"))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn, once per fit, when training rows were left out of the bank for non-finite features."""
        if self._features is not None and "fit" not in self._warned:
            self._warn_nonfinite("fit", self._nonfinite_this_epoch, self._rows_this_epoch)

    def _push(self, features: Tensor, labels: Tensor) -> None:
        n = features.shape[0]
        if n == 0:
            return
        capacity = max(self.queue_size // world_size(), 1)
        dtype = self.bank_dtype or (features.dtype if features.dtype in _HALF else torch.float32)
        if (
            self._features is None
            or self._features.shape[1] != features.shape[1]
            or self._features.device != features.device
            or self._features.dtype != dtype
        ):
            self._allocate(capacity, features.shape[1], features.device, dtype)
        assert self._features is not None and self._labels is not None
        finite = torch.isfinite(features).all(dim=1)  # (n,)
        usable = finite & (labels >= 0)  # (n,)
        self._nonfinite_this_epoch += n - finite.sum()
        self._rows_this_epoch += n
        if n > capacity:  # only the newest `capacity` rows could stay
            features, labels, usable, n = features[-capacity:], labels[-capacity:], usable[-capacity:], capacity
        # Compact on the device: the usable rows, in batch order, go to the next `count` slots of the ring. The slots
        # after them (up to n, which is known on the host) are rewritten with their own values: `count` never has to
        # be read on the host, and the window of n <= capacity slots never overlaps itself.
        count = usable.sum()  # ()
        order = torch.argsort(usable.logical_not().to(torch.uint8), stable=True)  # (n,): usable rows first
        slots = torch.arange(n, device=features.device)  # (n,)
        dest = (self._ptr + slots) % capacity  # (n,)
        write = slots < count  # (n,)
        new_features = torch.where(write[:, None], features[order].to(dtype), self._features[dest])
        new_labels = torch.where(write, labels[order], self._labels[dest])
        self._features.index_copy_(0, dest, new_features)
        self._labels.index_copy_(0, dest, new_labels)
        self._ptr = (self._ptr + count) % capacity
        self._filled = (self._filled + count).clamp_max(capacity)
        self._seen_this_epoch = self._seen_this_epoch + count

    def _allocate(self, capacity: int, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        # Plain zeros, not `features.new_zeros`: the bank must stay writable whatever mode the features were made in.
        self._features = torch.zeros((capacity, dim), dtype=dtype, device=device)
        self._labels = torch.zeros((capacity,), dtype=torch.long, device=device)
        self._ptr = torch.zeros((), dtype=torch.long, device=device)
        self._filled = torch.zeros((), dtype=torch.long, device=device)
        self._seen_this_epoch = self._seen_this_epoch.to(device)
        self._seen_last_epoch = self._seen_last_epoch.to(device)
        self._nonfinite_this_epoch = self._nonfinite_this_epoch.to(device)

    def _recent(self) -> tuple[Tensor, Tensor]:
        assert self._features is not None and self._labels is not None
        (size, ptr), capacity = self._window(), self._features.shape[0]
        idx = (torch.arange(ptr - size, ptr, device=self._features.device) % capacity).long()
        return self._features[idx], self._labels[idx]

    # ------------------------------------------------------------------ evaluation

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        self._eval_bank = None
        self._eval_nonfinite = None
        if self._features is None:
            if world_size() == 1:
                return  # nothing trained yet: an empty bank has no neighbours
            # Under DDP every process joins the gather, also one that holds no bank (it takes the others' rows).
            features = labels = torch.zeros(0, device=pl_module.device)
        else:
            features, labels = self._recent()
        (features, _), (labels, _) = all_gather_rows(features), all_gather_rows(labels)  # once per evaluation
        if labels.numel() == 0 and self._features is None:
            return  # no process has trained yet
        if labels.numel() == 0:
            if "empty" not in self._warned:
                self._warned.add("empty")
                rank_zero_warn(
                    f"{self._owner}: the kNN bank holds no usable training row (every training label so far was "
                    f"negative, or the features were not finite); {STAGE_PREFIX[split]}/{self.name}_* are not "
                    "logged. Give some training samples a class label >= 0.",
                    category=UserWarning,
                )
            return
        self._eval_bank = self._bank_of(pl_module, features, labels, split)
        self._eval_nonfinite = torch.zeros((), dtype=torch.long, device=features.device)

    def _bank_of(self, pl_module: pl.LightningModule, features: Tensor, labels: Tensor, split: str) -> _EvalBank:
        top = int(labels.max())  # the one host sync of an evaluation's start
        metric_name, metric_width = self._metric_width(pl_module, split)
        if self.num_classes is not None:
            limit, source = self.num_classes, f"num_classes={self.num_classes}"
        elif metric_width is not None:
            limit, source = metric_width, f"the metric {metric_name!r} has num_classes={metric_width}"
        else:
            limit, source = None, ""
        if limit is not None and top >= limit:
            raise RuntimeError(
                f"{self._owner}: the kNN bank holds the training label {top}, but {source}, so labels must lie in "
                f"[0, {limit}). Pass num_classes={top + 1} (and the same to the metrics), or map the labels to "
                f"0..{limit - 1}; mark samples to leave out with a negative label such as -100."
            )
        width = max(w for w in (top + 1, self.num_classes, metric_width) if w is not None)
        return _EvalBank(features, labels, width, widen=limit is None)

    def _metric_width(self, pl_module: pl.LightningModule, split: str) -> tuple[str, int | None]:
        """The largest ``num_classes`` among the split's metrics (and the metric that has it), if any has one."""
        best: tuple[str, int | None] = ("", None)
        for key, metric in pl_module.callbacks_metrics[self.name][STAGE_KEY[split]].items():
            width = getattr(metric, "num_classes", None)
            if isinstance(width, int) and not isinstance(width, bool) and width > 0 and width > (best[1] or 0):
                best = (key, width)
        return best

    def score_batch(self, pl_module: pl.LightningModule, outputs: Any, batch: Any, split: str, loader: int) -> None:
        bank = self._eval_bank
        if bank is None:
            return  # nothing trained yet: an empty bank has no neighbours
        features, labels = self._locate(outputs, batch, required=split == "val")
        if labels is None:
            warning_cache.warn(
                f"{self._owner}: the test batches hold no target {self.target!r}; kNN metrics are not logged."
            )
            return
        queries, labels = self._rows(features.to(bank.features.device), labels.to(bank.features.device), split)
        if queries.shape[0] == 0:
            return
        finite = torch.isfinite(queries).all(dim=1)  # (B,)
        usable = finite & (labels >= 0)  # (B,)
        assert self._eval_nonfinite is not None
        self._eval_nonfinite += queries.shape[0] - finite.sum()
        # One host sync per eval batch: how many samples count, and the largest label (to widen the scores).
        count, top = (int(v) for v in torch.stack([usable.sum(), labels.max()]).tolist())
        if count == 0:
            return
        if count < queries.shape[0]:
            queries, labels = queries[usable], labels[usable]
        scores = knn_predict(
            queries,
            bank.features,
            bank.labels,
            bank.num_classes,
            k=self.k,
            temperature=self.temperature,
            distance=self.distance,
        )  # (B, C)
        if bank.widen and top >= bank.num_classes:
            scores = F.pad(scores, (0, top + 1 - bank.num_classes))  # no bank row has these classes: zero votes
        for metric in loader_metrics(pl_module.callbacks_metrics[self.name], split, loader).values():
            metric.update(scores, labels)

    def log_evaluation(self, pl_module: pl.LightningModule, split: str, skip: bool) -> None:
        self._eval_bank = None
        if self._eval_nonfinite is not None and not skip and split not in self._warned:
            self._warn_nonfinite(split, self._eval_nonfinite)
        self._eval_nonfinite = None
        log_loader_metrics(pl_module, pl_module.callbacks_metrics[self.name], self.name, split, skip=skip)

    def _warn_nonfinite(self, run: str, count: Tensor, offered: int | None = None) -> None:
        """Warn once per run when rows with non-finite features were left out (one sync, one collective)."""
        counts = torch.stack([count, torch.full_like(count, offered or 0)])
        counts = all_reduce_sum([counts])[0]
        skipped, total = (int(v) for v in counts.tolist())
        if not skipped:
            return
        self._warned.add(run)
        if run == "fit":
            what = f"{skipped} of {total} training rows this epoch had non-finite features (NaN/inf) and were left out "
            what += "of the kNN bank"
        else:
            what = f"{skipped} {_SPLIT_WORD[run]} samples had non-finite features (NaN/inf) and were left out of "
            what += f"{STAGE_PREFIX[run]}/{self.name}_*"
        rank_zero_warn(
            f"{self._owner}: {what} (warned once per run). Check the model for a diverging loss or a precision "
            "overflow; the kNN numbers cover the finite rows only.",
            category=RuntimeWarning,
        )

    def _locate(self, outputs: Any, batch: Any, required: bool = True) -> tuple[Tensor, Tensor | None]:
        features = features_of(self.input, outputs, batch, self._owner)
        labels = target_of(self.target, outputs, batch, self._owner, required=required)
        if labels is not None:
            if labels.is_floating_point() or labels.is_complex():
                raise RuntimeError(
                    f"{self._owner}: kNN needs integer class labels, got {labels.dtype}. Use .long() (a negative "
                    "label such as -100 marks a sample to leave out)."
                )
            labels = labels.long()  # int8/16/32 and uint8 labels index the votes as int64
        return features, labels

    def _rows(self, features: Tensor, labels: Tensor, what: str) -> tuple[Tensor, Tensor]:
        """Features ``(B, D)`` (detached, flattened) and labels ``(B,)``, checked to pair up."""
        features = features.detach().reshape(features.shape[0], -1)
        labels = labels.detach().reshape(-1)
        if features.shape[0] != labels.shape[0]:
            raise RuntimeError(
                f"{self._owner}: the {what} batch has {features.shape[0]} feature rows ({self.input!r}) but "
                f"{labels.shape[0]} labels ({self.target!r}). Give one integer label per sample."
            )
        return features, labels

    # ------------------------------------------------------------------ checkpoint

    @override
    def state_dict(self) -> dict[str, Any]:
        # The bank is refilled by training and can be large: only the counters are kept, as plain ints.
        return {"seen_this_epoch": int(self._seen_this_epoch), "seen_last_epoch": int(self._seen_last_epoch)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("seen_this_epoch", "seen_last_epoch"):
            current = getattr(self, f"_{key}")
            setattr(self, f"_{key}", torch.tensor(int(state_dict.get(key, 0)), device=current.device))
