from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from sslprobe.cli.main import main
from sslprobe.cli.plot import find_metrics_csv

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
    # the command is named once, not once by the message and again by main
    assert capsys.readouterr().err == f"sslprobe plot: {bad} is not a Lightning CSVLogger file (no 'step' column).\n"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["plot", str(bad)]) == 2
    assert "pip install 'sslprobe[plot]'" in capsys.readouterr().err


def test_plot_accepts_the_run_folder_the_demo_prints(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.csv").write_text(CSV)
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'probes.png'} from {tmp_path / 'metrics.csv'}\n"
    assert (tmp_path / "probes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_takes_the_newest_csvlogger_version(tmp_path):
    pytest.importorskip("matplotlib")
    for n in (0, 2, 10):  # 10 sorts before 2 as text
        (tmp_path / f"version_{n}").mkdir()
        (tmp_path / f"version_{n}" / "metrics.csv").write_text(CSV if n == 10 else "not,a,log\n")
    (tmp_path / "version_x").mkdir()  # a named version is no candidate
    (tmp_path / "version_x" / "metrics.csv").write_text("not,a,log\n")
    assert find_metrics_csv(tmp_path) == tmp_path / "version_10" / "metrics.csv"
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "version_10" / "probes.png").exists()


def test_plot_folder_without_a_csv_says_so(tmp_path, capsys):
    (tmp_path / "version_0").mkdir()
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sslprobe plot: no metrics.csv in the folder {tmp_path}, nor in a version_N/ folder")
    assert "Traceback" not in err and "sslprobe plot: sslprobe plot" not in err


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


def test_a_metric_outside_0_1_gets_its_own_axis(tmp_path):
    pytest.importorskip("matplotlib")
    scores = tmp_path / "scores" / "metrics.csv"
    scores.parent.mkdir()
    scores.write_text("epoch,step,eval/linear_top1,train/linear_loss\n0,9,0.5,\n0,9,,2.1\n1,19,0.75,\n1,19,,1.5\n")
    with_rank = tmp_path / "rank" / "metrics.csv"
    with_rank.parent.mkdir()
    with_rank.write_text(scores.read_text().replace("eval/linear_top1", "eval/rankme").replace("0.5,", "42.0,"))
    assert main(["plot", str(scores.parent), "-o", str(tmp_path / "a.png")]) == 0
    assert main(["plot", str(with_rank.parent), "-o", str(tmp_path / "b.png")]) == 0
    assert _png_width(tmp_path / "a.png") == 2 * 6 * 120 and _png_width(tmp_path / "b.png") == 3 * 6 * 120
