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
On a ViT (--backbone vit_b_16), whose step gives the tokens (B, 197, 768) after the encoder's final norm and the CLS
token (B, 768) as the embedding, attentive probes on the tokens (issue 21: probes follow the Trainer's precision):
  attn-floor        plain LightningModule whose training_step trains an attentive probe by hand on the detached
                    tokens, under the step's autocast (bf16), with AdamW (the hand-written floor); the probe is
                    AttentiveProbe's defaults written out (8 heads, one query, no-affine norms), same sizes and ops
  attn-floor32      the same, with the probe's forward and loss in fp32 (tokens `.float()`, autocast disabled)
  attn-1            sslprobe.Module + OnlineProbe(AttentiveProbe(1000)) on the tokens, AdamW lr 1e-3
  attn32-1          the same with OnlineProbe(..., precision="32") (the probe kept in fp32); skipped, with a note,
                    while OnlineProbe has no `precision` argument
  cls-1             sslprobe.Module + OnlineProbe(LinearProbe(1000)) on the CLS token, as the README writes it (the
                    default optimizer, LARS): probe-1 under the ViT's name
Probes: linear, embedding -> 100 classes (1000 on a ViT), cross-entropy, top-1 metric. Batches are prebuilt on the
device.

  --device cpu   MLP 512-1024-1024-512, batch 256, fp32
  --device cuda  --backbone resnet18 (32px, batch 256), resnet50 (224px, batch 128) or vit_b_16 (224px, batch 64),
                 bf16-mixed (torchvision is used here only; it is never a dependency of sslprobe)
  --backbone vit_tiny_test   a few-layer stand-in with vit_b_16's structure and outputs (32px, 17 tokens of 64, batch
                 8, bf16-mixed, 1000 classes), without torchvision: checks the ViT configurations on a CPU
  --precision    overrides the backbone's precision above (e.g. 32-true)

Timing: `--steps` steps after `--warm` warm-up steps, synchronised at both ends; the epoch then ends one batch
later, so each probe's once-per-epoch work (metric compute, logging) is timed apart ("epoch end" column): in a real
run it is spread over thousands of steps. The loss is logged at Lightning's default cadence (every 50 steps), so the
default window of 50 steps holds one logging step.

Prints ms/step and the ratio against `none` for every configuration, and checks that every probe trained.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import statistics
import time
import warnings
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from sslprobe import Layer, Module
from sslprobe.callbacks import AlphaReQ, LiDAR, OnlineProbe, ProbeSweep, RankMe, RefitProbe
from sslprobe.optim import _pieces as pieces
from sslprobe.probes import AttentiveProbe, LinearProbe

NUM_CLASSES = 100
VIT_CLASSES = 1000  # the ViT's probes classify into ImageNet's 1000 classes (issue 21's measurement)
DEFAULT_PIECES = pieces.PIECES


class ViTTokens(nn.Module):
    """A torchvision VisionTransformer's forward up to its head: the tokens after the final norm, and the CLS token.

    `VisionTransformer.forward` is patchify (`conv_proj`, then (B, D, h, w) -> (B, h*w, D)), the class token
    prepended, `encoder` (position embedding, the blocks, then the final LayerNorm `encoder.ln`), then `heads` on
    token 0. This runs the same modules through `encoder` and stops there, so the head is not kept (no unused
    parameters under DDP). Returns {'tokens': (B, 1 + h*w, D), 'embedding': (B, D), the CLS token}.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.conv_proj, self.class_token, self.encoder = vit.conv_proj, vit.class_token, vit.encoder

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        patches = self.conv_proj(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
        cls = self.class_token.expand(len(patches), -1, -1)  # (B, 1, D)
        tokens = self.encoder(torch.cat([cls, patches], dim=1))  # (B, 1 + h*w, D), after encoder.ln
        return {"tokens": tokens, "embedding": tokens[:, 0]}


class TinyEncoder(nn.Module):
    """torchvision's vision_transformer.Encoder in miniature: position embedding, pre-norm blocks, final LayerNorm."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        block = partial(nn.TransformerEncoderLayer, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.Sequential(*(block(hidden_dim, num_heads, mlp_dim) for _ in range(num_layers)))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class TinyViT(nn.Module):
    """A stand-in with the attributes of torchvision's VisionTransformer that ViTTokens reads (no torchvision)."""

    def __init__(self, image_size: int = 32, patch_size: int = 8, hidden_dim: int = 64, num_layers: int = 2) -> None:
        super().__init__()
        self.image_size, self.hidden_dim = image_size, hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = TinyEncoder(seq_length, num_layers, 4, hidden_dim, 2 * hidden_dim)


class HandAttentive(nn.Module):
    """The attentive probe written by hand: AttentiveProbe's defaults (8 heads, one learned query, no-affine layer
    norms on the tokens and on the pooled vector), with its parameter sizes, initialisation and the same ops in the
    same order (separate query, key and value projections from one (3D, D) weight, SDPA, output projection, head),
    so that attn-floor and attn-1 differ in how the probe is trained, not in what it computes.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 8) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.empty(1, dim))
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.query, std=0.02)
            nn.init.xavier_uniform_(self.in_proj.weight)
            nn.init.xavier_uniform_(self.out_proj.weight)
            for tensor in (self.in_proj.bias, self.out_proj.bias, self.head.weight, self.head.bias):
                tensor.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        h = self.num_heads
        tokens = F.layer_norm(tokens, (d,))
        w_q, w_k, w_v = self.in_proj.weight.chunk(3)
        b_q, b_k, b_v = self.in_proj.bias.chunk(3)
        q = F.linear(self.query, w_q, b_q).view(1, 1, h, d // h).transpose(1, 2)  # (1, H, 1, d)
        k = F.linear(tokens, w_k, b_k).view(b, n, h, d // h).transpose(1, 2)  # (B, H, N, d)
        v = F.linear(tokens, w_v, b_v).view(b, n, h, d // h).transpose(1, 2)  # (B, H, N, d)
        attended = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), k, v)  # (B, H, 1, d)
        pooled = self.out_proj(attended.transpose(1, 2).reshape(b, 1, d)).mean(dim=1)  # (B, D)
        return self.head(F.layer_norm(pooled, (d,)))


def make_backbone(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    if name == "tiny":  # for profiling Python overhead: compute is negligible
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU()), (32,), 32
    if name == "mlp":
        net = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512))
        return net, (512,), 512
    if name == "vit_tiny_test":
        vit = TinyViT()
        return ViTTokens(vit), (3, vit.image_size, vit.image_size), vit.hidden_dim
    import torchvision

    if name.startswith("vit"):
        vit = getattr(torchvision.models, name)(num_classes=VIT_CLASSES)
        return ViTTokens(vit), (3, vit.image_size, vit.image_size), vit.hidden_dim

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


def backbone_outputs(backbone: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'embedding': (B, D)}; a ViT adds {'tokens': (B, N, D)} and its embedding is the CLS token."""
    out = backbone(images)
    return out if isinstance(out, dict) else {"embedding": out}


def average_gradients(probe: nn.Module) -> None:
    """Average a hand probe's gradients over the processes (one all-reduce), as DDP would for a registered module."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return
    grads = [p.grad for p in probe.parameters()]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat.div_(torch.distributed.get_world_size())
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def hand_step(probe: nn.Module, opt: torch.optim.Optimizer, features: torch.Tensor, target: torch.Tensor):
    """One hand-written probe step: forward, loss, backward, gradient average, step. Returns (logits, loss)."""
    logits = probe(features)
    loss = F.cross_entropy(logits, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(probe)
    opt.step()
    return logits, loss


class Plain(pl.LightningModule):
    """The hand-written reference: the main step, plus `num_probes` probes trained by hand inside the step.

    The hand probes are kept out of the module (plain lists), so DDP neither syncs nor waits for them; under DDP
    their gradients are averaged by hand, one all-reduce per probe per step, as a correct probe must. The linear
    probes train in fp32 on the embedding. `attentive` adds one attentive probe on the tokens (a ViT's): "autocast"
    runs its forward and loss under the step's autocast (the Trainer's, bf16 under bf16-mixed), "32" in fp32.
    """

    def __init__(
        self,
        backbone: nn.Module,
        emb: int,
        num_probes: int = 0,
        num_classes: int = NUM_CLASSES,
        attentive: str | None = None,
    ) -> None:
        super().__init__()
        if attentive not in (None, "autocast", "32"):
            raise ValueError(f"Plain: attentive must be None, 'autocast' or '32', got {attentive!r}.")
        self.backbone = backbone
        self.hand = [nn.Linear(emb, num_classes) for _ in range(num_probes)]
        self.hand_opts = [torch.optim.AdamW(p.parameters(), lr=1e-3, foreach=True) for p in self.hand]
        self.correct: torch.Tensor | None = None
        self.attentive = attentive
        self.hand_attentive = [HandAttentive(emb, num_classes)] if attentive else []
        self.hand_attentive_opts = [
            torch.optim.AdamW(p.parameters(), lr=1e-3, foreach=True) for p in self.hand_attentive
        ]
        self.hand_steps = 0  # steps in which the hand probes trained
        self.attentive_loss: torch.Tensor | None = None

    def on_fit_start(self):
        for probe in [*self.hand, *self.hand_attentive]:
            probe.to(self.device)

    def training_step(self, batch, batch_idx):
        out = backbone_outputs(self.backbone, batch["image"])
        emb = out["embedding"]
        if self.hand:
            features, target = emb.detach().float(), batch["label"]
            if self.correct is None:
                self.correct = torch.zeros((), dtype=torch.long, device=features.device)
            scope = torch.profiler.record_function("floor.step")  # for benchmarks/profile_kernels.py
            with scope, torch.autocast(features.device.type, enabled=False):
                for probe, opt in zip(self.hand, self.hand_opts):
                    logits, _ = hand_step(probe, opt, features, target)
                    self.correct.add_((logits.argmax(-1) == target).sum())
        if self.hand_attentive:
            self.attentive_step(out["tokens"].detach(), batch["label"])
        self.hand_steps += bool(self.hand or self.hand_attentive)
        return {"loss": ssl_loss(emb), **out}

    def attentive_step(self, tokens: torch.Tensor, target: torch.Tensor) -> None:
        """The hand attentive probe's step on detached tokens (B, N, D), in the precision `attentive` says."""
        if self.attentive == "32":
            tokens, precision = tokens.float(), torch.autocast(tokens.device.type, enabled=False)
        else:
            # Inside training_step Lightning's autocast is already on: entering nothing keeps its dtype (a new
            # torch.autocast(enabled=True) would take the device's default, float16 on CUDA).
            precision = contextlib.nullcontext()
        scope = torch.profiler.record_function("floor.step")  # for benchmarks/profile_kernels.py
        with scope, precision:
            (probe,), (opt,) = self.hand_attentive, self.hand_attentive_opts
            logits, loss = hand_step(probe, opt, tokens, target)
            if self.correct is None:
                self.correct = torch.zeros((), dtype=torch.long, device=tokens.device)
            self.correct.add_((logits.argmax(-1) == target).sum())
        self.attentive_loss = loss.detach()

    def configure_optimizers(self):
        return torch.optim.SGD(self.backbone.parameters(), lr=1e-3, momentum=0.9, foreach=True)


def module_forward(self, batch, stage):
    out = backbone_outputs(self.backbone, batch["image"])
    return {**out, "loss": ssl_loss(out["embedding"])}


def probe_precision_supported() -> bool:
    """Whether OnlineProbe takes `precision=` yet (issue 21); attn32-1 needs it."""
    return "precision" in inspect.signature(OnlineProbe).parameters


def two_views(outputs, batch):
    """Two views of each sample for LiDAR in health-3 (the benchmark's step makes one; the second is a cheap copy)."""
    emb = outputs["embedding"]
    return [emb, 0.5 * emb]


def build(config: str, backbone: nn.Module, emb: int, num_classes: int = NUM_CLASSES):
    kind, _, count = config.partition("-")
    if kind == "attn" and count in ("floor", "floor32"):
        return Plain(backbone, emb, 0, num_classes, attentive="32" if count == "floor32" else "autocast"), []
    n = int(count or 0)
    if kind in ("none", "floor"):
        return Plain(backbone, emb, n, num_classes), []
    if kind == "plain":
        model: pl.LightningModule = Plain(backbone, emb, 0, num_classes)
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
                num_classes=num_classes,
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
    refits = [RefitProbe(model, "refit", "embedding", "label", num_classes=num_classes)] if kind == "refit" else []
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
                probe=nn.LazyLinear(num_classes),
                optimizer={"type": "AdamW", "lr": 1e-3},
            )
            for i, path in enumerate(stages)
        ]
    if kind in ("attn", "attn32"):
        if kind == "attn32" and not probe_precision_supported():
            raise TypeError(f"{config}: OnlineProbe has no precision argument yet (issue 21); leave {config} out.")
        precision = {"precision": "32"} if kind == "attn32" else {}
        return model, [
            OnlineProbe(
                model,
                f"p{i}",
                "tokens",
                "label",
                probe=AttentiveProbe(num_classes, in_features=emb),
                optimizer={"type": "AdamW", "lr": 1e-3},
                **precision,
            )
            for i in range(n)
        ]
    if kind == "cls":  # a ViT's embedding is its CLS token: the README's LinearProbe on it is probe-N
        kind = "probe"
    # "lars-N" and "probe-N": the probes' default optimizer (LARS); otherwise AdamW, as the hand-written floor uses.
    optimizer = None if kind in ("lars", "probe") else {"type": "AdamW", "lr": 1e-3}
    graph = None if kind != "eager" else False

    def head() -> nn.Module:
        return LinearProbe(num_classes, in_features=emb) if kind == "probe" else nn.Linear(emb, num_classes)

    probes = [
        OnlineProbe(model, f"p{i}", "embedding", "label", probe=head(), optimizer=optimizer, cuda_graph=graph)
        for i in range(n)
    ]
    return model, [*probes, *refits]


def run_config(config, backbone, emb, pool, args, device, precision, num_classes=NUM_CLASSES):
    pieces.PIECES = 1 if config.startswith("whole") else DEFAULT_PIECES
    model, probes = build(config.replace("whole", "module"), backbone, emb, num_classes)
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
    if config.startswith(("floor", "attn-floor")):
        trained &= model.hand_steps == batches
    # With 100 classes some prediction is right within a few steps; with a ViT's 1000 a short run may get none right,
    # so there the attentive floor is checked by its loss and by its zero-started head having moved.
    if config.startswith("floor") and num_classes == NUM_CLASSES:
        trained &= model.correct is not None and int(model.correct) > 0
    if config.startswith("attn-floor"):
        trained &= bool(torch.isfinite(model.attentive_loss))
        trained &= bool(model.hand_attentive[0].head.weight.abs().sum() > 0)
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
    ap.add_argument(
        "--backbone", default=None, help="mlp (cpu default), resnet18, resnet50 (cuda default), vit_b_16, vit_tiny_test"
    )
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument(
        "--configs", default="none,floor-1,floor-8,module-0,module-1,module-8,plain-1,plain-8,sweep-8,sweep-16"
    )
    ap.add_argument("--devices", type=int, default=1, help="processes under DDP (one per GPU) when > 1")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--precision", default=None, help="the Trainer's precision (default: the backbone's, see above)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    backbone_name = args.backbone or ("mlp" if args.device == "cpu" else "resnet50")
    batches = {"tiny": 16, "mlp": 256, "resnet18": 256, "resnet50": 128, "vit_b_16": 64, "vit_tiny_test": 8}
    batch = args.batch or batches[backbone_name]
    precision = args.precision or ("32-true" if backbone_name in ("mlp", "tiny") else "bf16-mixed")
    num_classes = VIT_CLASSES if backbone_name.startswith("vit") else NUM_CLASSES
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone, shape, emb = make_backbone(backbone_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    pool = [
        {
            "image": torch.randn(batch, *shape, device=device),
            "label": torch.randint(0, num_classes, (batch,), device=device),
        }
        for _ in range(4)
    ]
    configs = args.configs.split(",")
    if "attn32-1" in configs and not probe_precision_supported():
        print("# attn32-1 skipped: OnlineProbe has no precision argument yet (issue 21)")
        configs.remove("attn32-1")
    times: dict[str, list[float]] = {c: [] for c in configs}
    epoch_ends: dict[str, list[float]] = {c: [] for c in configs}
    trained: dict[str, bool] = {}
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the banners, in this script only
    for _ in range(args.rounds):
        for config in configs:
            ms, epoch_end, ok = run_config(config, backbone, emb, pool, args, args.device, precision, num_classes)
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
    width = max(10, *map(len, times))  # 10 as before; attn-floor32 needs 12
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
            f"{config:{width}s} {median:9.2f} ms/step  ratio {median / base:.4f}  epoch end {end:7.1f} ms  "
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
    # Issue 21: the attentive probe at or under the hand-written floor under autocast (about 1.02x on ViT-B/16).
    for key, floor_key in (("attn-1", "attn-floor"), ("attn32-1", "attn-floor32")):
        if key in rows and floor_key in rows:
            excess = rows[key]["ratio"] - rows[floor_key]["ratio"]
            print(
                f"{key:10s} minus {floor_key}: {excess:+.4f} (target <= +0.00; {floor_key} "
                f"{rows[floor_key]['ratio']:.4f}{', about 1.02' if floor_key == 'attn-floor' else ''})"
            )
    if "cls-1" in rows:
        print(f"cls-1 vs none: {rows['cls-1']['ratio']:.4f} (target <= 1.005)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "backbone": backbone_name, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
