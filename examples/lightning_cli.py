"""Probes declared in a LightningCLI config.

Run: ``python examples/lightning_cli.py fit --config examples/lightning_cli.yaml``.

The model is a tiny encoder on scikit-learn's digits (no download). The probes are listed under
``trainer.callbacks`` with ``module`` left out: each binds to the Trainer's module when the run is set up, and the
same callback objects serve ``fit``, ``validate`` and ``test``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsData(pl.LightningDataModule):
    """scikit-learn's 8x8 digits as ``(image, label)`` tuples, split 80/20."""

    def __init__(self, batch_size: int = 128) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y)
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(y), generator=generator)
        cut = int(0.8 * len(y))
        self.train = TensorDataset(x[order[:cut]], y[order[:cut]])
        self.val = TensorDataset(x[order[cut:]], y[order[cut:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class Encoder(pl.LightningModule):
    """An encoder trained by a stand-in self-supervised loss; its steps return the features for the probes."""

    def __init__(self, width: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width))

    def training_step(self, batch, batch_idx):
        h = self.backbone(batch[0])
        # A stand-in SSL loss (features of a noisy view close to the clean ones, with a variance floor).
        noisy = self.backbone(batch[0] + 0.1 * torch.randn_like(batch[0]))
        loss = (h - noisy).pow(2).mean() + torch.relu(1 - h.std(0)).mean()
        return {"loss": loss, "embedding": h}

    def validation_step(self, batch, batch_idx):
        return {"embedding": self.backbone(batch[0])}

    def test_step(self, batch, batch_idx):
        return {"embedding": self.backbone(batch[0])}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.backbone.parameters(), lr=self.hparams.lr)


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the command line (``args`` as ``sys.argv[1:]`` would be)."""
    return LightningCLI(Encoder, DigitsData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
