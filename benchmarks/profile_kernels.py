"""Which GPU kernels does a probe's step launch, and how long do they run? (CUDA only.)

Usage: python benchmarks/profile_kernels.py --backbone resnet50 --configs module-1,lars-1,probe-1,sweep-16,floor-1
       (--backbone resnet18, resnet50 or vit_b_16; on the ViT also cls-1, attn-1 and attn-floor)
Profiles configurations of overhead.py with torch.profiler (CPU + CUDA activity). Every kernel launched (on any
host thread) while a probe callback's training hook runs (or, for ``floor-N``, the hand-written probe loop) is
attributed to the probes; the script prints, per training step, their kernel count, their GPU time, the host time
of the hooks (inflated by the profiler itself), and the kernels by GPU time. While the host keeps ahead of the GPU
(ResNet-50), a probe's cost in step time is its kernels' GPU time; where the host is the bottleneck (ResNet-18 at
32px), it is the host time.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import functools
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import overhead

from sslprobe.callbacks.base import TrainableCallback

SCOPES = ("sslprobe.step", "floor.step")


def _scoped(hook):
    @functools.wraps(hook)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function("sslprobe.step"):
            return hook(*args, **kwargs)

    return wrapper


def profile(config, backbone, emb, pool, run, precision, num_classes):
    """(ms/step, kernels per step, GPU us per step, host us per step, {kernel: [count, us] per step})."""
    overhead.run_config(config, backbone, emb, pool, run, "cuda", precision, num_classes)  # warm up
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        ms, _, _ = overhead.run_config(config, backbone, emb, pool, run, "cuda", precision, num_classes)
    steps = run.warm + run.steps
    events = prof.events()
    scopes = [e for e in events if e.name in SCOPES and e.device_type == torch.autograd.DeviceType.CPU]
    windows = sorted((e.time_range.start, e.time_range.end) for e in scopes)
    starts = [w[0] for w in windows]
    host = sum(e.cpu_time_total for e in scopes) / steps
    table: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    # A kernel belongs to the probes when the host launched it inside a probe hook, on any thread: the backward
    # of `torch.autograd.grad` runs on autograd's device thread while the hook waits for it.
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU or not event.kernels:
            continue
        i = bisect.bisect_right(starts, event.time_range.start) - 1
        if i < 0 or event.time_range.start > windows[i][1]:
            continue
        for kernel in event.kernels:
            table[kernel.name[:100]][0] += 1 / steps
            table[kernel.name[:100]][1] += kernel.duration / steps
    count = sum(v[0] for v in table.values())
    gpu = sum(v[1] for v in table.values())
    return ms, count, gpu, host, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--configs", default="floor-1,module-1,lars-1,probe-1,sweep-16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    TrainableCallback.on_train_batch_end = _scoped(TrainableCallback.on_train_batch_end)
    batch = {"resnet18": 256, "resnet50": 128, "vit_b_16": 64}[args.backbone]
    num_classes = overhead.VIT_CLASSES if args.backbone.startswith("vit") else overhead.NUM_CLASSES
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    backbone, shape, emb = overhead.make_backbone(args.backbone)
    pool = [
        {
            "image": torch.randn(batch, *shape, device="cuda"),
            "label": torch.randint(0, num_classes, (batch,), device="cuda"),
        }
        for _ in range(4)
    ]
    run = argparse.Namespace(warm=3, steps=args.steps, devices=1)
    print(f"# {torch.cuda.get_device_name()} backbone={args.backbone} batch={batch} torch={torch.__version__}")
    print("# per training step: probe kernels, their GPU time, host time in the probe hooks")
    for config in args.configs.split(","):
        ms, count, gpu, host, table = profile(config, backbone, emb, pool, run, "bf16-mixed", num_classes)
        print(f"\n## {config}: {ms:.2f} ms/step profiled; {count:.1f} kernels, GPU {gpu:.1f} us, host {host:.1f} us")
        for name, (n, us) in sorted(table.items(), key=lambda kv: -kv[1][1])[: args.top]:
            print(f"   {n:5.1f} x {us:7.1f} us  {name}")


if __name__ == "__main__":
    main()
