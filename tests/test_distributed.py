"""all_gather_rows on 2 CPU processes (gloo): rows of different counts, none at all, and disagreeing shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslprobe._distributed import all_gather_rows

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


def _gather(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        results = {}
        # rank 0 holds 3 rows (2, 4) float64; rank 1 none, and does not know their shape or dtype
        rows = torch.arange(24, dtype=torch.float64).view(3, 2, 4) if rank == 0 else torch.zeros(0)
        results["empty_rank"] = all_gather_rows(rows)
        # counts 1 and 2
        results["uneven"] = all_gather_rows(torch.full((rank + 1, 3), float(rank)))
        # nobody has rows
        results["none"] = all_gather_rows(torch.zeros(0))
        try:
            all_gather_rows(torch.zeros(2, 3 + rank))
        except ValueError as error:
            results["mismatch"] = str(error)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_gather_rows_with_uneven_and_empty_processes(tmp_path: Path):
    init = f"file://{tmp_path / 'init'}"
    mp.start_processes(_gather, args=(init, str(tmp_path / "out")), nprocs=2, start_method="spawn")
    got = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    expected = torch.arange(24, dtype=torch.float64).view(3, 2, 4)
    for results in got:
        rows, counts = results["empty_rank"]
        assert counts == [3, 0] and rows.dtype == torch.float64 and torch.equal(rows, expected)
        rows, counts = results["uneven"]
        assert counts == [1, 2] and rows[:, 0].tolist() == [0.0, 1.0, 1.0]
        rows, counts = results["none"]
        assert counts == [0, 0] and rows.numel() == 0
        assert "rank 0: (3,)" in results["mismatch"] and "rank 1: (4,)" in results["mismatch"]
