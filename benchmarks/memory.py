"""How much GPU memory do probes hold? Peak allocated memory above the same run without probes.

Each configuration runs in its own process (a fresh CUDA allocator), through the same Trainer as
`benchmarks/overhead.py` (its backbones, batches and configurations), for `--warm` + `--steps` training steps:

  none, floor-N, module-N (graphed steps, the default), eager-N (cuda_graph=False), probe-N, sweep-N   as overhead.py
  knn               sslprobe.Module + OnlineKNN with the default queue (65,536 rows); --knn-dtype picks its bank

Usage: python benchmarks/memory.py [--backbone resnet50] [--configs none,floor-8,eager-8,module-8,sweep-16,knn]
Prints the peak and the peak above `none` per configuration, in MiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(config: str, backbone_name: str, warm: int, steps: int) -> float:
    """Peak allocated MiB of one configuration's fit (run in this process)."""
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
        callbacks=probes,
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, overhead.Batches(pool, warm + steps))
    return torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet50"])
    ap.add_argument("--configs", default="none,floor-8,eager-8,module-8,sweep-16,knn")
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--steps", type=int, default=22)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one configuration
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps({"peak_mib": measure(args.one, args.backbone, args.warm, args.steps)}))
        return
    peaks = {}
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", config, "--backbone", args.backbone]
        cmd += ["--warm", str(args.warm), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peaks[config] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    import torch

    print(
        f"# {torch.cuda.get_device_name()} backbone={args.backbone} bf16-mixed steps={args.warm + args.steps}, "
        "one process per configuration"
    )
    base = peaks.get("none", float("nan"))
    for config, peak in peaks.items():
        print(f"{config:10s} peak {peak:9.1f} MiB   above none {peak - base:+8.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(peaks, indent=1))


if __name__ == "__main__":
    main()
