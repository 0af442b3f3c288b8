"""Tiny shared fixtures: dict-batch data, a few-parameter backbone, a quiet CPU Trainer."""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslprobe import Module

D_IN, D_EMB, NUM_CLASSES = 8, 16, 3

# Keep the suite quiet and single-threaded per test process: it runs on 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("PL_DISABLE_FORK", "1")


class DictDataset(Dataset):
    """Samples as dicts ``{"x": (D,), "label": ()}`` from fixed tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "label": self.y[i]}


class TupleDataset(DictDataset):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.x[i], self.y[i]


def make_xy(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    centers = torch.randn(NUM_CLASSES, D_IN, generator=g) * 2
    x = centers[y] + torch.randn(n, D_IN, generator=g)
    return x, y


def dict_loader(n: int = 48, batch_size: int = 8, seed: int = 0, **kw: Any) -> DataLoader:
    x, y = make_xy(n, seed)
    return DataLoader(DictDataset(x, y), batch_size=batch_size, **kw)


def tuple_loader(n: int = 48, batch_size: int = 8, seed: int = 0) -> DataLoader:
    x, y = make_xy(n, seed)
    return DataLoader(TupleDataset(x, y), batch_size=batch_size)


def forward(self: Module, batch: dict, stage: str) -> dict:
    emb = self.backbone(batch["x"])
    out = {"embedding": emb}
    if stage == "fit":
        out["loss"] = emb.pow(2).mean()
    return out


def make_module(optim: Any = "default", seed: int = 0, **kw: Any) -> Module:
    torch.manual_seed(seed)
    if optim == "default":
        optim = {"type": "SGD", "lr": 0.05, "momentum": 0.9}
    backbone = nn.Sequential(nn.Linear(D_IN, D_EMB), nn.ReLU())
    return Module(forward=forward, backbone=backbone, optim=optim, **kw)


def make_trainer(**kw: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "max_epochs": 1,
    }
    defaults.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.Trainer(**defaults)


@pytest.fixture(autouse=True)
def _quiet_lightning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="lightning.pytorch")
