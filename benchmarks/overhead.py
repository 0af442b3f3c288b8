"""What do probes cost per training step? sslprobe against hand-written probe code, side by side in one run.

Configurations, interleaved round by round (median over rounds), all through the same Lightning Trainer:
  none              plain LightningModule, the backbone step and nothing else (the baseline)
  floor-1 / -8      plain LightningModule whose training_step trains 1 / 8 linear probes by hand on detached
                    features, each with its own AdamW (the hand-written floor)
  module-0          sslprobe.Module doing the same main step, no probe
  module-1 / -8     sslprobe.Module + 1 / 8 OnlineProbe (AdamW, as the floor)
  plain-1 / -8      the plain LightningModule + 1 / 8 OnlineProbe
  sweep-8 / -16     sslprobe.Module + ProbeSweep with 8 / 16 heads
  lars-1 / -8       sslprobe.Module + OnlineProbes with their default optimizer (LARS)
  probe-1 / -8      sslprobe.Module + OnlineProbes as the README writes them: LinearProbe (normalisation, then
                    linear) with the default optimizer (LARS)
  whole-1 / -8      as module-N, with the multi-tensor kernels on whole tensors (no flat pieces): an A/B of the
                    host time that cutting costs against the GPU time it saves
  eager-1 / -8      as module-N, with cuda_graph=False: every probe step launched op by op (on a GPU, module-N
                    replays each probe's step from a CUDA graph)
  layers-4          sslprobe.Module + 4 OnlineProbes on sslprobe.Layer: each ResNet stage's output, average-pooled
                    (compare with module-4: 4 probes on the one embedding)
  refit-1 / -9      sslprobe.Module + one RefitProbe (float64 statistics per step, no training), alone / beside 8
                    OnlineProbes as module-8 (the refit itself runs at validation, which is not timed here)
  health-3          sslprobe.Module + RankMe, AlphaReQ (one shared store of the embedding) and LiDAR (two views of
                    it): per step only appending rows; the numbers are computed at validation, not timed here
Probes: linear, embedding -> 100 classes, cross-entropy, top-1 metric. Batches are prebuilt on the device.

  --device cpu   MLP 512-1024-1024-512, batch 256, fp32
  --device cuda  --backbone resnet18 (32px, batch 256) or resnet50 (224px, batch 128), bf16-mixed
                 (torchvision is used here only; it is never a dependency of sslprobe)

Timing: `--steps` steps after `--warm` warm-up steps, synchronised at both ends; the epoch then ends one batch
later, so each probe's once-per-epoch work (metric compute, logging) is timed apart ("epoch end" column): in a real
run it is spread over thousands of steps. The loss is logged at Lightning's default cadence (every 50 steps), so the
default window of 50 steps holds one logging step.

Prints ms/step and the ratio against `none` for every configuration, and checks that every probe trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from sslprobe import Layer, Module
from sslprobe.callbacks import AlphaReQ, LiDAR, OnlineProbe, ProbeSweep, RankMe, RefitProbe
from sslprobe.optim import _pieces as pieces
from sslprobe.probes import LinearProbe

NUM_CLASSES = 100
DEFAULT_PIECES = pieces.PIECES


def make_backbone(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    if name == "tiny":  # for profiling Python overhead: compute is negligible
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU()), (32,), 32
    if name == "mlp":
        net = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512))
        return net, (512,), 512
    import torchvision

    net = getattr(torchvision.models, name)(num_classes=10)
    emb = net.fc.in_features
    net.fc = nn.Identity()
    return net, (3, 224 if name == "resnet50" else 32, 224 if name == "resnet50" else 32), emb


class Batches:
    """A sized iterable over a few batches prebuilt on the device (loading costs nothing)."""

    def __init__(self, pool: list[dict[str, torch.Tensor]], n: int) -> None:
        self.pool, self.n = pool, n

    def __iter__(self):
        return (self.pool[i % len(self.pool)] for i in range(self.n))

    def __len__(self) -> int:
        return self.n


class Timer(pl.Callback):
    """Times steps [warm, warm + steps) and, apart, the end of the epoch (from the last batch to `on_train_end`)."""

    def __init__(self, warm: int, steps: int) -> None:
        self.warm, self.steps = warm, steps
        self.ms = self.epoch_end_ms = float("nan")

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warm:
            self.start = self._now(pl_module.device)
        elif batch_idx == self.warm + self.steps:
            self.ms = 1000 * (self._now(pl_module.device) - self.start) / self.steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.warm + self.steps:  # the epoch's last batch
            self.last = self._now(pl_module.device)

    def on_train_end(self, trainer, pl_module):
        self.epoch_end_ms = 1000 * (self._now(pl_module.device) - self.last)


def ssl_loss(emb: torch.Tensor) -> torch.Tensor:
    return emb.float().pow(2).mean()


class Plain(pl.LightningModule):
    """The hand-written reference: the main step, plus `num_probes` probes trained by hand inside the step.

    The hand probes are kept out of the module (a plain list), so DDP neither syncs nor waits for them; under DDP
    their gradients are averaged by hand, one all-reduce per probe per step, as a correct probe must.
    """

    def __init__(self, backbone: nn.Module, emb: int, num_probes: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.hand = [nn.Linear(emb, NUM_CLASSES) for _ in range(num_probes)]
        self.hand_opts = [torch.optim.AdamW(p.parameters(), lr=1e-3, foreach=True) for p in self.hand]
        self.correct: torch.Tensor | None = None

    def on_fit_start(self):
        for probe in self.hand:
            probe.to(self.device)

    def training_step(self, batch, batch_idx):
        emb = self.backbone(batch["image"])
        if self.hand:
            features, target = emb.detach().float(), batch["label"]
            if self.correct is None:
                self.correct = torch.zeros((), dtype=torch.long, device=features.device)
            distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
            scope = torch.profiler.record_function("floor.step")  # for benchmarks/profile_kernels.py
            with scope, torch.autocast(features.device.type, enabled=False):
                for probe, opt in zip(self.hand, self.hand_opts):
                    logits = probe(features)
                    loss = F.cross_entropy(logits, target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if distributed:
                        grads = [p.grad for p in probe.parameters()]
                        flat = torch.cat([g.flatten() for g in grads])
                        torch.distributed.all_reduce(flat)
                        flat.div_(torch.distributed.get_world_size())
                        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                            g.copy_(part.view_as(g))
                    opt.step()
                    self.correct.add_((logits.argmax(-1) == target).sum())
        return {"loss": ssl_loss(emb), "embedding": emb}

    def configure_optimizers(self):
        return torch.optim.SGD(self.backbone.parameters(), lr=1e-3, momentum=0.9, foreach=True)


def module_forward(self, batch, stage):
    emb = self.backbone(batch["image"])
    return {"embedding": emb, "loss": ssl_loss(emb)}


def two_views(outputs, batch):
    """Two views of each sample for LiDAR in health-3 (the benchmark's step makes one; the second is a cheap copy)."""
    emb = outputs["embedding"]
    return [emb, 0.5 * emb]


def build(config: str, backbone: nn.Module, emb: int):
    kind, _, count = config.partition("-")
    n = int(count or 0)
    if kind in ("none", "floor"):
        return Plain(backbone, emb, n), []
    if kind == "plain":
        model: pl.LightningModule = Plain(backbone, emb, 0)
    else:
        model = Module(
            forward=module_forward,
            backbone=backbone,
            optim={"type": "SGD", "lr": 1e-3, "momentum": 0.9, "foreach": True},
        )
    if kind == "sweep":
        return model, [
            ProbeSweep(
                model,
                "sweep",
                "embedding",
                "label",
                num_classes=NUM_CLASSES,
                lrs=[1e-4 * 2**i for i in range(n // 2)],
                weight_decays=[0.0, 5e-4],
            )
        ]
    if kind == "health":
        return model, [
            RankMe(model, "rankme", "embedding"),
            AlphaReQ(model, "alpha", "embedding"),
            LiDAR(model, "lidar", two_views),
        ]
    refits = [RefitProbe(model, "refit", "embedding", "label", num_classes=NUM_CLASSES)] if kind == "refit" else []
    if kind == "refit":
        n -= 1  # the OnlineProbes beside it
    if kind == "layers":
        # One AdamW probe on each of the ResNet's stages (average-pooled by Layer), read by forward hooks.
        stages = [f"backbone.layer{i}" for i in range(1, 5)][-n:]
        return model, [
            OnlineProbe(
                model,
                f"p{i}",
                Layer(path),
                "label",
                probe=nn.LazyLinear(NUM_CLASSES),
                optimizer={"type": "AdamW", "lr": 1e-3},
            )
            for i, path in enumerate(stages)
        ]
    # "lars-N" and "probe-N": the probes' default optimizer (LARS); otherwise AdamW, as the hand-written floor uses.
    optimizer = None if kind in ("lars", "probe") else {"type": "AdamW", "lr": 1e-3}
    graph = None if kind != "eager" else False

    def head() -> nn.Module:
        return LinearProbe(NUM_CLASSES, in_features=emb) if kind == "probe" else nn.Linear(emb, NUM_CLASSES)

    probes = [
        OnlineProbe(model, f"p{i}", "embedding", "label", probe=head(), optimizer=optimizer, cuda_graph=graph)
        for i in range(n)
    ]
    return model, [*probes, *refits]


def run_config(config, backbone, emb, pool, args, device, precision):
    pieces.PIECES = 1 if config.startswith("whole") else DEFAULT_PIECES
    model, probes = build(config.replace("whole", "module"), backbone, emb)
    timer = Timer(args.warm, args.steps)
    parallel = {"devices": args.devices, "strategy": "ddp"} if args.devices > 1 else {"devices": 1}
    trainer = pl.Trainer(
        accelerator=device,
        precision=precision,
        max_epochs=1,
        logger=False,
        use_distributed_sampler=False,
        **parallel,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*probes, timer],
        log_every_n_steps=50,
    )
    batches = args.warm + args.steps + 1
    trainer.fit(model, Batches(pool, batches))
    trained = True
    rows = batches * len(pool[0]["label"])
    for probe in probes:
        if isinstance(probe, (RankMe, AlphaReQ, LiDAR)):  # they train nothing: every row offered must be stored
            trained &= probe._store is not None and probe._store.local().shape[0] == min(rows, probe.queue_size)
            continue
        if isinstance(probe, RefitProbe):  # it trains nothing: every row offered must be in its statistics
            trained &= probe.statistics is not None and int(probe.statistics.counts[0]) == rows
            continue
        trained &= probe.stepper is not None and probe.stepper.steps == batches
        trained &= bool(torch.isfinite(trainer.callback_metrics[f"train/{probe.name}_loss"]))
    if config.startswith("floor"):
        trained &= model.correct is not None and int(model.correct) > 0
    # The Trainer moves the module back to the CPU at the end; the next configuration moves it again.
    for p in probes:
        if p.name in model.callbacks_modules:
            model.callbacks_modules.pop(p.name)
    if config.startswith("layers"):
        for layer in backbone.modules():  # the backbone is shared by every configuration: drop this one's hooks
            layer._forward_hooks.clear()
    return timer.ms, timer.epoch_end_ms, trained


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backbone", default=None, help="mlp (cpu default), resnet18, resnet50 (cuda default)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument(
        "--configs", default="none,floor-1,floor-8,module-0,module-1,module-8,plain-1,plain-8,sweep-8,sweep-16"
    )
    ap.add_argument("--devices", type=int, default=1, help="processes under DDP (one per GPU) when > 1")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    backbone_name = args.backbone or ("mlp" if args.device == "cpu" else "resnet50")
    batch = args.batch or {"tiny": 16, "mlp": 256, "resnet18": 256, "resnet50": 128}[backbone_name]
    precision = "32-true" if backbone_name in ("mlp", "tiny") else "bf16-mixed"
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone, shape, emb = make_backbone(backbone_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    pool = [
        {
            "image": torch.randn(batch, *shape, device=device),
            "label": torch.randint(0, NUM_CLASSES, (batch,), device=device),
        }
        for _ in range(4)
    ]
    configs = args.configs.split(",")
    times: dict[str, list[float]] = {c: [] for c in configs}
    epoch_ends: dict[str, list[float]] = {c: [] for c in configs}
    trained: dict[str, bool] = {}
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the banners, in this script only
    for _ in range(args.rounds):
        for config in configs:
            ms, epoch_end, ok = run_config(config, backbone, emb, pool, args, args.device, precision)
            times[config].append(ms)
            epoch_ends[config].append(epoch_end)
            trained[config] = trained.get(config, True) and ok
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # rank 0 reports
    base = statistics.median(times["none"]) if "none" in times else float("nan")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"# {name} x{args.devices} backbone={backbone_name} batch={batch}/device precision={precision} "
        f"rounds={args.rounds} steps={args.steps} torch={torch.__version__} lightning={pl.__version__}"
    )
    rows = {}
    for config, values in times.items():
        median = statistics.median(values)
        end = statistics.median(epoch_ends[config])
        rows[config] = {
            "ms": median,
            "ratio": median / base,
            "runs": values,
            "epoch_end_ms": end,
            "trained": trained[config],
        }
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(
            f"{config:10s} {median:9.2f} ms/step  ratio {median / base:.4f}  epoch end {end:7.1f} ms  "
            f"trained={trained[config]}  ({runs})"
        )
    floor = {n: rows[f"floor-{n}"]["ratio"] for n in (1, 8) if f"floor-{n}" in rows}
    for n, target in ((1, 0.03), (8, 0.05)):
        for kind in ("module", "plain", "eager"):
            key = f"{kind}-{n}"
            if key in rows and n in floor:
                excess = rows[key]["ratio"] - floor[n]
                print(f"{key:10s} minus floor-{n}: {excess:+.4f} (target <= +{target:.2f})")
    if "module-0" in rows:
        print(f"module-0 vs none: {rows['module-0']['ratio']:.4f} (target <= 1.01)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "backbone": backbone_name, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
