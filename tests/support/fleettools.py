"""Running glmfleet's real deploy against the local fleet, for the tests and the demo.

The fleet's hosts have no GPU: they serve through the vLLM test double
(tests/support/vllm_test_double), which the product's own venv role installs from a package index
served on loopback, the path a mirror-only site uses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import testinfra

import roles  # noqa: F401  (hands the roles' settings to the configuration model)
from devfleet import localfleet
from glmfleet.config import all_settings
from tests.support.paths import ROOT
from tests.support.pkgindex import TEST_DOUBLE_VERSION

UV_VERSION = all_settings()["uv_version"].default  # the product's own pin
# The fleet has no GPU: the driver role is not asked to manage one (tests/test_gpu_stack_fleet.py does).
TEST_DOUBLE = {
    "vllm_package": "vllm-test-double",
    "vllm_version": TEST_DOUBLE_VERSION,
    "vllm_ready_timeout": 120,
    "nvidia_driver_source": "none",
}
# With the control source a revision only names the files (no hub is asked): any 40-hex label.
TEST_MODEL_REVISION = "7e57" * 10


def test_model_settings(directory: Path) -> dict:
    """A small real checkpoint made in ``directory``, pushed by the control node to the hosts."""
    from tests.support.model_maker import make_checkpoint

    if not (directory / "config.json").exists():
        make_checkpoint(directory, size_bytes=100 * 2**20, shard_bytes=40 * 2**20)
    return {
        "model_source": "control",
        "model_control_dir": str(directory),
        "model_revision": TEST_MODEL_REVISION,
        # The local fleet's hosts share the control machine's disk, which the fleet's own venvs and
        # copies fill as a run goes on: the default margin (sized for real checkpoints) would refuse
        # a 100 MB fetch on a machine with a few GB free, as it did in CI.
        "model_disk_margin_gb": 0.2,
    }


test_model_settings.__test__ = False  # a helper, not a test
# The tests' API key: it reaches pyinfra through the inventory's environment, as prod.py shows.
API_KEY_ENV = "GLMFLEET_VLLM_API_KEY"


@dataclass
class Run:
    """One pyinfra run: exit code, output, and the --json results when it got that far."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def results(self) -> dict:
        return json.loads(self.stdout)["results"]

    def started(self) -> list[str]:
        """The operations pyinfra started, from its log: what a run that lost its only host ran
        (pyinfra then ends with "No hosts remaining!" and prints no --json results)."""
        log = re.sub(r"\x1b\[[0-9;]*m", "", self.stderr)
        return re.findall(r"^--> Starting operation: (.+?)\s*$", log, re.M)

    def planned(self, host: str) -> list[str]:
        """The operations planned on a host, whether they changed anything or not."""
        return [
            op["name"] for op in self.results["operations"] if host in op["success"] + op["no_change"] + op["error"]
        ]

    def changed(self) -> dict[str, set[str]]:
        """Host name -> names of the operations that changed something there."""
        changed: dict[str, set[str]] = {}
        for op in self.results["operations"]:
            for host in op["success"]:
                changed.setdefault(host, set()).add(op["name"])
        return changed


def data_args(data: dict) -> list[str]:
    """--data flags; pyinfra parses each value as int, bool or JSON, else keeps the string."""
    args = []
    for key, value in data.items():
        args += ["--data", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return args


def pyinfra(
    inventory: str | Path, *args: str, data: dict | None = None, env: dict | None = None, timeout: int = 900
) -> Run:
    """`pyinfra -y --json INVENTORY ARGS` from the project root, as a user runs it."""
    command = [
        str(Path(sys.executable).parent / "pyinfra"),
        "-y",
        "--json",
        str(inventory),
        *args,
        *data_args(data or {}),
    ]
    return run_from_root(command, env, timeout)


def run_from_root(command: list[str], env: dict | None, timeout: int) -> Run:
    """A command of the project's venv, from the project root, with this checkout importable."""
    completed = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    return Run(completed.returncode, completed.stdout, completed.stderr)


def deploy(inventory: str | Path = "inventory/local.py", **kwargs) -> Run:
    return pyinfra(inventory, "deploy.py", **kwargs)


def glmfleet(*args: str, data: dict | None = None, env: dict | None = None, timeout: int = 900) -> Run:
    """The `glmfleet` command from the project root, as a user runs it."""
    return run_from_root([str(Path(sys.executable).parent / "glmfleet"), *args, *data_args(data or {})], env, timeout)


def write_inventory(
    path: Path,
    host_data: dict[str, dict],
    groups: dict[str, tuple[list[str], dict]] | None = None,
    hosts: list[tuple[str, dict]] | None = None,
) -> Path:
    """inventory/local.py with extra data for some hosts (to change one host alone), and
    extra groups, name -> (host names, group data). With `hosts`, those hosts (as
    localfleet.inventory_hosts() gave them) instead of the hosts up now: to keep a host that
    is down in the inventory."""
    path.write_text(
        "from runpy import run_path\n"
        f"hosts, group_data = run_path({str(ROOT / 'inventory/local.py')!r})['local_fleet']\n"
        + (f"hosts = {hosts!r}\n" if hosts else "")
        + f"EXTRA = {host_data!r}\n"
        "local_fleet = ([(name, {**data, **EXTRA.get(name, {})}) for name, data in hosts], group_data)\n"
        + "".join(f"{name} = {group!r}\n" for name, group in (groups or {}).items())
    )
    return path


def gateway_port() -> int:
    """A port in this fleet slot's range that no host's vLLM takes (hosts stay below 90)."""
    return localfleet.FIRST_VLLM_PORT + 100 * localfleet.fleet_slot() + 90


def fleet_host(name: str):
    """A pytest-testinfra host for one fleet host, over the same SSH pyinfra uses."""
    host = next(h for h in localfleet.load_hosts() if h["name"] == name)
    return testinfra.get_host(
        f"ssh://root@{host['address']}:{host['ssh_port']}",
        ssh_identity_file=host["ssh_key"],
        ssh_extra_args="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
    )


# What the deploy leaves on a host: removed, a host is as bare as a new one.
DEPLOYED_PATHS = [
    "/etc/systemd/system/vllm.service",
    "/etc/glmfleet",
    "/opt/glmfleet",
    "/var/lib/vllm",
    "/var/cache/glmfleet",
]


def make_bare(name: str) -> None:
    """Undo every deploy on a fleet host, so a test's first run starts from a bare host."""
    fleet_host(name).check_output(
        "systemctl disable --now vllm.service 2>/dev/null; systemctl reset-failed vllm.service 2>/dev/null; "
        f"rm -rf {' '.join(DEPLOYED_PATHS)}; systemctl daemon-reload; "
        "id vllm >/dev/null 2>&1 && userdel vllm; getent group vllm >/dev/null && groupdel vllm; true"
    )


def wait_for(condition, what: str, timeout_s: float = 10) -> None:
    """Polls ``condition`` until it holds; fails the test, naming ``what``, after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)
