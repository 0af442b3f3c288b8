from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import sslprobe
from sslprobe.cli.main import main


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"sslprobe {sslprobe.__version__}\n"
    assert sslprobe.__version__ == importlib.metadata.version("sslprobe")  # the installed metadata agrees


def test_version_flag_as_a_module():
    result = subprocess.run([sys.executable, "-m", "sslprobe", "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"sslprobe {sslprobe.__version__}\n"
