"""Which layout makes a probe's fp32 matmuls fastest? (CUDA only; informs LinearHeadBank's weight layout.)

Usage: python benchmarks/bank_matmul.py
Times, for features (128, 2048) and 100 or 16 x 100 outputs in fp32, the forward product and the weight
gradient in two layouts: weight (out, in) as nn.Linear stores it, and (in, out). Prints microseconds per call.
"""

from __future__ import annotations

import torch


def timed(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / reps


def main():
    torch.manual_seed(0)
    x = torch.randn(128, 2048, device="cuda")
    print(f"# {torch.cuda.get_device_name()} torch={torch.__version__}; us per call, fp32 unless noted")
    for out in (100, 1600):
        report(x, out)


def report(x: torch.Tensor, out: int) -> None:
    w = torch.randn(out, 2048, device="cuda")  # (out, in)
    wt = w.t().contiguous()  # (in, out)
    b = torch.randn(out, device="cuda")
    g = torch.randn(128, out, device="cuda")
    rows = {
        "linear(x, W[out,in]) + bias": lambda: torch.nn.functional.linear(x, w, b),
        "mm(x, W[out,in].t())": lambda: x @ w.t(),
        "mm(x, W[in,out])": lambda: x @ wt,
        "mm(W[out,in], x.t()).t()": lambda: (w @ x.t()).t(),
        "grad W[out,in] = g.t() @ x": lambda: g.t() @ x,
        "grad W[in,out] = x.t() @ g": lambda: x.t() @ g,
    }
    for name, fn in rows.items():
        print(f"out={out:5d}  {name:32s} {timed(fn):7.1f}")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"out={out:5d}  {'(TF32) linear(x, W[out,in])':32s} {timed(rows['linear(x, W[out,in]) + bias']):7.1f}")
    print(f"out={out:5d}  {'(TF32) grad g.t() @ x':32s} {timed(rows['grad W[out,in] = g.t() @ x']):7.1f}")
    torch.backends.cuda.matmul.allow_tf32 = False


if __name__ == "__main__":
    main()
