"""`make demo`, the README's first command, run as a user runs it, twice, in a fleet slot of its
own (its own hosts, ports and state): the second demo must find the fleet converged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devfleet import localfleet
from tests.support.fleettools import ROOT

pytestmark = pytest.mark.fleet

SLOT = "5"


def in_slot(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "GLMFLEET_FLEET_SLOT": SLOT},
    )


def demo() -> subprocess.CompletedProcess:
    return in_slot("devfleet.demo", "--hosts", "1")


@pytest.fixture(scope="module")
def demo_slot():
    """The slot's hosts are new (an interrupted session may have left some), and are powered off
    and deleted afterwards (its base stays, as a user's would)."""
    in_slot("devfleet.localfleet", "down", "--destroy", timeout=300)
    yield Path(f"{localfleet.DEFAULT_FLEET_DIR}-slot{SLOT}")
    in_slot("devfleet.localfleet", "down", "--destroy", timeout=300)


def test_the_demo_deploys_verifies_and_is_converged_when_run_again(demo_slot):
    first = demo()
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    name = "fleet5-01"
    assert re.search(rf"changed: {name} \(([1-9]\d*) operations\)", first.stdout), first.stdout
    assert "no host changed" in first.stdout
    assert re.search(rf"{name}: vllm.service active", first.stdout), first.stdout
    assert "every demo host verified" in first.stdout
    assert (demo_slot / "demo-api-key").stat().st_mode & 0o777 == 0o600
    again = demo()
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert f"changed: {name} (0 operations)" in again.stdout
