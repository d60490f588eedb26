"""The venv role with the real pinned vLLM from PyPI (about 10 GB with torch), on one fleet host."""

from __future__ import annotations

import pytest

from glmfleet.config import resolve
from tests.support.fleettools import fleet_host, pyinfra

pytestmark = pytest.mark.fleet

# A root of its own, so the test double's venv on the same host is left alone.
REAL = {"vllm_venv_root": "/opt/glmfleet/vllm-real"}


def test_real_vllm_installs_at_the_pinned_version_and_a_rerun_installs_nothing(fleet):
    host_name = fleet[-1]
    first = pyinfra("inventory/local.py", "roles.vllm_venv.vllm_venv", "--limit", host_name, data=REAL, timeout=2400)
    assert first.returncode == 0, first.stderr[-3000:]
    pinned = resolve({}).vllm_version  # the default model's release
    python = "/opt/glmfleet/vllm-real/current/bin/python"
    reported = fleet_host(host_name).check_output(
        f"{python} -c 'from importlib.metadata import version; print(version(\"vllm\"))'"
    )
    assert reported == pinned
    assert any(op.startswith("vLLM venv | build venv vllm-") for op in first.changed()[host_name])

    again = pyinfra("inventory/local.py", "roles.vllm_venv.vllm_venv", "--limit", host_name, data=REAL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.changed() == {}
