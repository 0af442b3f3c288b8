"""RankMe, AlphaReQ and LiDAR: label-free health numbers of the representation, logged at each validation."""

from __future__ import annotations

import math
import weakref
from collections.abc import Hashable
from numbers import Real
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from sslprobe._batch import MISSING, Locator, check_locator, features_of, locate
from sslprobe._distributed import all_gather_rows, world_size
from sslprobe._metrics import STAGE_PREFIX
from sslprobe.callbacks.base import check_module, check_name, check_name_free, ensure_containers
from sslprobe.callbacks.evaluation import EvaluationCallback
from sslprobe.probes.spectra import _check_fit_range, alpha_req, lidar, rankme

__all__ = ["AlphaReQ", "LiDAR", "RankMe", "RowStore", "row_store"]

Source = Literal["train", "val"]
_ALLOWED_SOURCES = ("train", "val")


class RowStore:
    """A ring buffer of the most recent finite rows of one input, on the device, shared by the callbacks reading it.

    Every health callback reading the same ``input`` of the same module pushes into one store (the first to see a
    batch pushes it; the others see the same batch token and skip it). A row is one sample's features, of any shape
    (``(D,)``, or ``(q, D)`` for LiDAR's views). The store holds ``queue_size`` rows in total across processes, the
    largest that its readers asked for: ``queue_size // world_size`` per process. Pushing is device work only (no
    host sync): rows with a non-finite value are masked out on the device. At each evaluation the rows of every
    process are gathered once (:meth:`begin` forgets the previous gather, the first :meth:`recent` gathers, the
    other readers reuse it), and each reader takes its most recent ``queue_size // world_size`` rows of each
    process. A process that holds no row still joins the gather (an empty store), so none waits for it.
    """

    def __init__(self) -> None:
        self.queue_size = 0
        self._rows: Tensor | None = None  # (capacity, *S)
        self._ptr = torch.zeros((), dtype=torch.long)  # next slot to write
        self._filled = torch.zeros((), dtype=torch.long)  # rows written, at most the capacity
        self._token: Hashable = None  # the batch pushed last
        self._gathered: tuple[Tensor, list[int]] | None = None  # every process's rows and their counts

    def want(self, queue_size: int) -> None:
        """Ask for at least ``queue_size`` rows in total (the store keeps the largest that any reader asked for)."""
        self.queue_size = max(self.queue_size, queue_size)

    def claims(self, token: Hashable) -> bool:
        """Whether the batch ``token`` is new to this store (it then counts as pushed)."""
        if token == self._token:
            return False
        self._token = token
        return True

    def push(self, rows: Tensor) -> None:
        """Append ``rows`` ``(B, *S)``: their finite ones, in order."""
        n = rows.shape[0]
        if n == 0:
            return
        capacity = max(self.queue_size // world_size(), 1)
        current = self._rows
        if current is None or current.shape != (capacity, *rows.shape[1:]) or current.device != rows.device:
            self._rows = torch.zeros((capacity, *rows.shape[1:]), dtype=torch.float32, device=rows.device)
            self._ptr = torch.zeros((), dtype=torch.long, device=rows.device)
            self._filled = torch.zeros((), dtype=torch.long, device=rows.device)
        finite = torch.isfinite(rows).reshape(n, -1).all(dim=1)  # (n,)
        if n > capacity:  # only the newest `capacity` rows could stay
            rows, finite, n = rows[-capacity:], finite[-capacity:], capacity
        # The finite rows, in batch order, go to the next `count` slots; the other slots of the window of n are
        # rewritten with their own values, so `count` never has to be read on the host.
        count = finite.sum()  # ()
        order = torch.argsort(finite.logical_not().to(torch.uint8), stable=True)  # (n,): finite rows first
        slots = torch.arange(n, device=rows.device)  # (n,)
        dest = (self._ptr + slots) % capacity  # (n,)
        keep = (slots < count).reshape(n, *([1] * (rows.ndim - 1)))  # (n, 1, ...)
        new = torch.where(keep, rows[order].to(torch.float32), self._rows[dest])  # (n, *S)
        self._rows.index_copy_(0, dest, new)
        self._ptr = (self._ptr + count) % capacity
        self._filled = (self._filled + count).clamp_max(capacity)

    def local(self, device: torch.device | str | None = None) -> Tensor:
        """This process's rows, oldest first (one host sync), on ``device`` (default: where they are)."""
        if self._rows is None:
            return torch.zeros(0, device=device)  # the row shape is not known yet
        filled, ptr = torch.stack([self._filled, self._ptr]).tolist()
        idx = torch.arange(ptr - filled, ptr, device=self._rows.device) % self._rows.shape[0]
        return self._rows[idx].to(device) if device is not None else self._rows[idx]

    def begin(self) -> None:
        """Start an evaluation: the next :meth:`recent` gathers the rows again (every reader calls it at its start)."""
        self._gathered = None

    def recent(self, queue_size: int, device: torch.device | str | None = None) -> Tensor:
        """The most recent ``queue_size // world_size`` rows of every process, in rank order (gathered once).

        Every process must call it at the same point (it gathers, on ``device``: the module's).
        """
        if self._gathered is None:
            self._gathered = all_gather_rows(self.local(device))  # the one gather of this evaluation
        rows, counts = self._gathered
        keep = max(queue_size // world_size(), 1)
        parts, start = [], 0
        for count in counts:
            parts.append(rows[start + max(count - keep, 0) : start + count])
            start += count
        return torch.cat(parts) if parts else rows


_STORES: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, RowStore]] = weakref.WeakKeyDictionary()


def row_store(module: nn.Module, key: Hashable) -> RowStore:
    """The one :class:`RowStore` of ``module`` for ``key`` (the input's locator and the kind of rows), made once."""
    stores = _STORES.setdefault(module, {})
    if key not in stores:
        stores[key] = RowStore()
    return stores[key]


class _HealthCallback(EvaluationCallback):
    """Shared life of the health callbacks: rows from training (or validation), one number at each validation."""

    _kind = "rows"  # the kind of rows stored (a store is shared by callbacks reading the same kind of one input)
    _minimum = 2  # the fewest rows the number needs
    _sources = True  # whether it takes source= (LiDAR reads training rows only)
    _store: RowStore | None

    def __init__(self, module: pl.LightningModule | None, name: str | None, input: Locator | None) -> None:
        name = check_name(name, type(self).__name__)
        owner = f"{type(self).__name__}(name={name!r})"
        check_module(module, owner)
        self._input = check_locator(input, "input", owner)
        self._name, self._owner = name, owner

    def _finish_init(self, module: pl.LightningModule | None, queue_size: int, source: Source) -> None:
        self.name, self.input, self.queue_size, self.source = self._name, self._input, queue_size, source
        self._binds_at_setup = module is None
        self._store = None
        self._val_rows: list[Tensor] = []
        self._warned = set()
        if module is not None:
            self.register_metrics(module)
            self._attach_layer(module)

    def _check_queue_size(self, queue_size: Any, example: int) -> None:
        if isinstance(queue_size, bool) or not isinstance(queue_size, int):
            raise TypeError(
                f"{self._owner}: queue_size must be a positive int, got {queue_size!r} ({type(queue_size).__name__}). "
                f"Pass e.g. queue_size={example}."
            )
        if queue_size < 1:
            raise ValueError(
                f"{self._owner}: queue_size must be a positive int, got {queue_size!r}. Pass e.g. queue_size={example}."
            )

    def _check_number(self, arg: str, value: Any, example: str, *, positive: bool) -> float:
        bound = "> 0" if positive else ">= 0"
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(
                f"{self._owner}: {arg} must be a number {bound}, got {value!r} ({type(value).__name__}). "
                f"Pass e.g. {arg}={example}."
            )
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError(
                f"{self._owner}: {arg} must be finite and {bound}, got {value!r}. Pass e.g. {arg}={example}."
            )
        return float(value)

    def _check_source(self, source: Any) -> Source:
        if source not in _ALLOWED_SOURCES:
            raise ValueError(
                f"{self._owner}: source must be one of {', '.join(map(repr, _ALLOWED_SOURCES))}, got {source!r}. "
                "Pass source='val' to compute on each validation's rows, or 'train' for the recent training rows."
            )
        return source

    def register_metrics(self, module: nn.Module) -> None:
        """Reserve ``name`` in ``module.callbacks_metrics`` (an empty entry: the number is computed, not tracked)."""
        _, callbacks_metrics = ensure_containers(module, self._owner)
        check_name_free(self.name, module, self._owner)
        callbacks_metrics[self.name] = nn.ModuleDict()

    def compute(self, rows: Tensor) -> Tensor:
        """The number, from rows ``(N, *S)`` gathered from every process."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute().")

    def rows_of(self, outputs: Any, batch: Any) -> Tensor:
        """A batch's rows ``(B, D)``, detached (other shapes flattened)."""
        features = features_of(self.input, outputs, batch, self._owner)
        return features.detach().reshape(features.shape[0], -1)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Bind if not yet, and join the store of this input (training rows only)."""
        super().setup(trainer, pl_module, stage)
        if self.source == "train":
            self._store = row_store(pl_module, (self._kind, self.input))
            self._store.want(self.queue_size)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Append this batch's rows to the store (device work only), unless another reader of it did."""
        token = (trainer.current_epoch, trainer.global_step, batch_idx)
        if self._store is not None and self._store.claims(token):  # the first reader of this batch pushes it
            self._store.push(self.rows_of(outputs, batch))

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        self._val_rows = []
        if self._store is not None:
            self._store.begin()  # every reader calls it before any reader's log_evaluation gathers

    def score_batch(self, pl_module: pl.LightningModule, outputs: Any, batch: Any, split: str, loader: int) -> None:
        if self.source == "val":
            self._val_rows.append(self.rows_of(outputs, batch).float())

    def log_evaluation(self, pl_module: pl.LightningModule, split: str, skip: bool) -> None:
        # Every decision before the gather depends on the configuration and the hook only, never on this process's
        # rows, so that every process joins the gather (or none does).
        key = f"{STAGE_PREFIX[split]}/{self.name}"
        if skip:
            self._val_rows = []
            return
        if self.source == "train" and split == "test":
            fix = "Pass source='val' to compute it on the test rows." if type(self)._sources else ""
            self._warn_once(
                "test",
                f"{self._owner}: {key} is not logged: this callback reads the recent training rows (source='train'), "
                f"which say nothing of the test set; eval/{self.name} is logged at each validation. {fix}".rstrip(),
            )
            return
        if self.source == "val":
            local = torch.cat(self._val_rows) if self._val_rows else torch.zeros(0, device=pl_module.device)
            self._val_rows = []
            if local.numel():
                local = local[torch.isfinite(local).reshape(local.shape[0], -1).all(dim=1)]
            rows, _ = all_gather_rows(local)  # the one gather of this evaluation
        else:
            assert self._store is not None
            rows = self._store.recent(self.queue_size, pl_module.device)
        if rows.shape[0] < self._minimum:
            if self.source == "train":
                fix = "Validate after some training steps" + (
                    ", or pass source='val' to compute on the validation rows." if type(self)._sources else "."
                )
            else:
                fix = f"Use more {'validation' if split == 'val' else 'test'} samples."
            self._warn_once(
                "few",
                f"{self._owner}: {rows.shape[0]} finite {self.source} rows are stored, fewer than the "
                f"{self._minimum} needed; {key} is not logged this time. {fix}",
            )
            return
        try:
            value = self.compute(rows)
        except ValueError as error:
            self._warn_once("value", f"{self._owner}: {key} is not logged: {error}")
            return
        # Every process computes the same value from the same gathered rows: no reduction is needed.
        pl_module.log(key, value.float(), on_step=False, on_epoch=True, sync_dist=False, add_dataloader_idx=False)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)


class RankMe(_HealthCallback):
    """RankMe: the effective rank of the recent embeddings, ``exp(entropy(p))``, ``p = s / sum(s) + eps``.

    ``s`` are the singular values of the uncentred matrix of the last ``queue_size`` training rows (over every
    process), or of that validation's rows with ``source="val"``. Logged as ``eval/{name}`` at each validation
    (never in the sanity check), the same value on every process; with ``source="val"``, ``trainer.test`` logs
    ``test/{name}`` on the test rows (with ``source="train"`` it logs nothing and says why once). A collapsed
    embedding reads close to 1; higher is a richer embedding (Garrido et al. 2023). See
    :func:`sslprobe.probes.spectra.rankme`.

    - [0] Garrido et al., 2023, https://arxiv.org/abs/2210.02885

    Args:
        module: the LightningModule to probe, or ``None`` to bind to the Trainer's module at setup.
        name: unique id, used in the log name.
        input: where the features ``(B, D)`` are (as for :class:`OnlineProbe`); other shapes are flattened.
        queue_size: rows over all processes (``queue_size // world_size`` per process).
        source: ``"train"`` (the recent training rows) or ``"val"`` (that validation's rows).
        eps: added to every normalised singular value.

    Raises:
        TypeError: for a ``queue_size`` or ``eps`` that is not a number.
        ValueError: for a non-positive ``queue_size``, a negative ``eps``, an unknown ``source``, or a duplicate name.

    Examples:
        >>> import torch
        >>> from sslprobe import Module
        >>> model = Module(forward=lambda self, b, stage: {"h": self.net(b[0])}, net=torch.nn.Linear(4, 8))
        >>> rankme = RankMe(model, "rankme", input="h")
        >>> rankme.queue_size, rankme.source, rankme.eps
        (25600, 'train', 1e-07)
    """

    def __init__(
        self,
        module: pl.LightningModule | None = None,
        name: str | None = None,
        input: Locator | None = None,
        queue_size: int = 25600,
        source: Source = "train",
        eps: float = 1e-7,
    ) -> None:
        super().__init__(module, name, input)
        self._check_queue_size(queue_size, 25600)
        source = self._check_source(source)
        self.eps = self._check_number("eps", eps, "1e-7", positive=False)
        self._finish_init(module, queue_size, source)

    def compute(self, rows: Tensor) -> Tensor:
        """RankMe of ``rows`` ``(N, D)``."""
        return rankme(rows, self.eps)


class AlphaReQ(_HealthCallback):
    """alpha-ReQ: the power-law decay exponent of the eigenspectrum of the recent embeddings' covariance.

    The eigenvalues of the covariance of the centred rows (the last ``queue_size`` training rows over every process,
    or that validation's with ``source="val"``) are fitted as ``lambda_i ~ (i + 1) ** -alpha`` on the 0-based
    indices ``fit_range`` (clipped to the non-zero eigenvalues), by least squares in log-log weighted by one over
    the rank; ``alpha`` is logged as ``eval/{name}``. Agrawal et al. 2022 found downstream accuracy best near
    ``alpha = 1``: lower is a flat (noise-like) spectrum, higher a fast decay towards collapse. See
    :func:`sslprobe.probes.spectra.alpha_req`.

    - [0] Agrawal et al., 2022, https://openreview.net/forum?id=ii9X4vtZGTZ

    Args:
        module: the LightningModule to probe, or ``None`` to bind to the Trainer's module at setup.
        name: unique id, used in the log name.
        input: where the features ``(B, D)`` are; other shapes are flattened.
        queue_size: rows over all processes (``queue_size // world_size`` per process).
        source: ``"train"`` or ``"val"``, as for :class:`RankMe`.
        fit_range: ``(start, stop)``, 0-based eigenvalue indices, ``stop`` excluded.

    Raises:
        TypeError: for a ``queue_size`` that is not an int.
        ValueError: for a non-positive ``queue_size``, a bad ``fit_range``, an unknown ``source``, or a duplicate
            name. When fewer than two eigenvalues of ``fit_range`` exist at a validation, it warns once and logs
            nothing that time.

    Examples:
        >>> alpha = AlphaReQ(None, "alpha", input="h", fit_range=(5, 50))
        >>> alpha.fit_range, alpha.queue_size
        ((5, 50), 25600)
    """

    def __init__(
        self,
        module: pl.LightningModule | None = None,
        name: str | None = None,
        input: Locator | None = None,
        queue_size: int = 25600,
        source: Source = "train",
        fit_range: tuple[int, int] = (10, 100),
    ) -> None:
        super().__init__(module, name, input)
        self._check_queue_size(queue_size, 25600)
        source = self._check_source(source)
        try:
            self.fit_range = _check_fit_range(fit_range)
        except ValueError as error:
            raise ValueError(f"{self._owner}: {str(error).removeprefix('alpha_req: ')}") from None
        self._finish_init(module, queue_size, source)

    def compute(self, rows: Tensor) -> Tensor:
        """alpha-ReQ of ``rows`` ``(N, D)``."""
        return alpha_req(rows, self.fit_range)


class LiDAR(_HealthCallback):
    """LiDAR: the effective rank of the linear discriminant that tells samples apart from their views.

    ``input`` gives each sample's ``q >= 2`` views: a ``(B, q, D)`` tensor or a list/tuple of ``q`` tensors
    ``(B, D)`` (row ``i`` of each is sample ``i``'s view, whatever order the samples come in). Each sample is a
    surrogate class of its views; over the last ``queue_size`` training samples (every process), LiDAR is
    ``exp(entropy(p))`` of the eigenvalues of ``Sigma_w^-1/2 Sigma_b Sigma_w^-1/2`` (Thilak et al. 2024), logged
    as ``eval/{name}``. It is invariant under an invertible linear map of the features (up to ``delta``). See
    :func:`sslprobe.probes.spectra.lidar`.

    - [0] Thilak et al., 2024, https://arxiv.org/abs/2312.04000

    Args:
        module: the LightningModule to probe, or ``None`` to bind to the Trainer's module at setup.
        name: unique id, used in the log name.
        input: where the views are, as above.
        queue_size: samples over all processes (``queue_size // world_size`` per process), each with its views.
        delta: ridge added to ``Sigma_w``.
        eps: added to every normalised eigenvalue.

    Raises:
        TypeError: for a ``queue_size``, ``delta`` or ``eps`` that is not a number.
        ValueError: for a non-positive ``queue_size`` or ``delta``, a negative ``eps``, or a duplicate name.
        RuntimeError: in training, for an input that is not a set of at least two views of the same shape.

    Examples:
        >>> lidar = LiDAR(None, "lidar", input="views")
        >>> lidar.queue_size, lidar.delta, lidar.eps
        (1000, 0.0001, 1e-07)
    """

    _kind = "views"
    _sources = False

    def __init__(
        self,
        module: pl.LightningModule | None = None,
        name: str | None = None,
        input: Locator | None = None,
        queue_size: int = 1000,
        delta: float = 1e-4,
        eps: float = 1e-7,
    ) -> None:
        super().__init__(module, name, input)
        self._check_queue_size(queue_size, 1000)
        self.delta = self._check_number("delta", delta, "1e-4", positive=True)
        self.eps = self._check_number("eps", eps, "1e-7", positive=False)
        self._finish_init(module, queue_size, "train")

    def rows_of(self, outputs: Any, batch: Any) -> Tensor:
        """A batch's views ``(B, q, D)``: one row per sample, its ``q`` views."""
        value = locate(self.input, [outputs, batch], outputs, batch)
        if isinstance(value, (list, tuple)):
            if len(value) < 2 or not all(isinstance(v, Tensor) for v in value):
                raise RuntimeError(
                    f"{self._owner}: input {self.input!r} is a {type(value).__name__} of {len(value)} item(s); LiDAR "
                    "needs q >= 2 views per sample: a (B, q, D) tensor or a list/tuple of q tensors (B, D)."
                )
            shapes = [tuple(v.shape) for v in value]
            if len(set(shapes)) > 1 or len(shapes[0]) != 2:
                raise RuntimeError(
                    f"{self._owner}: the views of input {self.input!r} have shapes {shapes}; LiDAR needs q tensors of "
                    "one shape (B, D), row i of each a view of sample i."
                )
            views = torch.stack([v.detach() for v in value], dim=1)  # (B, q, D)
        else:
            views = features_of(self.input, outputs, batch, self._owner) if value is MISSING else value
            if not isinstance(views, Tensor) or views.ndim != 3 or views.shape[1] < 2:
                got = f"shape {tuple(views.shape)}" if isinstance(views, Tensor) else type(views).__name__
                raise RuntimeError(
                    f"{self._owner}: input {self.input!r} has {got}; LiDAR needs q >= 2 views per sample: a (B, q, D) "
                    "tensor or a list/tuple of q tensors (B, D). A single view (B, D) has no within-sample spread."
                )
            views = views.detach()
        return views  # (B, q, D)

    def compute(self, rows: Tensor) -> Tensor:
        """LiDAR of the stored samples' views ``(n, q, D)``."""
        return lidar(rows, self.delta, self.eps)
