"""Fidelity: do the online probes report what an offline evaluation of the same features says?

Setup (the one the anchors measured for the reference implementation): scikit-learn digits, a frozen random
ReLU layer 64 -> 256 (seed 0) as the "representation", 70/30 stratified split (random_state=0), batch 64.
Offline references: scikit-learn LogisticRegression(C=10, max_iter=5000) on the raw features (0.9796), and
KNeighborsClassifier with the kNN probe's k, cosine metric and exp(sim / T) weights.

Usage: python benchmarks/fidelity.py [--epochs 20] [--seeds 0 1 2] [--only linear,sweep,attentive]
                                     [--precision 32-true|bf16-mixed]
Probes (--only): linear (LinearProbe), plain-linear (nn.Linear), sweep (ProbeSweep), knn (OnlineKNN), mlp (MLPProbe),
attentive (AttentiveProbe, 4 heads, AdamW lr 1e-3, on the 256 features split into 16 tokens of 16: the (B, N, D) shape
it pools over) and refit (RefitProbe).
Prints each probe's final eval top-1, the offline number and the gap, per seed and on average.

Precision (--precision, default 32-true): the Trainer's, e.g. bf16-mixed to compare the online numbers with fp32 on the
CPU (issue 21: a probe under bf16-mixed should read within 0.2 points of fp32). The offline references always use the
fp32 features.

Moving encoder (--moving): the demo's SimCLR run (`sslprobe demo`'s model, data and probe). After every validation it
prints the logged `eval/linear_top1`, the same probe weights scored on the validation features normalised with their
exact statistics, and an offline logistic regression on the encoder of that moment.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from functools import partial

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslprobe import Module
from sslprobe.callbacks import OnlineKNN, OnlineProbe, ProbeSweep, RefitProbe
from sslprobe.probes import AttentiveProbe, LinearProbe, MLPProbe


class Digits(Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def data():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    return train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)


def frozen_backbone():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(64, 256), nn.ReLU())
    return backbone.requires_grad_(False)


def features(backbone, x):
    with torch.no_grad():
        return backbone(torch.tensor(x, dtype=torch.float32)).numpy()


def forward(self, batch, stage):
    return {"embedding": self.backbone(batch["image"])}


def knn_reference(f_tr, y_tr, f_te, y_te, k, temperature):
    def weights(distances):
        # cosine distance = 1 - similarity; vote weight exp(similarity / T)
        return np.exp((1.0 - distances) / temperature)

    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=weights, algorithm="brute")
    return clf.fit(f_tr, y_tr).score(f_te, y_te)


def run(seed, epochs, only, precision="32-true"):
    x_tr, x_te, y_tr, y_te = data()
    backbone = frozen_backbone()
    f_tr, f_te = features(backbone, x_tr), features(backbone, x_te)
    offline = LogisticRegression(max_iter=5000, C=10.0).fit(f_tr, y_tr).score(f_te, y_te)
    pl.seed_everything(seed, verbose=False)
    model = Module(forward=forward, backbone=backbone)
    # Probes are given as factories: built on their private RNG stream, they leave the data order (the global
    # stream) the same whichever probes run together.
    callbacks = {}
    if "linear" in only:
        callbacks["linear"] = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(10))
    if "plain-linear" in only:
        callbacks["plain-linear"] = OnlineProbe(
            model, "plain_linear", "embedding", "label", probe=partial(nn.Linear, 256, 10)
        )
    if "mlp" in only:
        callbacks["mlp"] = OnlineProbe(model, "mlp", "embedding", "label", probe=partial(MLPProbe, 10, hidden=256))
    if "attentive" in only:
        # The 256 features seen as 16 tokens of 16: the shape an attentive probe pools over.
        tokens = lambda out, batch: out["embedding"].view(-1, 16, 16)  # noqa: E731
        callbacks["attentive"] = OnlineProbe(
            model,
            "attentive",
            tokens,
            "label",
            probe=partial(AttentiveProbe, 10, num_heads=4),
            optimizer={"type": "AdamW", "lr": 1e-3},
        )
    if "sweep" in only:
        callbacks["sweep"] = ProbeSweep(model, "sweep", "embedding", "label", num_classes=10)
    if "knn" in only:
        callbacks["knn"] = OnlineKNN(model, "knn", "embedding", "label", k=20, temperature=0.07)
    if "refit" in only:
        callbacks["refit"] = RefitProbe(model, "refit", "embedding", "label", num_classes=10)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks.values()),
    )
    train = DataLoader(Digits(x_tr, y_tr), batch_size=64, shuffle=True)
    test = DataLoader(Digits(x_te, y_te), batch_size=256)
    start = time.perf_counter()
    trainer.fit(model, train, test)
    seconds = time.perf_counter() - start
    results = {}
    for key, cb in callbacks.items():
        online = float(trainer.callback_metrics[f"eval/{cb.name}_top1"])
        reference = knn_reference(f_tr, y_tr, f_te, y_te, 20, 0.07) if key == "knn" else offline
        results[key] = (online, reference)
    return results, seconds


class MomentReport(pl.Callback):
    """At each validation end: the logged number, the same weights with exact statistics, offline on this encoder."""

    def __init__(self, train_set, val_set):
        self.train_set, self.val_set, self.rows = train_set, val_set, []

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        logged = float(trainer.callback_metrics["eval/linear_top1"])
        probe = pl_module.callbacks_modules["linear"]
        with torch.no_grad():
            f_va = pl_module.backbone(self.val_set.images.to(pl_module.device))
            f_tr = pl_module.backbone(self.train_set.images.to(pl_module.device))
            mean, var = f_va.double().mean(0), f_va.double().var(0, unbiased=False)
            normalised = ((f_va.double() - mean) / torch.sqrt(var + probe.norm.eps)).float()
            exact = float((probe.linear(normalised).argmax(1).cpu() == self.val_set.labels).float().mean())
        offline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        offline = offline.fit(f_tr.cpu().numpy(), self.train_set.labels.numpy())
        offline = offline.score(f_va.cpu().numpy(), self.val_set.labels.numpy())
        self.rows.append((trainer.current_epoch + 1, logged, exact, offline))


def moving_encoder(epochs, seed, precision="32-true"):
    from sslprobe.cli.demo import build, load_split

    pl.seed_everything(seed, verbose=False)
    train_set, val_set = load_split(seed)
    train = DataLoader(train_set, batch_size=256, shuffle=True)
    val = DataLoader(val_set, batch_size=256)
    model, probes = build(argparse.Namespace(), len(train))
    sweep = ProbeSweep(model, "sweep", "embedding", "label", num_classes=10)
    report = MomentReport(train_set, val_set)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*probes, sweep, report],
    )
    trainer.fit(model, train, val)
    print(
        f"# moving encoder: sslprobe demo's SimCLR on digits, seed {seed}, batch 256 (6 training batches an epoch), "
        f"precision {precision}"
    )
    print(f"{'epoch':>5} {'logged':>8} {'exact stats':>12} {'gap':>7} {'offline LR':>11}")
    for epoch, logged, exact, offline in report.rows:
        print(f"{epoch:>5} {logged:>8.4f} {exact:>12.4f} {100 * (exact - logged):>+6.2f} {offline:>11.4f}")
    worst = max(exact - logged for _, logged, exact, _ in report.rows)
    print(f"largest gap under the same weights with exact statistics: {100 * worst:+.2f} points")
    offline = report.rows[-1][3]
    print(f"# last epoch, against the offline regression on the final encoder ({offline:.4f})")
    for name in ("linear", "sweep", "refit"):
        last = float(trainer.callback_metrics[f"eval/{name}_top1"])
        print(f"{name:8s} {last:.4f}  gap {100 * (offline - last):+.2f} points")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", default="linear,plain-linear,sweep,knn,mlp,attentive,refit")
    ap.add_argument("--moving", action="store_true", help="the moving-encoder part (the demo's SimCLR run)")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"], help="the Trainer's precision")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.moving:
        for seed in args.seeds:
            moving_encoder(args.epochs, seed, args.precision)
        return
    only = args.only.split(",")
    table = {}
    for seed in args.seeds:
        results, seconds = run(seed, args.epochs, only, args.precision)
        for key, (online, reference) in results.items():
            table.setdefault(key, []).append((online, reference))
            print(
                f"seed {seed} {key:13s} online {online:.4f}  offline {reference:.4f}  gap {reference - online:+.4f}"
                f"  ({seconds:.1f} s for all probes)"
            )
    print(
        f"\n# digits, frozen random ReLU 64->256, {args.epochs} epochs, batch 64, seeds {args.seeds}, "
        f"precision {args.precision}"
    )
    for key, rows in table.items():
        online = statistics.mean(r[0] for r in rows)
        reference = statistics.mean(r[1] for r in rows)
        print(f"{key:13s} online {online:.4f}  offline {reference:.4f}  gap {100 * (reference - online):+.2f} points")


if __name__ == "__main__":
    main()
