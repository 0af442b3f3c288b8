"""How many scheduler steps a run has: the one place the probes and ``Module`` read the Trainer's length from."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["UNKNOWN_LENGTH_HINT", "run_length"]

#: What to do when :func:`run_length` cannot know the length (said by every error about it).
UNKNOWN_LENGTH_HINT = (
    "The run's length is unknown (a streaming training loader without __len__, or max_epochs=-1): set "
    "Trainer(max_steps=N), or give the scheduler its length (e.g. {'type': 'CosineAnnealingLR', 'T_max': N})."
)


def run_length(trainer: Any, interval: str, every: int = 1) -> int | None:
    """Scheduler steps in ``trainer``'s run, or ``None`` when the run's length is not known.

    ``interval="epoch"`` counts epochs (``max_epochs``). ``"step"`` counts optimizer steps of something that
    steps once every ``every`` training batches: Lightning's ``estimated_stepping_batches`` (optimizer steps of
    the main model, ``max_steps`` where it is set) turned back into batches, divided by ``every``. Lightning
    answers ``-1`` for an unsized loader without ``max_steps`` and ``inf`` for an endless run: both are unknown
    here, never a one-step schedule.

    Examples:
        >>> from types import SimpleNamespace
        >>> run_length(SimpleNamespace(max_epochs=10), "epoch")
        10
        >>> trainer = SimpleNamespace(estimated_stepping_batches=100, accumulate_grad_batches=1)
        >>> run_length(trainer, "step"), run_length(trainer, "step", every=4)
        (100, 25)
        >>> run_length(SimpleNamespace(estimated_stepping_batches=-1, accumulate_grad_batches=1), "step") is None
        True
    """
    if interval == "epoch":
        epochs = trainer.max_epochs
        return epochs if epochs is not None and epochs > 0 else None
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # no training loader attached yet
        return None
    if not isinstance(steps, (int, float)) or not math.isfinite(steps) or steps <= 0:
        return None
    batches = steps * (getattr(trainer, "accumulate_grad_batches", 1) or 1)
    return max(math.ceil(batches / every), 1)
