from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from sslprobe.cli.main import main

CSV = """epoch,step,eval/linear_top1,train/linear_loss,train/linear_top1,train/ssl_loss
0,0,,2.3,,6.1
0,1,,2.1,,5.9
0,1,0.55,,0.5,
1,2,,1.5,,5.0
1,3,,1.2,,4.8
1,3,0.81,,0.78,
"""


def test_plot_command_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    csv = tmp_path / "metrics.csv"
    csv.write_text(CSV)
    assert main(["plot", str(csv), "-o", str(tmp_path / "out.png")]) == 0
    png = (tmp_path / "out.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_as_module_and_default_output(tmp_path):
    pytest.importorskip("matplotlib")
    csv = tmp_path / "metrics.csv"
    csv.write_text(CSV)
    result = subprocess.run([sys.executable, "-m", "sslprobe", "plot", str(csv)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "probes.png").exists()


def test_plot_rejects_other_files_and_missing_matplotlib(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["plot", str(bad)]) == 2
    assert "not a Lightning CSVLogger file" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["plot", str(bad)]) == 2
    assert "pip install 'sslprobe[plot]'" in capsys.readouterr().err
