"""The glm4_patch role on a fleet host, against the real vLLM 0.8.4 and 0.8.5 wheels from PyPI,
installed without their dependencies (glm4.py is all the role reads or writes).

The tests run in file order on one host: patch, re-run, another release, tampered file.
"""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from devfleet import localfleet
from glmfleet.config import resolve
from roles.glm4_patch import ORIGINAL_SHA256, PATCHED_SHA256
from roles.vllm_venv import venv_name
from tests.support.fleettools import ROOT, fleet_host, pyinfra
from tests.support.pkgindex import download_wheels

pytestmark = pytest.mark.fleet

WHEELS = ROOT / ".whl"
MODULE = "vllm/model_executor/models/glm4.py"
# The recipe operators run today; a venv root of its own leaves the other tests' venvs alone.
RECIPE = {
    "model": "glm-z1-32b-0414",
    "vllm_version": "0.8.4",
    "vllm_tensor_parallel_size": 4,
    "vllm_venv_root": "/opt/glmfleet/vllm-glm4",
}


def wheel(version: str) -> Path:
    """vLLM's wheel from PyPI, downloaded once into .whl/."""
    found = sorted(WHEELS.glob(f"vllm-{version}-*.whl"))
    return found[0] if found else download_wheels([f"vllm=={version}"], WHEELS)[0]


def install_without_deps(host_name: str, data: dict) -> str:
    """Install the wheel of data's vLLM into the venv the role will look at; returns glm4.py's path."""
    venv = f"{data['vllm_venv_root']}/venvs/{venv_name(resolve(data))}"
    source = wheel(data["vllm_version"])
    copy_to_host(host_name, source, f"/var/tmp/wheels/{source.name}")
    host = fleet_host(host_name)
    host.check_output(
        f"rm -rf {venv} && python3 -m venv {venv} && "
        f"{venv}/bin/pip install --quiet --no-deps --no-index /var/tmp/wheels/{source.name}"
    )
    return host.check_output(f"ls {venv}/lib/python3*/site-packages/{MODULE}")


def copy_to_host(host_name: str, source: Path, dest: str) -> None:
    """Stream a file to a fleet host over its SSH, with its known host key."""
    host = next(h for h in localfleet.load_hosts() if h["name"] == host_name)
    with source.open("rb") as data:
        subprocess.run(
            [
                "ssh",
                "-i",
                host["ssh_key"],
                "-p",
                str(host["ssh_port"]),
                "-o",
                f"UserKnownHostsFile={host['known_hosts']}",
                "-o",
                "StrictHostKeyChecking=yes",
                "root@127.0.0.1",
                f"mkdir -p {Path(dest).parent} && cat > {dest}",
            ],
            stdin=data,
            check=True,
        )


def sha256(host_name: str, path: str) -> str:
    return fleet_host(host_name).file(path).sha256sum


def run_role(host_name: str, data: dict):
    return pyinfra("inventory/local.py", "roles.glm4_patch.glm4_patch", "--limit", host_name, data=data)


@pytest.fixture(scope="module")
def host_name(fleet):
    return fleet[0]


@pytest.fixture(scope="module")
def glm4(host_name):
    return install_without_deps(host_name, RECIPE)


def test_the_wheel_ships_the_known_broken_file():
    with zipfile.ZipFile(wheel("0.8.4")) as archive:
        assert hashlib.sha256(archive.read(MODULE)).hexdigest() == ORIGINAL_SHA256


def test_the_recipe_patches_vllm_084_and_keeps_the_original(host_name, glm4):
    assert sha256(host_name, glm4) == ORIGINAL_SHA256
    run = run_role(host_name, RECIPE)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(op.startswith("glm4.py patch | patch glm4.py of vLLM 0.8.4") for op in run.changed()[host_name])
    assert sha256(host_name, glm4) == PATCHED_SHA256
    assert sha256(host_name, glm4 + ".orig") == ORIGINAL_SHA256


def test_a_second_run_changes_nothing(host_name, glm4):
    run = run_role(host_name, RECIPE)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.changed() == {}
    assert sha256(host_name, glm4) == PATCHED_SHA256


def test_vllm_085_is_left_untouched(host_name):
    upgraded = {**RECIPE, "vllm_version": "0.8.5"}
    glm4_085 = install_without_deps(host_name, upgraded)
    pristine = sha256(host_name, glm4_085)
    with zipfile.ZipFile(wheel("0.8.5")) as archive:
        assert pristine == hashlib.sha256(archive.read(MODULE)).hexdigest() != ORIGINAL_SHA256
    run = run_role(host_name, upgraded)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.changed() == {}
    assert sha256(host_name, glm4_085) == pristine
    assert not fleet_host(host_name).file(glm4_085 + ".orig").exists


def test_a_tampered_original_is_refused_and_left_as_it_is(host_name, glm4):
    host = fleet_host(host_name)
    host.check_output(f"cp {glm4}.orig {glm4} && echo '# edited by hand' >> {glm4}")
    tampered = sha256(host_name, glm4)
    run = run_role(host_name, RECIPE)
    assert run.returncode != 0
    assert f"refused, nothing changed: {glm4} has sha256 {tampered}, neither vLLM 0.8.4's original" in run.stderr
    assert sha256(host_name, glm4) == tampered
    assert sha256(host_name, glm4 + ".orig") == ORIGINAL_SHA256
