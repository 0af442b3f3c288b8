"""``sslprobe demo``: SimCLR on scikit-learn's digits with live probes, then an honest offline comparison."""

from __future__ import annotations

import argparse
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslprobe._imports import require
from sslprobe.callbacks import OnlineProbe, RankMe, RefitProbe
from sslprobe.cli.simclr import ConvEncoder, augment, nt_xent
from sslprobe.module import Module
from sslprobe.probes import LinearProbe

__all__ = ["add_arguments", "run_demo"]

NUM_CLASSES = 10


class DigitsDataset(Dataset):
    """Digits images ``(1, 8, 8)`` in [0, 1] with labels, as dict samples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


def load_split(seed: int) -> tuple[DigitsDataset, DigitsDataset]:
    """scikit-learn's digits (bundled with it, no download), split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)

    def to_set(xs: Any, ys: Any) -> DigitsDataset:
        images = torch.tensor(xs, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        return DigitsDataset(images, torch.tensor(ys, dtype=torch.long))

    return to_set(x_tr, y_tr), to_set(x_va, y_va)


def simclr_forward(self: Module, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
    """Embeddings of the clean images for the probes; in ``fit`` also the NT-Xent loss of two augmented views."""
    images = batch["image"]
    if stage != "fit":
        return {"embedding": self.backbone(images)}
    v1, v2 = augment(images), augment(images)
    h = self.backbone(torch.cat([images, v1, v2]))
    h_clean, h1, h2 = h.chunk(3)
    loss = nt_xent(self.projector(h1), self.projector(h2), temperature=self.temperature)
    self.log("train/ssl_loss", loss, prog_bar=True)
    return {"embedding": h_clean, "loss": loss}


def build(args: argparse.Namespace, steps_per_epoch: int) -> tuple[Module, tuple[pl.Callback, ...]]:
    """The SimCLR module and its probes: a live linear probe, and a ridge refitted at every validation."""
    encoder = ConvEncoder(out_features=128, width=32)
    projector = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    model = Module(
        forward=simclr_forward,
        backbone=encoder,
        projector=projector,
        temperature=0.2,
        optim={
            "optimizer": {"type": "AdamW", "lr": 2e-3, "weight_decay": 1e-4},
            "scheduler": "CosineAnnealingLR",
            "interval": "step",
        },
    )
    probes = (
        OnlineProbe(model, "linear", input="embedding", target="label", probe=LinearProbe(NUM_CLASSES)),
        RefitProbe(model, "refit", input="embedding", target="label", num_classes=NUM_CLASSES),
        RankMe(model, "rankme", input="embedding"),  # label-free: the embedding's effective rank (of 128)
    )
    return model, probes


def offline_linear_eval(model: Module, train: DigitsDataset, val: DigitsDataset) -> float:
    """Logistic regression (scikit-learn) on the final frozen encoder's features: the offline reference."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model.eval()
    with torch.no_grad():
        f_tr = model.backbone(train.images.to(model.device)).cpu().numpy()
        f_va = model.backbone(val.images.to(model.device)).cpu().numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    clf.fit(f_tr, train.labels.numpy())
    return float(clf.score(f_va, val.labels.numpy()))


def first_and_last(csv_path: Path, column: str) -> tuple[float | None, float | None]:
    """The first and last logged value of ``column``."""
    from sslprobe.cli.plot import read_metrics

    points = read_metrics(csv_path).get(column, [])
    return (points[0][2], points[-1][2]) if points else (None, None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a fresh ./runs/demo-*)")
    parser.add_argument("--max-epochs", type=int, default=30, help="pretraining epochs (default: 30)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default: cpu)")
    parser.add_argument("--devices", default="1", help="Lightning devices (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain, probe live, plot, compare with the offline evaluation; return the summary."""
    require("sklearn", feature="sslprobe demo")
    require("matplotlib", feature="sslprobe demo")
    from sslprobe.cli.plot import plot_metrics

    out = args.out or Path("runs") / datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(args.seed, verbose=False)
    train, val = load_split(args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(val, batch_size=512)
    model, probes = build(args, len(train_loader))
    devices: Any = int(args.devices) if str(args.devices).isdigit() else args.devices
    logger = CSVLogger(save_dir=str(out), name="", version="")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
        trainer = pl.Trainer(
            max_epochs=args.max_epochs,
            accelerator=args.accelerator,
            devices=devices,
            logger=logger,
            log_every_n_steps=1,
            # The Trainer adds its own callbacks (the progress bar) to the list it is given: hand it a copy, and
            # report on the probes built here.
            callbacks=list(probes),
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=not args.no_progress,
            default_root_dir=str(out),
        )
        print(f"sslprobe demo: SimCLR on digits ({len(train)} train / {len(val)} val), {args.max_epochs} epochs")
        start = time.perf_counter()
        trainer.fit(model, train_loader, val_loader)
        seconds = time.perf_counter() - start
    csv_path = out / "metrics.csv"
    png = plot_metrics(csv_path, out / "probes.png", title="sslprobe demo: SimCLR on digits")
    offline = offline_linear_eval(model, train, val)
    rows = []
    for probe in probes:
        if isinstance(probe, RankMe):
            continue  # not an accuracy: printed below
        column = f"eval/{probe.name}_top1"
        first, last = first_and_last(csv_path, column)
        rows.append((probe.name, first, last))
    rank_first, rank_last = first_and_last(csv_path, "eval/rankme")
    print()
    print(f"{'probe':<10} {'first epoch top-1':>18} {'last epoch top-1':>17}")
    for name, first, last in rows:
        print(f"{name:<10} {_fmt(first):>18} {_fmt(last):>17}")
    print(f"{'offline':<10} {'':>18} {offline:>17.4f}   (scikit-learn logistic regression on the final encoder)")
    print(f"RankMe (label-free effective rank of the 128-d embedding): {_fmt(rank_first)} -> {_fmt(rank_last)}")
    print(f"\ntrained in {seconds:.0f} s; files in {out}/: metrics.csv, {png.name}")
    return {"out": out, "rows": rows, "offline": offline, "seconds": seconds, "png": png}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
