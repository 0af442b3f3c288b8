"""How much GPU memory do probes hold? Peak allocated memory above the same run without probes.

Each configuration runs in its own process (a fresh CUDA allocator), through the same Trainer as
`benchmarks/overhead.py` (its backbones, batches and configurations), for `--warm` + `--steps` training steps:

  none, floor-N, module-N (graphed steps, the default), eager-N (cuda_graph=False), probe-N, sweep-N   as overhead.py
  knn               sslprobe.Module + OnlineKNN with the default queue (65,536 rows); --knn-dtype picks its bank

Usage: python benchmarks/memory.py [--backbone resnet50] [--configs none,floor-8,eager-8,module-8,sweep-16,knn]
                                  [--breakdown]
Prints the peak and the peak above `none` per configuration, in MiB. `--breakdown` also prints, at the last training
batch, the memory in use by allocator pool (the general pool, or a CUDA graph's private pool) and stream.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def breakdown_lines() -> list[str]:
    """Memory in use now, by (pool, stream), from the allocator's snapshot; the largest blocks outside the main pool."""
    import torch

    groups: dict[tuple, list[int]] = {}
    blocks = []
    sizes: dict[float, int] = {}  # the general pool's blocks of 0.5 MiB or more, by size
    for segment in torch.cuda.memory_snapshot():
        pool = "graph pool" if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0) else "general pool"
        key = (pool, segment["stream"])
        used = sum(b["size"] for b in segment["blocks"] if b["state"] == "active_allocated")
        groups.setdefault(key, [0, 0])
        groups[key][0] += used
        groups[key][1] += segment["total_size"]
        for b in segment["blocks"]:
            if key == ("general pool", 0) and b["state"] == "active_allocated" and b["size"] >= 2**19:
                size = round(b["size"] / 2**20, 2)
                sizes[size] = sizes.get(size, 0) + 1
        if key != ("general pool", 0):
            blocks += [
                (b["size"], pool, segment["stream"]) for b in segment["blocks"] if b["state"] == "active_allocated"
            ]
    lines = [f"  in use {torch.cuda.memory_allocated() / 2**20:.1f} MiB"]
    for (pool, stream), (used, total) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(
            f"  {pool:12s} stream {stream:#x}: {used / 2**20:8.1f} MiB in use of {total / 2**20:8.1f} reserved"
        )
    for size, pool, stream in sorted(blocks, reverse=True)[:8]:
        lines.append(f"    block {size / 2**20:7.2f} MiB ({pool}, stream {stream:#x})")
    top = sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:12]
    lines.append("  general pool, stream 0, blocks >= 0.5 MiB: " + ", ".join(f"{n} x {mib} MiB" for mib, n in top))
    return lines


def measure(config: str, backbone_name: str, warm: int, steps: int, breakdown: bool = False) -> dict:
    """Peak allocated MiB of one configuration's fit (run in this process), and its breakdown if asked."""
    import logging

    import lightning.pytorch as pl
    import torch

    sys.path.insert(0, str(HERE))
    import overhead

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    backbone, shape, emb = overhead.make_backbone(backbone_name)
    batch = {"resnet18": 256, "resnet50": 128}[backbone_name]
    pool = [
        {
            "image": torch.randn(batch, *shape, device=device),
            "label": torch.randint(0, overhead.NUM_CLASSES, (batch,), device=device),
        }
        for _ in range(4)
    ]
    if config == "knn":
        from sslprobe.callbacks import OnlineKNN

        model, _ = overhead.build("module-0", backbone, emb)
        probes = [OnlineKNN(model, "knn", "embedding", "label")]
    else:
        model, probes = overhead.build(config, backbone, emb)
    lines: list[str] = []

    class Breakdown(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if breakdown and batch_idx == warm + steps - 1:
                torch.cuda.synchronize()
                lines.extend(breakdown_lines())

    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*probes, Breakdown()],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, overhead.Batches(pool, warm + steps))
    return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "breakdown": lines}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet50"])
    ap.add_argument("--configs", default="none,floor-8,eager-8,module-8,sweep-16,knn")
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--steps", type=int, default=22)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one configuration
    ap.add_argument("--json", default=None)
    ap.add_argument("--breakdown", action="store_true")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.backbone, args.warm, args.steps, args.breakdown)))
        return
    peaks, breakdowns = {}, {}
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", config, "--backbone", args.backbone]
        cmd += ["--warm", str(args.warm), "--steps", str(args.steps)] + (["--breakdown"] if args.breakdown else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        peaks[config], breakdowns[config] = result["peak_mib"], result["breakdown"]
    import torch

    print(
        f"# {torch.cuda.get_device_name()} backbone={args.backbone} bf16-mixed steps={args.warm + args.steps}, "
        "one process per configuration"
    )
    base = peaks.get("none", float("nan"))
    for config, peak in peaks.items():
        print(f"{config:10s} peak {peak:9.1f} MiB   above none {peak - base:+8.1f} MiB")
        for line in breakdowns[config]:
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(peaks, indent=1))


if __name__ == "__main__":
    main()
