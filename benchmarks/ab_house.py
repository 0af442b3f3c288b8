"""A/B of two performance mechanisms (issue 17), side by side in one run of `overhead.py`'s configurations.

  whole-N        module-N (graphed steps) with the multi-tensor kernels on whole tensors: no flat pieces
  eagerwhole-N   eager-N (cuda_graph=False) without flat pieces
  noplan-N       eager-N without the fused-Adam plan cache (every step through `optimizer.step(found_inf=...)`)

Usage: python benchmarks/ab_house.py --device cuda --backbone resnet18 --configs none,module-8,whole-8,...
(the other arguments are overhead.py's). Measures the code it imports (the mechanisms must still exist).
"""

from __future__ import annotations

import sys

sys.path.insert(0, "benchmarks")
import importlib

import overhead

conditional_step = importlib.import_module("sslprobe.optim.conditional_step")  # (the package re-exports the function)

_run_config = overhead.run_config
_fused_plan = conditional_step._fused_plan
_pieces = overhead.DEFAULT_PIECES


def run_config(config, *args, **kwargs):
    conditional_step._fused_plan = (lambda optimizer: None) if config.startswith("noplan") else _fused_plan
    overhead.DEFAULT_PIECES = 1 if config.startswith("eagerwhole") else _pieces
    try:
        return _run_config(config.replace("noplan", "eager").replace("eagerwhole", "eager"), *args, **kwargs)
    finally:
        conditional_step._fused_plan, overhead.DEFAULT_PIECES = _fused_plan, _pieces


overhead.run_config = run_config

if __name__ == "__main__":
    overhead.main()
