"""glmfleet/toolvenv.py's way of running pip without installing it, on this machine's Python (the
fleet tests install uv this way on Debian 12, whose pip wheel lives in /usr/share/python-wheels)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from glmfleet.toolvenv import FIND_PIP_WHEEL


def test_the_interpreters_own_pip_wheel_is_found_and_runs_pip(tmp_path):
    venv = tmp_path / "tool"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    wheel = subprocess.run([python, "-c", FIND_PIP_WHEEL], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(wheel).is_file() and Path(wheel).name.startswith("pip-") and wheel.endswith(".whl")
    assert not (venv / "bin" / "pip").exists()
    ran = subprocess.run([python, f"{wheel}/pip", "--version"], capture_output=True, text=True, check=True)
    assert ran.stdout.startswith("pip ") and f"from {wheel}/pip" in ran.stdout
