"""RefitProbe: a closed-form ridge classifier, refitted at every validation on the training rows since the last."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import WarningCache, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from sslprobe._batch import Locator, check_locator, features_of, target_of
from sslprobe._distributed import all_reduce_sum, all_reduce_sum_, broadcast_, rank, world_size
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
from sslprobe.probes.feature_norm import moments_statistics, row_moments
from sslprobe.probes.ridge import DEFAULT_LAMBDAS, IGNORE_INDEX, RidgeFit, RidgeStatistics, fit_ridge, usable_mean

__all__ = ["RefitProbe"]

warning_cache = WarningCache()

_SPLIT_WORD = {"val": "validation", "test": "test"}
_ALLOWED_EVAL_STATS = ("eval", "train")
_FIT_TENSORS = ("weight", "bias", "gcv", "mean", "std")


def _cpu(t: Tensor) -> Tensor:
    """A CPU copy that shares no memory with ``t`` (a checkpoint must not change with the live statistics)."""
    return t.detach().to("cpu", copy=True)


class RefitProbe(EvaluationCallback):
    """The linear-evaluation number of the encoder as it is now: a ridge classifier refitted at every validation.

    An SGD-trained probe lags an encoder that is still changing. This one is refitted in closed form, at the start of
    every validation, on *all* training rows seen since the previous validation, and evaluated on the validation
    batches. During training it only accumulates float64 sufficient statistics of the rows (``n``, ``sum x``,
    ``sum y``, ``X'X``, ``X'Y``: a few matmuls per step on the device, no host sync, no collective), so memory is
    ``O(D^2 + D*C)`` whatever the number of rows (D = 2048: 32 MiB for ``X'X``). The rows are summed about a shift
    (the last fit's mean; at first, the first batch's, broadcast once from process 0 under DDP) so that features far
    from zero lose no precision.

    The fit (see :func:`~sslprobe.probes.ridge.fit_ridge`): features standardised with the fitted rows' mean and
    population standard deviation, targets one-hot in ``{-1, +1}``, an unpenalised intercept, the penalty per row
    ``lambda`` chosen from ``lambdas`` by generalised cross-validation from the same statistics; the whole grid
    comes from one eigendecomposition. It equals scikit-learn's ``RidgeClassifier(alpha=lambda * n,
    fit_intercept=True)`` on the same standardised rows. Predictions are the argmax of the scores of the evaluation
    features standardised with their own statistics (``eval_stats="eval"``) or the fitted rows' (``"train"``).

    Logs ``eval/{name}_{metric}`` (default ``top1``; metrics given receive the scores ``(B, C)``) and
    ``eval/{name}_lambda`` at each validation (never in the sanity check), one number per loader under Lightning's
    names ``.../dataloader_idx_{i}`` when there are several, and ``test/{name}_{metric}`` in ``trainer.test``.

    Which rows, which fit:

    - A validation inside ``trainer.fit`` refits on the rows since the previous one and starts a new window.
    - ``trainer.validate`` and ``trainer.test`` evaluate the last fit (so they repeat the last logged number);
      only when there is none do they fit the rows seen so far. With no row and no fit nothing is logged.
    - Rows with non-finite features never enter the statistics (counted, and warned about once per run); rows
      labelled ``-100`` are left out; a label outside ``[0, num_classes)`` is an error at the next validation.
      At evaluation, samples with non-finite features or the label ``-100`` are left out of the metrics.
    - Under DDP each process sums its own rows; at a validation the statistics of all processes are summed in one
      collective, and every process fits and logs the same numbers.
    - The statistics and the last fit are part of the checkpoint, so a resumed run (also one resumed mid-epoch)
      refits exactly as an uninterrupted one. Under DDP, writing a checkpoint sums the statistics of all processes
      into it (one collective: Lightning's ``trainer.save_checkpoint`` runs on every process), and a resumed run
      counts them once, on process 0.

    Args:
        module: the LightningModule to probe; ``None`` binds to the Trainer's module at setup.
        name: unique id on that module, used in log names and checkpoints.
        input: where the features ``(B, D)`` are (as for :class:`~sslprobe.callbacks.OnlineProbe`); ``(B,)`` is one
            feature per sample. Any floating dtype; they are summed in float64.
        target: where the integer class labels ``(B,)`` are; ``-100`` marks a sample to leave out.
        num_classes: number of classes ``C`` (at least 2).
        lambdas: the grid of penalties per row (each > 0); default ``10 ** linspace(-6, 1, 15)``.
        metrics: extra torchmetrics metrics on the scores, in the forms :class:`~sslprobe.callbacks.OnlineProbe`
            takes (its ``val`` side serves validation and test; nothing is predicted in training).
        eval_stats: how evaluation features are standardised before the fit scores them. ``"eval"`` (default):
            with the mean and standard deviation of the evaluation rows seen so far in that evaluation (the first
            loader's for later loaders), as :class:`~sslprobe.probes.FeatureNorm` does: an encoder with BatchNorm
            gives other features in eval mode than the training-mode rows that were fitted. ``"train"``: with the
            fitted rows' own (the plain ``RidgeClassifier`` pipeline).

    Attributes:
        last_fit: the current :class:`~sslprobe.probes.ridge.RidgeFit` (``None`` before the first).
        statistics: this process's :class:`~sslprobe.probes.ridge.RidgeStatistics` of the rows since the last
            fit (``None`` before the first training batch).

    Raises:
        TypeError: for a missing ``name``, ``input``, ``target`` or ``num_classes``, or arguments of the wrong type.
        ValueError: for a bad ``num_classes`` or ``lambdas``, a metric named ``lambda``, or a name already used.
        RuntimeError: for features that are not ``(B, D)``, labels that are not integers or do not pair up with
            the rows, and, at a validation, training labels outside ``[0, num_classes)``.

    Examples:
        >>> import torch
        >>> import lightning.pytorch as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from sslprobe import Module
        >>> model = Module(forward=lambda self, b, stage: {"h": self.net(b[0])}, net=torch.nn.Linear(8, 16))
        >>> refit = RefitProbe(model, "refit", input="h", target=1, num_classes=3)
        >>> data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,))), batch_size=8)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[refit], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, data, data)
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("eval/"))
        ['eval/refit_lambda', 'eval/refit_top1']
        >>> refit.last_fit.rows, refit.last_fit.weight.shape
        (32, torch.Size([16, 3]))
    """

    _stats: RidgeStatistics | None
    _fit: RidgeFit | None
    _eval_fit: RidgeFit | None  # the fit this evaluation uses, on the features' device
    _eval_nonfinite: Tensor | None  # (), this evaluation's samples with non-finite features

    def __init__(
        self,
        module: pl.LightningModule | None = None,
        name: str | None = None,
        input: Locator | None = None,
        target: Locator | None = None,
        num_classes: int | None = None,
        lambdas: Iterable[float] | None = None,
        metrics: MetricsSpec = None,
        eval_stats: Literal["eval", "train"] = "eval",
    ) -> None:
        name = check_name(name, type(self).__name__)
        owner = f"{type(self).__name__}(name={name!r})"
        check_module(module, owner)
        for arg, value, example in (("input", input, "'embedding'"), ("target", target, "'label' or 1")):
            if value is None:
                raise TypeError(f"{owner}: {arg} is required: where the {arg} is, e.g. {arg}={example}.")
        input = check_locator(input, "input", owner)
        target = check_locator(target, "target", owner)
        if num_classes is None:
            raise TypeError(f"{owner}: num_classes is required: the number of classes, e.g. num_classes=10.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(
                f"{owner}: num_classes must be an int >= 2, got {num_classes!r} ({type(num_classes).__name__}). "
                "Pass the number of classes, e.g. num_classes=10."
            )
        if num_classes < 2:
            raise ValueError(
                f"{owner}: num_classes must be an int >= 2, got {num_classes}: one class cannot be classified. "
                "Pass the number of classes, e.g. num_classes=10."
            )
        if eval_stats not in _ALLOWED_EVAL_STATS:
            raise ValueError(
                f"{owner}: eval_stats must be one of {_ALLOWED_EVAL_STATS}, got {eval_stats!r}. Pass 'eval' to "
                "standardise evaluation features with their own statistics, or 'train' with the fitted rows'."
            )
        grid = self._check_lambdas(lambdas, owner)
        splits = normalize_metrics(metrics, owner)  # a bad form fails now, even when the module is bound at setup
        if "lambda" in splits["val"]:
            raise ValueError(
                f"{owner}: a metric may not be named 'lambda': eval/{name}_lambda is the chosen penalty. Rename it."
            )
        self.name, self.input, self.target, self.num_classes = name, input, target, num_classes
        self.lambdas = grid
        self.metrics = metrics
        self.eval_stats = eval_stats
        self._eval_moments: Tensor | None = None  # float64 [count, sum, sum of squares] of this evaluation's rows
        self._owner = owner
        self._binds_at_setup = module is None
        self._stats = None
        self._fit = None
        self._has_rows = False  # training rows offered since the last fit (on the host: every process agrees)
        self._eval_fit = None
        self._eval_nonfinite = None
        self._warned: set[str] = set()  # the once-per-run warnings given in this fit / validate / test
        if module is not None:
            self.register_metrics(module)
            self._attach_layer(module)

    @staticmethod
    def _check_lambdas(lambdas: Iterable[float] | None, owner: str) -> tuple[float, ...]:
        if lambdas is None:
            return DEFAULT_LAMBDAS
        if isinstance(lambdas, Tensor):
            lambdas = lambdas.reshape(-1).tolist()
        if isinstance(lambdas, (str, bytes, Mapping)) or not isinstance(lambdas, Iterable):
            raise TypeError(
                f"{owner}: lambdas must be a sequence of numbers > 0, got {type(lambdas).__name__}. Pass e.g. "
                "lambdas=[1e-4, 1e-2, 1.0], or None for the default grid."
            )
        values = list(lambdas)
        if not values:
            raise ValueError(f"{owner}: lambdas must hold at least one value. Pass None for the default grid.")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(
                    f"{owner}: lambdas must be numbers > 0, got {value!r} ({type(value).__name__}). Pass e.g. "
                    "lambdas=[1e-4, 1e-2, 1.0]."
                )
            if not math.isfinite(value) or not value > 0:
                raise ValueError(
                    f"{owner}: lambdas must be finite and > 0 (penalties per row), got {value!r}. Pass e.g. "
                    "lambdas=[1e-4, 1e-2, 1.0]."
                )
        return tuple(float(v) for v in values)

    @property
    def last_fit(self) -> RidgeFit | None:
        """The current fit (the last validation's, or the checkpoint's); ``None`` before the first."""
        return self._fit

    @property
    def statistics(self) -> RidgeStatistics | None:
        """This process's statistics of the training rows since the last fit."""
        return self._stats

    def register_metrics(self, module: nn.Module) -> None:
        """Register this probe's metrics in ``module.callbacks_metrics[name]``."""
        _, callbacks_metrics = ensure_containers(module, self._owner)
        check_name_free(self.name, module, self._owner)
        splits = normalize_metrics(self.metrics, self._owner)
        callbacks_metrics[self.name] = nn.ModuleDict(
            {STAGE_KEY[s]: nn.ModuleDict({"top1": Top1Accuracy(), **splits[s]}) for s in ("val", "test")}
        )

    # ------------------------------------------------------------------ training: statistics only

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Add this batch's usable rows to the statistics (float64 matmuls on the device; no sync)."""
        features, labels = self._locate(outputs, batch, required=True)
        assert labels is not None  # required in training
        self.accumulate(features, labels)

    def accumulate(self, features: Tensor, labels: Tensor) -> None:
        """Add training rows to the statistics: features ``(B, D)``, integer labels ``(B,)``."""
        x, y = self._rows(features, labels, "training")
        stats = self._stats
        if stats is None:
            with torch.inference_mode(False):  # the statistics must stay writable whatever mode made the features
                stats = self._stats = RidgeStatistics(
                    x.shape[1], self.num_classes, device=x.device, shift=self._first_shift(x, y)
                )
        elif stats.num_features != x.shape[1]:
            raise RuntimeError(
                f"{self._owner}: features {self.input!r} have {x.shape[1]} columns, but the training rows since the "
                f"previous validation had {stats.num_features}. Keep the feature size fixed during a run (pool or "
                "project the features to one size)."
            )
        elif stats.device != x.device:
            with torch.inference_mode(False):
                stats.to(x.device)  # the module moved (a fit on another device)
        stats.update(x, y)
        self._has_rows = True

    def _first_shift(self, x: Tensor, y: Tensor) -> Tensor:
        """The shift of the first window: the last fit's mean, else this batch's (process 0's, under DDP)."""
        fit = self._fit
        if fit is not None and fit.mean.shape[0] == x.shape[1]:
            return fit.mean.to(x.device)
        shift = usable_mean(x, y, self.num_classes)  # (D,)
        if world_size() > 1:
            broadcast_([shift])  # once per run: every process must sum about the same shift
        return shift

    # ------------------------------------------------------------------ the fit

    def refit(self) -> RidgeFit | None:
        """Fit on every process's rows since the last fit, make it the current fit, and start a new window.

        Sums the statistics of all processes (one collective), reads their counts (one sync), fits, and resets the
        statistics. Keeps the previous fit (with a warning) when no row was usable.

        Returns:
            The current fit (``None`` when there has never been a usable row).

        Raises:
            RuntimeError: when a training label lies outside ``[0, num_classes)``.
        """
        stats = self._stats
        self._has_rows = False
        if stats is None:
            return self._fit
        with torch.inference_mode(False), torch.no_grad():  # the fit and the statistics stay usable in training
            all_reduce_sum_([stats.buffer])  # the one collective of a validation
            _, nonfinite, bad, offered = (int(v) for v in stats.counts.tolist())
            if bad:
                raise self._label_error(stats, bad)
            if nonfinite and "nonfinite" not in self._warned:
                self._warned.add("nonfinite")
                rank_zero_warn(
                    f"{self._owner}: {nonfinite} of {offered} training rows since the previous validation had "
                    "non-finite features (NaN/inf) and were left out of the fit (warned once per run). Check the "
                    "model for a diverging loss or a precision overflow.",
                    category=RuntimeWarning,
                )
            fit = fit_ridge(stats, self.lambdas)
            if fit is None:
                if "empty" not in self._warned:
                    self._warned.add("empty")
                    kept = "the previous fit is evaluated" if self._fit is not None else "nothing is logged"
                    rank_zero_warn(
                        f"{self._owner}: none of the {offered} training rows since the previous validation was usable "
                        f"(every label was -100, or the features were not finite); {kept}. Give some training "
                        "samples a class label.",
                        category=UserWarning,
                    )
                stats.reset_()
                return self._fit
            self._fit = fit
            stats.reset_(shift=fit.mean)  # the next window is summed about this mean (see RidgeStatistics)
        return fit

    def _label_error(self, stats: RidgeStatistics, bad: int) -> RuntimeError:
        low, high = (int(v) for v in stats.label_range.tolist())
        c = self.num_classes
        seen = f" (this process saw labels from {low} to {high})" if low < 0 or high >= c else ""
        fix = f"Pass num_classes={high + 1}, or map" if high >= c else "Map"
        return RuntimeError(
            f"{self._owner}: {bad} training labels since the previous validation lie outside [0, {c}) for "
            f"num_classes={c}{seen}. {fix} the labels to 0..{c - 1}; mark samples to leave out with -100."
        )

    # ------------------------------------------------------------------ evaluation

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        self._eval_fit = None
        self._eval_nonfinite = None
        self._eval_moments = None
        if trainer.sanity_checking:
            return
        in_fit = trainer.state.fn == "fit"
        if self._has_rows and ((in_fit and split == "val") or self._fit is None):
            if self._stats is not None:
                with torch.inference_mode(False):
                    self._stats.to(pl_module.device)  # restored from a checkpoint on the CPU
            self.refit()
        if self._fit is not None:
            self._eval_fit = self._fit
            self._eval_nonfinite = torch.zeros((), dtype=torch.long, device=self._fit.weight.device)

    def score_batch(self, pl_module: pl.LightningModule, outputs: Any, batch: Any, split: str, loader: int) -> None:
        fit = self._eval_fit
        if fit is None:
            return  # no fit yet: nothing to evaluate
        features, labels = self._locate(outputs, batch, required=split == "val")
        if labels is None:
            warning_cache.warn(
                f"{self._owner}: the test batches hold no target {self.target!r}; refit metrics are not logged."
            )
            return
        x, y = self._rows(features, labels, _SPLIT_WORD[split])
        if x.shape[1] != fit.weight.shape[0]:
            raise RuntimeError(
                f"{self._owner}: {_SPLIT_WORD[split]} features {self.input!r} have {x.shape[1]} columns, but the "
                f"ridge classifier was fitted on {fit.weight.shape[0]}. Give evaluation the features of training."
            )
        if x.device != fit.weight.device:
            fit = self._eval_fit = fit.to(x.device)
        assert self._eval_nonfinite is not None
        self._eval_nonfinite = self._eval_nonfinite.to(x.device)
        finite = torch.isfinite(x).all(dim=1)  # (B,)
        usable = finite & (y != IGNORE_INDEX)  # (B,)
        self._eval_nonfinite += x.shape[0] - finite.sum()
        count = int(usable.sum())  # one host sync per eval batch: the metrics get the usable samples only
        if count == 0:
            return
        if self.eval_stats == "eval":
            scores = self._scores_with_eval_statistics(fit, x, finite, loader)
            if count < x.shape[0]:
                scores, y = scores[usable], y[usable]
        else:
            if count < x.shape[0]:
                x, y = x[usable], y[usable]
            scores = fit.decision(x)  # (B, C), float64
        for metric in loader_metrics(pl_module.callbacks_metrics[self.name], split, loader).values():
            metric.update(scores, y)

    def _scores_with_eval_statistics(self, fit: RidgeFit, x: Tensor, finite: Tensor, loader: int) -> Tensor:
        """Scores of the fit on ``x`` standardised with the evaluation rows' own statistics (so far, all processes).

        An encoder with BatchNorm gives other features in eval mode than in training: standardising them with the
        training rows' statistics scores a shifted, rescaled copy (issue 22's lag, for the refit). The first loader's
        rows set the statistics; a later loader (a shifted domain) is standardised with them. Where fewer than two
        rows are known, the fitted rows' statistics are used.
        """
        rows = torch.where(finite[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device)).to(torch.float64)
        if loader == 0 or self._eval_moments is None:
            moments = row_moments(x, keep=finite)
            if world_size() > 1:
                all_reduce_sum_([moments])  # one collective per evaluation batch: every process, the same statistics
            self._eval_moments = moments if self._eval_moments is None else self._eval_moments + moments
        mean, var, seen = moments_statistics(self._eval_moments, minimum=2)
        std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
        mean = torch.where(seen, mean, fit.mean.to(torch.float64))
        std = torch.where(seen, std, fit.std.to(torch.float64))
        # The fit in standardised coordinates: W_z = W * std_fit, b_z = b + mean_fit @ W (see RidgeFit).
        weight_z = fit.weight * fit.std.to(torch.float64)[:, None]
        bias_z = fit.bias + fit.mean.to(torch.float64) @ fit.weight
        return torch.addmm(bias_z, (rows - mean) / std, weight_z)

    def log_evaluation(self, pl_module: pl.LightningModule, split: str, skip: bool) -> None:
        fit, self._eval_fit = self._eval_fit, None
        nonfinite, self._eval_nonfinite = self._eval_nonfinite, None
        if nonfinite is not None and not skip and split not in self._warned:
            self._warn_eval_nonfinite(split, nonfinite)
        log_loader_metrics(pl_module, pl_module.callbacks_metrics[self.name], self.name, split, skip=skip)
        if fit is not None and split == "val" and not skip:
            pl_module.log(
                f"{STAGE_PREFIX[split]}/{self.name}_lambda",
                fit.lambda_,
                on_step=False,
                on_epoch=True,
                add_dataloader_idx=False,
            )

    def _warn_eval_nonfinite(self, split: str, count: Tensor) -> None:
        """Warn once per run when evaluation samples with non-finite features were left out (one collective)."""
        skipped = int(all_reduce_sum([count])[0])
        if not skipped:
            return
        self._warned.add(split)
        rank_zero_warn(
            f"{self._owner}: {skipped} {_SPLIT_WORD[split]} samples had non-finite features (NaN/inf) and were left "
            f"out of {STAGE_PREFIX[split]}/{self.name}_* (warned once per run). Check the model for a diverging loss "
            "or a precision overflow.",
            category=RuntimeWarning,
        )

    # ------------------------------------------------------------------ batches

    def _locate(self, outputs: Any, batch: Any, required: bool) -> tuple[Tensor, Tensor | None]:
        features = features_of(self.input, outputs, batch, self._owner)
        labels = target_of(self.target, outputs, batch, self._owner, required=required)
        return features, labels

    def _rows(self, features: Tensor, labels: Tensor, what: str) -> tuple[Tensor, Tensor]:
        """Features ``(B, D)`` (detached) and int64 labels ``(B,)``, checked to pair up."""
        x = features.detach()
        if x.ndim == 1:
            x = x[:, None]  # one feature per sample
        if x.ndim != 2:
            raise RuntimeError(
                f"{self._owner}: features {self.input!r} have shape {tuple(x.shape)}, but the ridge statistics need "
                "one row of D features per sample, (B, D). HINT: pool them first (mean over tokens or space, a CLS "
                f"token, or sslprobe.Layer(path, pool='auto')); flattening them (input=lambda out, batch: "
                f"out[{self.input!r}].flatten(1)) makes D the product of the sizes, and the statistics hold D^2 "
                "float64 numbers."
            )
        if x.is_complex() or x.dtype == torch.bool:
            raise RuntimeError(
                f"{self._owner}: features {self.input!r} are {x.dtype}; the ridge classifier needs real features. "
                "Convert them with .float()."
            )
        if not x.is_floating_point():
            x = x.to(torch.float64)  # integer features are summed in float64 too
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise RuntimeError(
                f"{self._owner}: the ridge classifier needs integer class labels, got {labels.dtype} of shape "
                f"{tuple(labels.shape)}. Convert them with .long() (-100 marks a sample to leave out); class "
                "probabilities (soft targets) cannot be refitted."
            )
        y = labels.detach().reshape(-1).long()  # int8/16/32 and uint8 labels compare and index as int64
        rows, count = x.shape[0], y.shape[0]
        if rows != count:
            views = f" ({rows // count} views of each sample concatenated?)" if count and rows % count == 0 else ""
            raise RuntimeError(
                f"{self._owner}: the {what} batch has {rows} feature rows ({self.input!r}) but {count} labels "
                f"({self.target!r}){views}. Give one integer label per row, e.g. target=lambda out, batch: "
                f"batch[{self.target!r}].repeat({max(rows // max(count, 1), 1)}), or probe one view."
            )
        return x, y

    # ------------------------------------------------------------------ checkpoint

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"num_classes": self.num_classes, "has_rows": self._has_rows}
        stats = self._stats
        if stats is not None:
            # Lightning saves the state of process 0 only: the rows of every process are summed into it (a
            # collective at each checkpoint; load_state_dict counts them once).
            state["statistics"] = _cpu(all_reduce_sum([stats.buffer])[0])
            state["shift"] = _cpu(stats.shift)
        fit = self._fit
        if fit is not None:
            state["fit"] = {
                **{key: _cpu(getattr(fit, key)) for key in _FIT_TENSORS},
                "lambda": fit.lambda_,
                "rows": fit.rows,
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_classes = state_dict.get("num_classes", self.num_classes)
        if saved_classes != self.num_classes:
            raise RuntimeError(
                f"{self._owner}: the checkpoint's probe was built with num_classes={saved_classes}, this one with "
                f"num_classes={self.num_classes}. Build it with num_classes={saved_classes}, or give it another name "
                "to start fresh."
            )
        buffer = state_dict.get("statistics")
        self._stats = None
        if buffer is not None:
            self._stats = RidgeStatistics.from_buffer(buffer, state_dict["shift"], self.num_classes)
            if rank() != 0:
                self._stats.reset_()  # the checkpoint holds the rows of every process: process 0 keeps them
        fit = state_dict.get("fit")
        self._fit = None
        if fit is not None:
            tensors = {key: fit[key] for key in _FIT_TENSORS}
            self._fit = RidgeFit(**tensors, lambda_=float(fit["lambda"]), rows=int(fit["rows"]))
        self._has_rows = bool(state_dict.get("has_rows", False))
