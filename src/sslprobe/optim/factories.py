"""Build optimizers and LR schedulers from names, dicts, partials, classes or instances."""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from sslprobe._run_length import UNKNOWN_LENGTH_HINT
from sslprobe.optim.lars import LARS

__all__ = [
    "DEFAULT_PROBE_LARS",
    "OptimizerSpec",
    "SchedulerSpec",
    "check_optimizer_spec",
    "check_scheduler_spec",
    "create_optimizer",
    "create_scheduler",
    "optimizer_classes",
    "scheduler_classes",
    "split_interval",
]

OptimizerSpec = str | Mapping[str, Any] | Callable[..., Optimizer] | type | Optimizer | None
SchedulerSpec = str | Mapping[str, Any] | Callable[..., Any] | type | LRScheduler | None

#: The probe default of the SPEC: what ``optimizer=None`` and ``optimizer="LARS"`` build.
DEFAULT_PROBE_LARS: dict[str, Any] = {
    "lr": 0.1,
    "clip_lr": True,
    "eta": 0.02,
    "exclude_bias_n_norm": True,
    "weight_decay": 0.0,
}
_FALLBACK_LR = 0.1
_ALLOWED_INTERVALS = ("step", "epoch")
# Keyword arguments that pick an implementation; when the user names none, Adam(W) get their fused kernel,
# which skips a non-finite step on the device (see conditional_step).
_IMPLEMENTATION_KWARGS = ("fused", "foreach", "capturable", "differentiable")
_FUSED_BY_DEFAULT = (torch.optim.Adam, torch.optim.AdamW)


def optimizer_classes() -> dict[str, type[Optimizer]]:
    """Every optimizer a name can refer to: ``torch.optim``'s classes and ``LARS``.

    Examples:
        >>> sorted(optimizer_classes())[:3]
        ['ASGD', 'Adadelta', 'Adafactor']
    """
    table = {
        name: obj
        for name, obj in vars(torch.optim).items()
        if isinstance(obj, type) and issubclass(obj, Optimizer) and obj is not Optimizer
    }
    table["LARS"] = LARS
    return table


def scheduler_classes() -> dict[str, type]:
    """Every LR scheduler a name can refer to (``torch.optim.lr_scheduler``'s classes).

    Examples:
        >>> "CosineAnnealingLR" in scheduler_classes()
        True
    """
    module = torch.optim.lr_scheduler
    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, type)
        and not name.startswith("_")
        and name != "LRScheduler"
        and (issubclass(obj, LRScheduler) or name == "ReduceLROnPlateau")
    }


def _lookup(name: str, table: Mapping[str, type], kind: str, owner: str) -> type:
    if name in table:
        return table[name]
    lowered = {key.lower(): key for key in table}
    if name.lower() in lowered:
        return table[lowered[name.lower()]]
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(lowered[c]) for c in close)}?" if close else ""
    raise ValueError(
        f"{owner}: unknown {kind} {name!r}.{hint} Known names: {', '.join(sorted(table))}.",
    )


def _trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def _check_instance_params(optimizer: Optimizer, params: list[nn.Parameter], owner: str) -> Optimizer:
    mine = {id(p) for p in params}
    theirs = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in theirs if id(p) not in mine]
    if foreign or not theirs:
        raise ValueError(
            f"{owner}: the optimizer {type(optimizer).__name__} was built over other parameters "
            f"({len(foreign)} of its {len(theirs)} tensors are not the probe's trainable parameters). Build it over "
            "this probe's parameters, or pass a name, a dict or a partial and let the callback build it."
        )
    return optimizer


def _weight_decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    # Biases and other 1-D tensors (norm scales) get no weight decay, as in timm and most SSL recipes.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _signature_default(cls: type, name: str) -> Any:
    try:
        parameter = inspect.signature(cls.__init__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    if parameter is None:
        return None
    return None if parameter.default is inspect.Parameter.empty else parameter.default


def _accepts(cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _check_kwargs(cls: type, kwargs: Mapping[str, Any], skip: tuple[str, ...], owner: str) -> None:
    """Raise for a keyword argument that ``cls`` does not take, listing those it does (and close names)."""
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return  # a class taking **kwargs checks them itself
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in parameters[1:] if p.kind in kinds and p.name not in skip]
    unknown = [key for key in kwargs if key not in accepted]
    if not unknown:
        return
    close = {key: difflib.get_close_matches(key, accepted, n=1, cutoff=0.6) for key in unknown}
    hints = [f"{key!r} (did you mean {match[0]!r}?)" if match else repr(key) for key, match in close.items()]
    raise TypeError(
        f"{owner}: could not build {cls.__name__}({dict(kwargs)}): it takes no keyword argument {', '.join(hints)}. "
        f"It accepts: {', '.join(accepted)}."
    )


def check_optimizer_spec(spec: OptimizerSpec, *, owner: str = "sslprobe") -> None:
    """Check a name or dict optimizer spec before anything is built: a known name, and arguments its class takes.

    Examples:
        >>> check_optimizer_spec({"type": "SGD", "lr": 0.1, "momentum": 0.9})
        >>> check_optimizer_spec({"type": "SGD", "betas": (0.9, 0.99)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        TypeError: sslprobe: could not build SGD({'betas': (0.9, 0.99)}): it takes no keyword argument 'betas'. ...
    """
    if isinstance(spec, str):
        _lookup(spec, optimizer_classes(), "optimizer", owner)
    elif isinstance(spec, Mapping):
        cls, kwargs = _class_and_kwargs(spec, optimizer_classes(), "optimizer", owner)
        if isinstance(cls, type):
            _check_kwargs(cls, kwargs, ("params",), owner)


def check_scheduler_spec(spec: SchedulerSpec, *, owner: str = "sslprobe") -> None:
    """Check a name or dict scheduler spec before anything is built: a known name, and arguments its class takes.

    Examples:
        >>> check_scheduler_spec({"type": "StepLR", "step_size": 2, "interval": "epoch"})
        >>> check_scheduler_spec({"type": "StepLR", "step": 2})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        TypeError: sslprobe: could not build StepLR({'step': 2}): it takes no keyword argument 'step' (did you ...
    """
    if isinstance(spec, str):
        _lookup(spec, scheduler_classes(), "scheduler", owner)
    elif isinstance(spec, Mapping):
        rest, _ = split_interval(spec, owner=owner)
        cls, kwargs = _class_and_kwargs(rest, scheduler_classes(), "scheduler", owner)  # type: ignore[arg-type]
        if isinstance(cls, type):
            _check_kwargs(cls, kwargs, ("optimizer",), owner)


_DICT_EXAMPLES = {
    "optimizer": ("an optimizer", "{'type': 'AdamW', 'lr': 1e-3}"),
    "scheduler": ("a scheduler", "{'type': 'CosineAnnealingLR', 'interval': 'step'}"),
}


def _class_and_kwargs(spec: Mapping[str, Any], table: Mapping[str, type], what: str, owner: str) -> tuple[Any, dict]:
    """The class a ``{"type": ..., **kwargs}`` dict names (a name looked up in ``table``, or a class) and its kwargs."""
    kwargs = dict(spec)
    kind = kwargs.pop("type", None)
    if kind is None:
        article, example = _DICT_EXAMPLES[what]
        raise ValueError(
            f"{owner}: {article} dict needs a 'type' key, got keys {sorted(kwargs)}. Write it as {example}."
        )
    return (_lookup(kind, table, what, owner) if isinstance(kind, str) else kind), kwargs


def _build_optimizer(cls: type[Optimizer], params: list[nn.Parameter], kwargs: dict[str, Any], owner: str) -> Optimizer:
    _check_kwargs(cls, kwargs, ("params",), owner)
    kwargs = dict(kwargs)
    if cls is LARS:
        kwargs = {**DEFAULT_PROBE_LARS, **kwargs}
        groups: list[Any] = [{"params": params}]
    else:
        if "lr" not in kwargs and _accepts(cls, "lr") and _signature_default(cls, "lr") is None:
            kwargs["lr"] = _FALLBACK_LR
        # Fused kernels take a device-side skip flag, so a non-finite batch is skipped without a host sync.
        fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        if fusable and issubclass(cls, _FUSED_BY_DEFAULT) and not any(k in kwargs for k in _IMPLEMENTATION_KWARGS):
            kwargs["fused"] = True
        weight_decay = kwargs.get("weight_decay", _signature_default(cls, "weight_decay")) or 0.0
        groups = _weight_decay_groups(params, weight_decay) if weight_decay else [{"params": params}]
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise type(err)(f"{owner}: could not build {cls.__name__}({kwargs}): {err}") from err


def create_optimizer(spec: OptimizerSpec, params: Iterable[nn.Parameter], *, owner: str = "sslprobe") -> Optimizer:
    """Build an optimizer over ``params`` from any accepted form.

    Forms: ``None`` (LARS with the probe default ``lr=0.1, clip_lr=True, eta=0.02, exclude_bias_n_norm=True,
    weight_decay=0``); a name (``"AdamW"``, ``"SGD"``, ``"LARS"``; case-insensitive; the class's own defaults,
    ``lr=0.1`` where it has none); a dict ``{"type": name, **kwargs}``; an optimizer class; a callable or
    ``functools.partial`` taking the parameter list; an optimizer instance already built over these parameters.
    Frozen parameters are left out. Adam and AdamW get ``fused=True`` when no implementation was chosen; with
    ``weight_decay > 0``, biases and other 1-D tensors get no weight decay.

    Args:
        spec: the optimizer, in one of the forms above.
        params: the parameters to optimize.
        owner: names the caller in error messages.

    Returns:
        The optimizer.

    Raises:
        ValueError: an unknown name (close names are listed) or an instance over other parameters.
        TypeError: a form that is none of the above, or arguments the class rejects.

    Examples:
        >>> import torch
        >>> w = torch.nn.Linear(4, 2)
        >>> type(create_optimizer({"type": "adamw", "lr": 1e-3}, w.parameters())).__name__
        'AdamW'
        >>> create_optimizer(None, w.parameters()).defaults["eta"]
        0.02
    """
    params = _trainable(params)
    if not params:
        raise ValueError(f"{owner}: there are no trainable parameters to optimize (all have requires_grad=False).")
    table = optimizer_classes()
    if spec is None:
        return _build_optimizer(LARS, params, {}, owner)
    if isinstance(spec, Optimizer):
        return _check_instance_params(spec, params, owner)
    if isinstance(spec, str):
        return _build_optimizer(_lookup(spec, table, "optimizer", owner), params, {}, owner)
    if isinstance(spec, Mapping):
        cls, kwargs = _class_and_kwargs(spec, table, "optimizer", owner)
        return _build_optimizer(cls, params, kwargs, owner)
    if isinstance(spec, type) and issubclass(spec, Optimizer):
        return _build_optimizer(spec, params, {}, owner)
    if callable(spec):
        built = spec(params)
        if not isinstance(built, Optimizer):
            raise TypeError(
                f"{owner}: the optimizer factory {spec!r} returned {type(built).__name__}, expected a "
                "torch.optim.Optimizer."
            )
        return _check_instance_params(built, params, owner)
    raise TypeError(
        f"{owner}: optimizer must be None, a name, a dict with 'type', an Optimizer class, a callable taking the "
        f"parameters, or an Optimizer instance, got {type(spec).__name__}."
    )


def split_interval(spec: SchedulerSpec, *, owner: str = "sslprobe") -> tuple[SchedulerSpec, Literal["step", "epoch"]]:
    """Separate the ``"interval"`` key of a dict scheduler spec (default ``"step"``).

    Examples:
        >>> split_interval({"type": "StepLR", "step_size": 2, "interval": "epoch"})
        ({'type': 'StepLR', 'step_size': 2}, 'epoch')
    """
    if not isinstance(spec, Mapping) or "interval" not in spec:
        return spec, "step"
    rest = dict(spec)
    interval = rest.pop("interval")
    if interval not in _ALLOWED_INTERVALS:
        raise ValueError(f"{owner}: scheduler interval must be one of {_ALLOWED_INTERVALS}, got {interval!r}.")
    return rest, interval


def _scheduler_defaults(cls: type, optimizer: Optimizer, total: int | None) -> dict[str, Any]:
    """Defaults for arguments a scheduler needs, scaled to the run's length ``total``."""
    name = cls.__name__
    if name == "ConstantLR":
        return {"factor": 1.0}
    if total is None:
        return {}
    total = max(int(total), 1)
    table: dict[str, dict[str, Any]] = {
        "CosineAnnealingLR": {"T_max": total},
        "CosineAnnealingWarmRestarts": {"T_0": total},
        "StepLR": {"step_size": max(total // 3, 1)},
        "MultiStepLR": {"milestones": [max(int(total * 0.6), 1), max(int(total * 0.8), 1)]},
        "ExponentialLR": {"gamma": 0.01 ** (1.0 / total)},
        "LinearLR": {"start_factor": 1.0, "end_factor": 0.0, "total_iters": total},
        "PolynomialLR": {"total_iters": total},
        "OneCycleLR": {"max_lr": [group["lr"] for group in optimizer.param_groups], "total_steps": total},
    }
    return table.get(name, {})


def create_scheduler(
    spec: SchedulerSpec,
    optimizer: Optimizer,
    *,
    total: int | float | None = None,
    owner: str = "sslprobe",
) -> Any:
    """Build an LR scheduler for ``optimizer`` from any accepted form.

    Forms: ``None`` (``ConstantLR(factor=1.0)``); a name (``"CosineAnnealingLR"``, ...); a dict
    ``{"type": name, **kwargs}`` (strip ``"interval"`` first with :func:`split_interval`); a scheduler class; a
    callable or ``functools.partial`` taking the optimizer; a scheduler instance bound to ``optimizer``.
    Arguments that set a length and were not given are scaled to ``total`` (the number of scheduler steps in
    the run): cosine over the whole run, ``StepLR`` every third, ``LinearLR`` and ``PolynomialLR`` to zero,
    ``ExponentialLR`` to 1% at the end, ``OneCycleLR`` over the run.

    Args:
        spec: the scheduler, in one of the forms above.
        optimizer: the optimizer to schedule.
        total: the number of scheduler steps in the run, if known.
        owner: names the caller in error messages.

    Returns:
        The scheduler.

    Raises:
        ValueError: an unknown name, a scheduler that needs a monitored metric, a length that cannot be derived,
            or an instance bound to another optimizer.
        TypeError: a form that is none of the above, or arguments the class rejects.

    Examples:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        >>> create_scheduler("CosineAnnealingLR", opt, total=10).T_max
        10
    """
    if isinstance(spec, Mapping) and "interval" in spec:
        spec, _ = split_interval(spec, owner=owner)
    if total is not None and not math.isfinite(total):
        total = None
    if spec is None:
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    if isinstance(spec, LRScheduler) or (hasattr(spec, "step") and hasattr(spec, "optimizer")):
        if spec.optimizer is not optimizer:
            raise ValueError(
                f"{owner}: the scheduler {type(spec).__name__} is bound to another optimizer. Build it over this "
                "probe's optimizer (pass that optimizer instance as optimizer=), or pass a name, dict or partial."
            )
        return spec
    table = scheduler_classes()
    if isinstance(spec, str):
        cls, kwargs = _lookup(spec, table, "scheduler", owner), {}
    elif isinstance(spec, Mapping):
        cls, kwargs = _class_and_kwargs(spec, table, "scheduler", owner)
    elif isinstance(spec, type):
        cls, kwargs = spec, {}
    elif callable(spec):
        return spec(optimizer)
    else:
        raise TypeError(
            f"{owner}: scheduler must be None, a name, a dict with 'type', a scheduler class, a callable taking the "
            f"optimizer, or a scheduler instance, got {type(spec).__name__}."
        )
    if cls.__name__ == "ReduceLROnPlateau":
        raise ValueError(
            f"{owner}: ReduceLROnPlateau needs a monitored metric, which a probe's own scheduler does not have. "
            "Use a step-based schedule such as 'CosineAnnealingLR' or 'StepLR'."
        )
    _check_kwargs(cls, kwargs, ("optimizer",), owner)
    kwargs = {**_scheduler_defaults(cls, optimizer, total), **kwargs}
    try:
        return cls(optimizer, **kwargs)
    except TypeError as err:
        hint = f" {UNKNOWN_LENGTH_HINT}" if total is None else ""
        raise TypeError(f"{owner}: could not build {cls.__name__}({kwargs}): {err}.{hint}") from err
