"""Where does a probe's step time go? Profiles one configuration of overhead.py.

Usage: python benchmarks/profile_step.py CONFIG [--device cuda] [--backbone resnet18] [--steps 30]
Prints the Python functions that cost the most (cProfile, cumulative, sslprobe and torch.optim only), then the
operators by self CPU time and call count per step (torch.profiler): launches per step are what a launch-bound
step pays for.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import overhead


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    batch = args.batch or {"tiny": 16, "mlp": 256, "resnet18": 256, "resnet50": 128}[args.backbone]
    precision = "32-true" if args.backbone in ("mlp", "tiny") else "bf16-mixed"
    torch.manual_seed(0)
    backbone, shape, emb = overhead.make_backbone(args.backbone)
    device = torch.device(args.device)
    pool = [
        {"image": torch.randn(batch, *shape, device=device), "label": torch.randint(0, 100, (batch,), device=device)}
        for _ in range(4)
    ]
    run = argparse.Namespace(warm=5, steps=args.steps, devices=1)
    overhead.run_config(args.config, backbone, emb, pool, run, args.device, precision)  # warm up
    ms, _, _ = overhead.run_config(args.config, backbone, emb, pool, run, args.device, precision)
    print(f"{args.config}: {ms:.2f} ms/step unprofiled")
    profiler = cProfile.Profile()
    profiler.enable()
    overhead.run_config(args.config, backbone, emb, pool, run, args.device, precision)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    stats.print_stats(r"sslprobe|optim/(adam|optimizer)|module.py:.*log|call.py", 25)
    print(out.getvalue()[-6000:])
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        overhead.run_config(args.config, backbone, emb, pool, run, args.device, precision)
    total_steps = run.warm + run.steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(f"(operator counts below are over {total_steps} steps)")
    print(table)


if __name__ == "__main__":
    main()
