"""How long does one label-free health number take? RankMe, AlphaReQ and LiDAR, once each, as at a validation.

The health callbacks compute their number once per validation, in float64, from the rows their store holds
(float32, on the module's device); nothing per step but appending rows. This times that one computation
(``sslprobe.probes.spectra``) on random rows of the sizes a run has:

  python benchmarks/health_time.py                  # CPU (all of torch's threads)
  python benchmarks/health_time.py --device cuda    # on a GPU

RankMe and AlphaReQ on --rows x --features (default 25,600 x 2,048, their default queue_size and a ResNet-50
embedding); LiDAR on --lidar-samples samples x --views views x --features (default 12,800 x 2 x 2,048: as many rows)
and on its default queue_size (1,000 samples). Prints the median over --repeats, after one warm-up run, synchronised
on CUDA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sslprobe.probes.spectra import alpha_req, lidar, rankme

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refit_time import timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rows", type=int, default=25600, help="RankMe's and AlphaReQ's rows (their queue_size)")
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--lidar-samples", type=int, default=12800)
    ap.add_argument("--lidar-queue", type=int, default=1000, help="LiDAR's default queue_size")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("health_time.py: --device cuda needs a CUDA GPU; none is visible. Use --device cpu.")
    g = torch.Generator(device=device).manual_seed(0)
    d = args.features
    # A decaying spectrum, as an embedding has (float32, as the store holds its rows).
    scale = torch.arange(1, d + 1, device=device, dtype=torch.float32) ** -0.5
    rows = torch.randn(args.rows, d, device=device, generator=g) * scale
    centres = torch.randn(args.lidar_samples, 1, d, device=device, generator=g) * scale
    views = centres + 0.3 * torch.randn(args.lidar_samples, args.views, d, device=device, generator=g) * scale
    cases = [
        (f"RankMe    {args.rows} x {d}", lambda: rankme(rows)),
        (f"AlphaReQ  {args.rows} x {d}", lambda: alpha_req(rows)),
        (f"LiDAR     {args.lidar_samples} x {args.views} x {d}", lambda: lidar(views)),
        (f"LiDAR     {args.lidar_queue} x {args.views} x {d}", lambda: lidar(views[-args.lidar_queue :])),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# {name} torch={torch.__version__} float64, median of {args.repeats} after a warm-up")
    print(f"{'computation':36s} {'seconds':>8s} {'value':>10s}")
    for label, fn in cases:
        value, seconds = float(fn()), timed(fn, device, args.repeats)
        print(f"{label:36s} {seconds:8.3f} {value:10.3f}")


if __name__ == "__main__":
    main()
