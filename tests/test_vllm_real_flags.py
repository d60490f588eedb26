"""Flag validation against the real vLLM (the pinned release and its dependencies, from PyPI)
in a fleet host's venv.

The fleet's hosts install it from a package index on loopback, as a mirror-only site would:
the wheels are downloaded once on this machine (about 4 GB, kept in .whl/). The host first
serves through the test double, as a serving host would through vLLM; a deploy that switches
it to the real vLLM with a bad flag must fail with vLLM's own message and leave that running
unit alone. The real venv has test_vllm_real.py's root and pins, so a session builds it once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from glmfleet import catalog, localfleet
from glmfleet.config import resolve
from roles.vllm_flags import SCRIPT
from roles.vllm_service import vllm_command
from roles.vllm_venv import venv_name
from tests.fleettools import ROOT, TEST_DOUBLE, UV_VERSION, pyinfra
from tests.fleettools import testinfra_host as ssh_host  # not collected as a test

from tests.pkgindex import PackageIndex

pytestmark = pytest.mark.fleet

UNIT = "/etc/systemd/system/vllm.service"
PINNED = resolve({}).vllm_version
WHEELS = ROOT / ".whl" / f"vllm-{PINNED}-with-dependencies"


@pytest.fixture(scope="module")
def vllm_index():
    """The pinned vLLM, every wheel it needs and the pinned uv, served on 127.0.0.1."""
    if not (WHEELS / ".complete").exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(WHEELS),
                        f"vllm=={PINNED}", f"uv=={UV_VERSION}"], check=True)
        (WHEELS / ".complete").touch()
    with PackageIndex(WHEELS) as index:
        yield index.url


@pytest.fixture(scope="module")
def real(vllm_index):
    return {"vllm_package": "vllm", "vllm_venv_root": "/opt/glmfleet/vllm-real", "pip_index_url": vllm_index}


@pytest.fixture(scope="module")
def serving(fleet, package_index):
    """The last fleet host serving through the test double; its unit's sha256 and main PID."""
    name = fleet[-1]
    run = pyinfra("inventory/local.py", "deploy.py", "--limit", name, data={**TEST_DOUBLE, "pip_index_url": package_index})
    assert run.returncode == 0, run.stderr[-3000:]
    host = ssh_host(name)
    return name, host.file(UNIT).sha256sum, main_pid(name)


def main_pid(name: str) -> str:
    return ssh_host(name).check_output("systemctl show --property MainPID --value vllm.service")


def still_serving(name: str) -> bool:
    port = dict(localfleet.inventory_hosts())[name]["vllm_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return response.status == 200


@pytest.mark.parametrize(
    ("bad_args", "message"),
    [
        (["--tensor-parralel-size", "2"], "vllm: error: unrecognized arguments: --tensor-parralel-size 2"),
        # Accepted up to 0.8.x (GLM-Z1 recipes used it); gone from the pinned vLLM.
        (["--enable-reasoning"], "vllm: error: unrecognized arguments: --enable-reasoning"),
    ],
)
def test_a_bad_flag_fails_the_host_and_leaves_the_running_unit_alone(serving, real, bad_args, message):
    name, unit_sha, pid = serving
    run = pyinfra("inventory/local.py", "deploy.py", "--limit", name, data={**real, "vllm_extra_args": bad_args}, timeout=2400)
    assert run.returncode != 0
    assert f"vLLM {PINNED} refuses the command: {message}" in run.stderr
    host = ssh_host(name)
    assert host.file(UNIT).sha256sum == unit_sha
    assert main_pid(name) == pid
    assert still_serving(name)


def test_the_catalogs_flags_for_every_model_are_accepted(serving, real):
    name = serving[0]
    commands = [vllm_command(resolve({**real, "model": model}))[2:] for model in catalog.load().models]
    python = f"{real['vllm_venv_root']}/venvs/{venv_name(resolve(real))}/bin/python"
    host = ssh_host(name)
    result = host.run(f"HF_HUB_OFFLINE=1 {python} {SCRIPT} --many <<'EOF'\n{json.dumps(commands)}\nEOF")
    verdicts = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(verdicts) == len(commands), result.stdout + result.stderr
    assert [v["message"] for v in verdicts if not v["ok"]] == []
    assert result.rc == 0


def test_good_flags_pass_the_check(serving, real):
    name = serving[0]
    run = pyinfra("inventory/local.py", "roles.vllm_flags.vllm_flags", "--limit", name, data={**real, "model": "glm-4.7-flash"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"check vLLM flags | vllm serve flags accepted by vLLM {PINNED}" in run.changed()[name]
