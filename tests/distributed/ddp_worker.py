"""Runs probes under Lightning DDP (2 CPU processes, gloo, or GPUs with --accelerator gpu) and records facts.

Launched by tests/distributed/test_ddp.py as a script (Lightning's "ddp" strategy re-runs this file for the
other ranks). Usage: python ddp_worker.py SCENARIO OUT_FILE [--accelerator cpu|gpu] [--ckpt PATH]
Rank 0 saves a dict of results with torch.save.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")

from sslprobe.callbacks import OnlineKNN, OnlineProbe, ProbeSweep, RefitProbe  # noqa: E402
from tests.callbacks.test_refit_probe import ResumableBatches, batches_of  # noqa: E402
from tests.conftest import make_xy  # noqa: E402
from tests.distributed.common import (  # noqa: E402
    NUM_CLASSES,
    ShardedData,
    build_module,
    health_callbacks,
    linear_probe,
)

COUNTS = {"collectives": 0}


def _counting(fn):
    def wrapper(*args, **kwargs):
        COUNTS["collectives"] += 1
        return fn(*args, **kwargs)

    return wrapper


for _name in ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor"):
    setattr(dist, _name, _counting(getattr(dist, _name)))


class Before(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.start = COUNTS["collectives"]


class After(Callback):
    """Placed after the probes: counts their collectives, then checks every rank holds the same probe weights."""

    def __init__(self, before: Before) -> None:
        self.before, self.per_step, self.max_diff = before, [], 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step.append(COUNTS["collectives"] - self.before.start)
        flat = torch.cat([p.detach().flatten().float() for p in pl_module.callbacks_modules.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        self.max_diff = max(self.max_diff, max(float((g - gathered[0]).abs().max()) for g in gathered))


def trainer(accelerator, callbacks, **kw):
    args = {
        "accelerator": accelerator,
        "devices": 2,
        "strategy": "ddp",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,  # ShardedData shards in order, so one process can replay it
        "callbacks": callbacks,
    }
    args.update(kw)
    return pl.Trainer(**args)


def weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.callbacks_modules.state_dict().items()}


def scenario_train(args):
    """Probes of every kind under DDP: sync after each step, collective counts, metrics, kNN bank."""
    model = build_module(trainable=True)
    probe = linear_probe(model, accumulate_grad_batches=2, gradient_clip_val=0.05)
    bn_probe = OnlineProbe(model, "bn", "embedding", "label", probe=nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 3)))
    sweep = ProbeSweep(
        model, "sweep", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1], weight_decays=[0.0]
    )
    knn = OnlineKNN(model, "knn", "embedding", "label", k=5, temperature=0.1)
    before = Before()
    after = After(before)
    t = trainer(
        args.accelerator,
        [before, probe, bn_probe, sweep, knn, after],
        max_epochs=2,
        log_every_n_steps=3,
        logger=pl.loggers.CSVLogger(args.out.parent / "logs", name="ddp"),
    )
    t.fit(model, datamodule=ShardedData())
    return {
        "weights": weights(model),
        "max_diff": after.max_diff,
        "per_step": after.per_step,
        "steps": probe.stepper.steps,
        "metrics": {k: float(v) for k, v in t.callback_metrics.items()},
        "knn_bank_rows": int(knn._features.shape[0]) if knn._features is not None else 0,
        "knn_bank_size": knn.bank_size,
        "world_size": t.world_size,
    }


def scenario_checkpoint(args):
    """Write a checkpoint after one epoch on 2 processes (resumed on 1 by the test), or resume one."""
    model = build_module(trainable=True)
    probe = linear_probe(model, accumulate_grad_batches=4)
    if args.ckpt:
        t = trainer(args.accelerator, [probe], max_epochs=3)
        t.fit(model, datamodule=ShardedData(), ckpt_path=args.ckpt)
    else:
        ckpt = ModelCheckpoint(dirpath=args.out.parent, filename="ddp", save_last=False)
        t = trainer(args.accelerator, [probe, ckpt], max_epochs=1, enable_checkpointing=True)
        t.fit(model, datamodule=ShardedData())
    return {"weights": weights(model), "steps": probe.stepper.steps, "batches": probe.stepper.batches}


def scenario_frozen(args):
    """A frozen main model (optim=None) under DDP: the probes are the only trainable parameters."""
    model = build_module(trainable=False)
    probe = linear_probe(model, optimizer={"type": "SGD", "lr": 0.1})
    before = Before()
    after = After(before)
    t = trainer(args.accelerator, [before, probe, after], max_steps=6)
    t.fit(model, datamodule=ShardedData())
    return {
        "weights": weights(model),
        "max_diff": after.max_diff,
        "steps": probe.stepper.steps,
        "global_step": t.global_step,
    }


def scenario_fsdp(args):
    """FSDP with the probes left out of sharding: they must stay whole and identical on every rank."""
    from lightning.pytorch.strategies import FSDPStrategy

    model = build_module(trainable=True)
    probe = linear_probe(model)
    before = Before()
    after = After(before)
    strategy = FSDPStrategy(ignored_modules=[model.callbacks_modules])
    t = trainer(args.accelerator, [before, probe, after], max_epochs=2, strategy=strategy)
    t.fit(model, datamodule=ShardedData())
    return {
        "weights": weights(model),
        "max_diff": after.max_diff,
        "steps": probe.stepper.steps,
        "metrics": {k: float(v) for k, v in t.callback_metrics.items()},
    }


def scenario_poison(args):
    """Rank 1 alone sees non-finite features at step 3: both ranks must skip that global batch, identically."""

    class Poison(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3 and trainer.global_rank == 1:
                outputs["embedding"] = torch.full_like(outputs["embedding"], float("nan"))

    model = build_module(trainable=True)
    probe = linear_probe(model, accumulate_grad_batches=2)
    before = Before()
    after = After(before)
    t = trainer(args.accelerator, [Poison(), before, probe, after], max_epochs=1)
    t.fit(model, datamodule=ShardedData())
    return {"weights": weights(model), "max_diff": after.max_diff, "skipped": probe.skipped_batches}


class Mark(Callback):
    """Placed before a probe: the collective count when its training step and its validation start begin."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.start = COUNTS["collectives"]

    def on_validation_epoch_start(self, trainer, pl_module):
        self.start = COUNTS["collectives"]


class Tally(Callback):
    """Placed after the probe: the collectives it made per training step and per validation start."""

    def __init__(self, mark: Mark) -> None:
        self.mark, self.per_step, self.per_validation = mark, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step.append(COUNTS["collectives"] - self.mark.start)

    def on_validation_epoch_start(self, trainer, pl_module):
        self.per_validation.append(COUNTS["collectives"] - self.mark.start)


class ResumableShards(ShardedData):
    """ShardedData whose training batches resume mid-epoch from a checkpoint (the loader's state is saved)."""

    def train_dataloader(self):
        x, y = make_xy(self.n_train, 0)
        r, n = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return ResumableBatches(batches_of(x[r::n], y[r::n], self.batch_size))


class Fits(Callback):
    """Placed after the probe: its fit and logged numbers at every validation."""

    def __init__(self, refit: RefitProbe) -> None:
        self.refit, self.fits = refit, []

    def on_validation_end(self, trainer, pl_module):
        fit = self.refit.last_fit
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/refit")}
        self.fits.append({"weight": fit.weight.cpu(), "bias": fit.bias.cpu(), "rows": fit.rows, **logged})


def scenario_refit(args):
    """RefitProbe on 2 processes: no collective per step, one per validation, a checkpoint every 4 steps; or a run
    resumed from one of them (--ckpt)."""
    model = build_module(trainable=True)
    refit = RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES)
    mark = Mark()
    tally, fits = Tally(mark), Fits(refit)
    callbacks = [mark, refit, tally, fits]
    if not args.ckpt:
        callbacks.append(ModelCheckpoint(args.out.parent, "refit-{step}", every_n_train_steps=4, save_top_k=-1))
    t = trainer(args.accelerator, callbacks, max_epochs=2, enable_checkpointing=not args.ckpt)
    t.fit(model, datamodule=ResumableShards(), ckpt_path=args.ckpt)
    return {"per_step": tally.per_step, "per_validation": tally.per_validation, "fits": fits.fits}


def scenario_spawn(args):
    """strategy="ddp_spawn": the Trainer, the module and the callbacks are pickled into 2 new processes.

    A lazy LinearProbe, a ProbeSweep and an OnlineKNN; the main process gets back rank 0's weights and metrics.
    """
    from sslprobe import LinearProbe

    model = build_module(trainable=True)
    probe = OnlineProbe(model, "linear", "embedding", "label", probe=LinearProbe(NUM_CLASSES))
    sweep = ProbeSweep(
        model, "sweep", "embedding", "label", num_classes=NUM_CLASSES, lrs=[0.01, 0.1], weight_decays=[0.0]
    )
    knn = OnlineKNN(model, "knn", "embedding", "label", k=5, temperature=0.1)
    # With the sanity check, which evaluates (and so builds) the lazy probes before any training batch.
    t = trainer(args.accelerator, [probe, sweep, knn], max_epochs=2, strategy="ddp_spawn", num_sanity_val_steps=2)
    t.fit(model, datamodule=ShardedData())
    return {
        "weights": weights(model),
        "metrics": {k: float(v) for k, v in t.callback_metrics.items()},
        "world_size": t.world_size,
        "main_process_initialized": dist.is_initialized(),
    }


def scenario_freeze(args):
    """``model.freeze()`` before fit under DDP: the main model has nothing to train, the probes still train."""
    model = build_module(trainable=False)
    probe = linear_probe(model, optimizer={"type": "SGD", "lr": 0.1})
    model.freeze()
    before = Before()
    after = After(before)
    t = trainer(args.accelerator, [before, probe, after], max_steps=6)
    t.fit(model, datamodule=ShardedData())
    return {
        "weights": weights(model),
        "max_diff": after.max_diff,
        "steps": probe.stepper.steps,
        "backbone_frozen": not any(p.requires_grad for p in model.backbone.parameters()),
    }


def scenario_layer(args):
    """A probe on Layer("backbone.1") beside the same probe on the returned embedding (the same activations)."""
    from sslprobe import Layer

    model = build_module(trainable=True)
    by_key = linear_probe(model)
    by_layer = OnlineProbe(
        model, "layer", Layer("backbone.1"), "label", probe=nn.Linear(16, NUM_CLASSES), optimizer=by_key.optimizer
    )
    model.callbacks_modules["layer"].load_state_dict(model.callbacks_modules["linear"].state_dict())
    t = trainer(args.accelerator, [by_key, by_layer], max_epochs=2)
    t.fit(model, datamodule=ShardedData())
    return {"weights": weights(model), "metrics": {k: float(v) for k, v in t.callback_metrics.items()}}


class EveryRankLogged(Callback):
    """At the end of each validation, every rank's logged eval/ values, gathered while the training runs."""

    keys = ("eval/alpha", "eval/lidar", "eval/rankme", "eval/rankme_val", "eval/knn_top1")

    def __init__(self) -> None:
        self.per_rank: list[dict[str, float]] = []
        self.validations = 0

    def on_validation_end(self, trainer, pl_module):
        self.validations += 1
        values = torch.tensor([float(trainer.callback_metrics.get(k, float("nan"))) for k in self.keys])
        gathered = [torch.zeros_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, values)
        self.per_rank = [{k: v for k, v in zip(self.keys, g.tolist()) if v == v} for g in gathered]  # logged ones


def scenario_health(args):
    """RankMe, AlphaReQ and LiDAR on 2 processes: the values every rank logs, gathered to rank 0."""
    model = build_module(trainable=True)
    logged = EveryRankLogged()
    mark = Mark()
    tally = Tally(mark)
    t = trainer(args.accelerator, [mark, *health_callbacks(model), tally, logged], max_epochs=1)
    t.fit(model, datamodule=ShardedData())
    return {"per_rank": logged.per_rank, "world_size": t.world_size, "per_step": tally.per_step}


class RankZeroOnly(torch.utils.data.IterableDataset):
    """The whole validation set on rank 0 and nothing on the others (an unsized set smaller than the world)."""

    def __init__(self, n: int) -> None:
        self.x, self.y = make_xy(n, seed=1)

    def __iter__(self):
        if not dist.is_initialized() or dist.get_rank() == 0:
            for x, y in zip(self.x, self.y):
                yield {"x": x, "label": y}


class ValOnRankZero(ShardedData):
    """Training batches sharded as ShardedData's; the validation set on rank 0 only, in batches of 8."""

    def val_dataloader(self):
        return torch.utils.data.DataLoader(RankZeroOnly(self.n_val), batch_size=8)


def scenario_health_empty_rank(args):
    """The health callbacks and a kNN when rank 1 has no validation row: the run ends, every rank logs the same."""
    model = build_module(trainable=True)
    logged = EveryRankLogged()
    knn = OnlineKNN(model, "knn", "embedding", "label", k=5, temperature=0.1, num_classes=NUM_CLASSES)
    t = trainer(args.accelerator, [*health_callbacks(model), knn, logged], max_epochs=2)
    t.fit(model, datamodule=ValOnRankZero())
    return {"per_rank": logged.per_rank, "world_size": t.world_size, "validations": logged.validations}


class SecondLoaderOnRankZero(ShardedData):
    """Two validation loaders: the first sharded across ranks, the second on rank 0 only."""

    def val_dataloader(self):
        return [super().val_dataloader(), torch.utils.data.DataLoader(RankZeroOnly(self.n_val), batch_size=8)]


class LoaderValuesLogged(EveryRankLogged):
    keys = tuple(f"eval/{name}_top1/dataloader_idx_{i}" for name in ("p", "knn") for i in (0, 1))


def scenario_second_loader_empty_rank(args):
    """A probe and a kNN with two validation loaders, the second empty on rank 1: the run ends, ranks agree."""
    model = build_module(trainable=True)
    probe = OnlineProbe(model, "p", "embedding", "label", probe=nn.Linear(16, NUM_CLASSES), optimizer="AdamW")
    knn = OnlineKNN(model, "knn", "embedding", "label", k=5, temperature=0.1, num_classes=NUM_CLASSES)
    logged = LoaderValuesLogged()
    t = trainer(args.accelerator, [probe, knn, logged], max_epochs=2)
    t.fit(model, datamodule=SecondLoaderOnRankZero())
    return {"per_rank": logged.per_rank, "world_size": t.world_size, "validations": logged.validations}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario")
    ap.add_argument("out", type=Path)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--ckpt", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    scenarios = {"train": scenario_train, "checkpoint": scenario_checkpoint, "frozen": scenario_frozen}
    scenarios["fsdp"] = scenario_fsdp
    scenarios["poison"] = scenario_poison
    scenarios["refit"] = scenario_refit
    scenarios["spawn"] = scenario_spawn
    scenarios["freeze"] = scenario_freeze
    scenarios["layer"] = scenario_layer
    scenarios["health"] = scenario_health
    scenarios["health_empty_rank"] = scenario_health_empty_rank
    scenarios["second_loader_empty_rank"] = scenario_second_loader_empty_rank
    result = scenarios[args.scenario](args)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and (not dist.is_initialized() or dist.get_rank() == 0):
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
