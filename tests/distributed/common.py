"""Data and module shared by the DDP worker and the single-process references of the DDP tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from sslprobe import Module
from sslprobe.callbacks import AlphaReQ, LiDAR, OnlineProbe, RankMe
from tests.conftest import DictDataset, make_xy

NUM_CLASSES = 3


def forward(self, batch, stage):
    emb = self.backbone(batch["x"])
    out = {"embedding": emb}
    if stage == "fit" and self.trains_main_model:
        out["loss"] = emb.pow(2).mean()
    return out


def build_module(trainable: bool) -> Module:
    """A backbone whose features do not change during training: lr 0 when trainable, or no optimizer at all."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    return Module(forward=forward, backbone=backbone, optim={"type": "SGD", "lr": 0.0} if trainable else None)


def linear_probe(model: Module, **kwargs: object) -> OnlineProbe:
    """The linear probe both sides of a comparison build: SGD with momentum unless told otherwise."""
    options = {"optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9}, **kwargs}
    return OnlineProbe(model, "linear", "embedding", "label", probe=nn.Linear(16, NUM_CLASSES), **options)


def two_views(outputs, batch):
    """Two views of each sample for LiDAR: the embedding and a fixed nonlinear change of it."""
    emb = outputs["embedding"]
    return [emb, torch.tanh(2 * emb) + 0.1 * batch["x"][:, :1]]


def health_callbacks(model: Module) -> list:
    """The health callbacks both sides of the DDP comparison build (RankMe keeps 32 of the store's 1000 rows)."""
    return [
        RankMe(model, "rankme", "embedding", queue_size=32),
        AlphaReQ(model, "alpha", "embedding", queue_size=1000, fit_range=(0, 100)),
        RankMe(model, "rankme_val", "embedding", source="val"),
        LiDAR(model, "lidar", two_views),
    ]


def loader(n: int, batch_size: int, seed: int = 0) -> DataLoader:
    x, y = make_xy(n, seed)
    return DataLoader(DictDataset(x, y), batch_size=batch_size, shuffle=False)


class ShardedData(pl.LightningDataModule):
    """Train and val sets sharded in order (rank r takes samples r, r + W, ...), so that global batch i holds the
    same samples as batch i of a single process with a W times larger batch."""

    def __init__(self, n_train: int = 48, n_val: int = 24, batch_size: int = 4) -> None:
        super().__init__()
        self.n_train, self.n_val, self.batch_size = n_train, n_val, batch_size

    def _loader(self, n: int, seed: int) -> DataLoader:
        x, y = make_xy(n, seed)
        dataset = DictDataset(x, y)
        sampler = DistributedSampler(dataset, shuffle=False) if dist.is_initialized() else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.n_train, 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.n_val, 1)
