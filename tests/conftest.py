"""Session fixtures: the local fleet of real systemd hosts and a package index on loopback."""

from __future__ import annotations

import os
import tempfile

import pytest

from devfleet import localfleet
from tests.support.fleettools import UV_VERSION, test_model_settings
from tests.support.pkgindex import PackageIndex, fill_index_dir

# The hub on loopback (olah serving a made checkpoint), shared by the unit and fleet weights tests.
pytest_plugins = ["tests.support.weights_fixtures"]

FLEET_SIZE = 2
# The suite's own fleet slot, whatever the shell exports (the session destroys its hosts):
# `make test` never touches the hosts of `make demo` and `make fleet-up` (slot 0) or of the
# benchmarks (slot 8). Set here, so that every pyinfra run the tests start inherits it.
os.environ["GLMFLEET_FLEET_SLOT"] = "1"
os.environ.pop("GLMFLEET_FLEET_DIR", None)
# The control node's own keys (the fleet's transfer key): the session's, never the machine's.
os.environ["GLMFLEET_CONTROL_DIR"] = tempfile.mkdtemp(prefix="glmfleet-control-")


@pytest.fixture(scope="session")
def fleet():
    """FLEET_SIZE new hosts, up for the whole session; taken down after it unless
    GLMFLEET_KEEP_FLEET=1. New every session: the tests' first runs expect bare hosts, and a
    host kept from an earlier session still has its driver packages, venvs and weights."""
    if localfleet.fleet_dir().exists():
        localfleet.down(destroy=True)
    localfleet.up(FLEET_SIZE)
    yield [host["name"] for host in localfleet.load_hosts()][:FLEET_SIZE]
    if os.environ.get("GLMFLEET_KEEP_FLEET") != "1":
        localfleet.down()


@pytest.fixture(scope="session")
def package_index(tmp_path_factory):
    """The test double's wheel and the pinned uv, served by pypiserver on 127.0.0.1."""
    wheels = tmp_path_factory.mktemp("index")
    fill_index_dir(wheels, requirements=[f"uv=={UV_VERSION}"])
    with PackageIndex(wheels) as index:
        yield index.url


@pytest.fixture(scope="session")
def test_model(tmp_path_factory):
    """Settings for a small real checkpoint that the control node pushes (the weights role)."""
    return test_model_settings(tmp_path_factory.mktemp("test-model") / "checkpoint")
