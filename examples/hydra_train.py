"""Probes declared in a Hydra config: ``python examples/hydra_train.py`` (config in ``examples/hydra/``).

Hydra builds each probe from its ``_target_``; none names the model, so each binds to the Trainer's module when
the run is set up. The model and data are those of ``examples/lightning_cli.py`` (digits, no download).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_cli import DigitsData, Encoder


def run(cfg: Any) -> pl.Trainer:
    """Fit the encoder with the probes of ``cfg`` and validate it; returns the Trainer."""
    from hydra.utils import instantiate

    pl.seed_everything(cfg.seed, verbose=False)
    probes = [instantiate(spec) for spec in cfg.probes.values()]
    trainer = pl.Trainer(**cfg.trainer, callbacks=probes)
    model, data = Encoder(**cfg.model), DigitsData()
    trainer.fit(model, datamodule=data)
    trainer.validate(model, datamodule=data)
    return trainer


def main() -> None:
    """Run with Hydra's command line (config and overrides)."""
    import hydra

    hydra.main(config_path="hydra", config_name="config", version_base=None)(run)()


if __name__ == "__main__":
    main()
