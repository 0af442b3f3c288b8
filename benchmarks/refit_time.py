"""How long does RefitProbe take? One refit at validation, and the statistics it accumulates per training step.

The refit's cost depends on D and C only (the statistics do not grow with the rows): one eigendecomposition of the
D x D standardised covariance in float64, then the whole lambda grid. Per step: X'X += x'x and X'Y += x'y in float64.

  python benchmarks/refit_time.py                    # CPU, D=2048, C=1000
  python benchmarks/refit_time.py --device cuda      # on a GPU

Prints the median over --repeats of: one refit (fit_ridge, which includes the eigendecomposition), the
eigendecomposition alone, and one step's accumulation of a batch of --batch rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sslprobe.probes.ridge import DEFAULT_LAMBDAS, RidgeStatistics, fit_ridge


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, synchronised at both ends (one warm-up run first)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=16384, help="rows summed before the refit (its cost ignores them)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    d, c = args.features, args.classes
    stats = RidgeStatistics(d, c, device=device)
    centers = torch.randn(c, d, device=device, generator=g)
    for _ in range(0, args.rows, args.batch):
        labels = torch.randint(0, c, (args.batch,), device=device, generator=g)
        stats.update(centers[labels] + 3 * torch.randn(args.batch, d, device=device, generator=g), labels)
    fit = fit_ridge(stats, DEFAULT_LAMBDAS)
    assert fit is not None and torch.isfinite(fit.weight).all()
    refit_s = timed(lambda: fit_ridge(stats, DEFAULT_LAMBDAS), device, args.repeats)
    gram = stats.xtx / stats.counts[0]
    eigh_s = timed(lambda: torch.linalg.eigh(gram), device, args.repeats)
    x = torch.randn(args.batch, d, device=device, generator=g)
    labels = torch.randint(0, c, (args.batch,), device=device, generator=g)
    scratch = RidgeStatistics(d, c, device=device)
    step_s = timed(lambda: scratch.update(x, labels), device, max(args.repeats, 20))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# {name} torch={torch.__version__} D={d} C={c} rows={args.rows} lambdas={len(DEFAULT_LAMBDAS)}")
    print(f"refit (fit_ridge)      {refit_s * 1000:9.1f} ms   (lambda chosen: {fit.lambda_:g})")
    print(f"  of which eigh        {eigh_s * 1000:9.1f} ms")
    print(f"accumulate, batch {args.batch:4d} {step_s * 1000:9.2f} ms/step")


if __name__ == "__main__":
    main()
