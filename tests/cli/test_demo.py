from __future__ import annotations

import importlib.util

import pytest

from sslprobe.cli.main import main
from sslprobe.cli.plot import read_metrics

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_demo_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    assert main(["demo", "--max-epochs", "2", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "first epoch top-1" in printed and "offline" in printed and str(tmp_path / "run") in printed
    metrics = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(metrics["eval/linear_top1"]) == 2
    assert {"train/linear_loss", "train/linear_top1", "train/ssl_loss"} <= set(metrics)
    assert (tmp_path / "run" / "probes.png").stat().st_size > 10_000


def test_demo_reports_its_probes_with_the_progress_bar_on(tmp_path, capsys):
    # The Trainer appends its progress bar to the callbacks list it is given; the summary must still list the probes.
    assert main(["demo", "--max-epochs", "1", "--batch-size", "512", "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "Epoch 0" in printed  # the progress bar ran
    (row,) = [line for line in printed.splitlines() if line.startswith("linear ")]
    first, last = (float(v) for v in row.split()[1:])
    logged = read_metrics(tmp_path / "run" / "metrics.csv")["eval/linear_top1"]
    assert first == last == pytest.approx(logged[0][2], abs=5e-5)  # printed with 4 decimals


def test_missing_extra_names_the_install_command(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sslprobe demo needs the package 'scikit-learn'" in err
    assert "pip install 'sslprobe[demo]'" in err
