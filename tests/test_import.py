from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_changes_no_global_state():
    script = textwrap.dedent(
        """
        import logging, os, sys, warnings
        import torch, lightning.pytorch as pl, torchmetrics
        def snapshot():
            loggers = {n: (list(l.handlers), l.level, l.propagate) for n, l in logging.root.manager.loggerDict.items()
                       if isinstance(l, logging.Logger)}
            return (dict(os.environ), list(warnings.filters), list(logging.root.handlers), logging.root.level, loggers,
                    torch.get_rng_state().clone(), torch.get_float32_matmul_precision(),
                    torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
                    torch.backends.cudnn.benchmark)
        before = snapshot()
        loaded = set(sys.modules)
        import sslprobe, sslprobe.callbacks, sslprobe.optim
        after = snapshot()
        names = ["environ", "warnings", "root handlers", "root level", "loggers", "rng", "matmul", "deterministic",
                 "threads", "cudnn"]
        for name, a, b in zip(names, before, after):
            if name == "loggers":  # new module loggers are fine if they stay bare; existing ones must not change
                assert all(b[n] == a[n] for n in a), name
                assert all(b[n] == ([], 0, True) for n in set(b) - set(a)), name
                continue
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            assert same, name
        extras = [m for m in ("sklearn", "matplotlib", "hydra", "omegaconf") if m in set(sys.modules) - loaded]
        assert not extras, extras
        t = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False)
        assert not any(type(c).__module__.startswith("sslprobe") for c in t.callbacks)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
