"""The security issue's reproductions, tried on real fleet hosts as an attacker and a careless
operator would: each must fail safely. (What is refused before any host is touched is tried in
tests/test_config.py and tests/test_shell_injection.py; these need a host.)

The tests run in file order on one fleet; the first host also runs the gateway, and the
deploys run with sudo, as inventory/prod.py's do.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from devfleet import localfleet
from glmfleet.layout import GATEWAY_KEYS, PEER_KEY, ROOT_AUTHORIZED_KEYS
from glmfleet.shell import quote
from roles.model_weights.control import PUBLISHED_KEY
from tests.support.fleettools import (
    API_KEY_ENV,
    TEST_DOUBLE,
    deploy,
    fleet_host,
    gateway_port,
    pyinfra,
    write_inventory,
)

pytestmark = pytest.mark.fleet

FIRST_KEY = "sk-security-first-3f9a0c"
ROTATED_KEY = "sk-security-rotated-b61d27"
PUBLISHED_LINE = f'restrict,command="/usr/bin/rrsync -ro /glmmodel" ssh-ed25519 {PUBLISHED_KEY} glmfleet-peer-transfer'
OPERATOR_LINE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorOwnKeyStaysXXXXXXXXXXXXXXXXXXXXXXXX operator@site"
# Reads, as an unprivileged user, every file that it can while it runs and says which held the
# secret: pyinfra's sudo upload stages files in /tmp; a file made and moded later is readable at first.
WATCHER = r"""
import os, sys, time
secret, until = sys.argv[1].encode(), time.monotonic() + float(sys.argv[2])
found = set()
while time.monotonic() < until:
    for top in ("/tmp", "/var/tmp", "/etc/glmfleet", "/etc/nginx", "/dev/shm"):
        for root, dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                try:
                    with open(path, "rb") as handle:
                        if secret in handle.read():
                            found.add(path)
                except OSError:
                    pass
print("\n".join(sorted(found)))
"""


@pytest.fixture(scope="module")
def inventory(fleet, package_index, test_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("security") / "inventory.py"
    data = {**TEST_DOUBLE, **test_model, "pip_index_url": package_index, "_sudo": True}
    write_inventory(
        path,
        {name: data for name in fleet},
        {"gateway": ([fleet[0]], {"gateway_port": gateway_port()})},
        hosts=[(name, host) for name, host in localfleet.inventory_hosts() if name in fleet],
    )
    return path


@pytest.fixture(scope="module")
def first_run(fleet, inventory):
    host = fleet_host(fleet[0])
    host.check_output(
        f"mkdir -p /root/.ssh && printf '%s\\n%s\\n' {OPERATOR_LINE!r} {PUBLISHED_LINE!r} >> {ROOT_AUTHORIZED_KEYS}"
    )
    run = deploy(inventory, env={API_KEY_ENV: FIRST_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def watched_deploy(fleet, inventory, key: str, seconds: int = 120):
    """A deploy while an unprivileged user on every host reads whatever it can."""
    watchers = [
        subprocess.Popen(
            ["ssh", *ssh_argv(name), f"runuser -u nobody -- python3 -c {quote(WATCHER)} {quote(key)} {seconds}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in fleet
    ]
    time.sleep(1)  # the watchers are reading before the deploy writes anything
    run = deploy(inventory, env={API_KEY_ENV: key})
    for watcher in watchers:
        watcher.terminate()
    return run, [watcher.communicate()[0] for watcher in watchers]


def ssh_argv(name: str) -> list[str]:
    return localfleet.ssh_argv(next(host for host in localfleet.load_hosts() if host["name"] == name))[1:]


def test_the_published_transfer_key_is_removed_and_the_operators_own_lines_stay(first_run, fleet):
    keys = fleet_host(fleet[0]).file(ROOT_AUTHORIZED_KEYS).content_string
    assert PUBLISHED_KEY not in keys and OPERATOR_LINE in keys
    for name in fleet:
        assert not fleet_host(name).file(PEER_KEY).exists


def test_a_rotated_key_is_never_readable_by_another_user_even_staged(first_run, fleet, inventory):
    run, found = watched_deploy(fleet, inventory, ROTATED_KEY, seconds=60)
    assert run.returncode == 0, run.stderr[-3000:]
    assert found == [""] * len(fleet), found
    gateway = fleet_host(fleet[0])
    keys = gateway.file(GATEWAY_KEYS)
    assert (keys.mode, keys.user) == (0o600, "root") and ROTATED_KEY in keys.content_string
    assert FIRST_KEY not in keys.content_string  # the old key no longer opens the gateway
    assert ROTATED_KEY not in run.stdout + run.stderr


def test_a_link_the_service_user_plants_is_never_followed_by_root(first_run, fleet, inventory):
    host = fleet_host(fleet[1])
    host.check_output("runuser -u vllm -- sh -c 'rm -rf /var/lib/vllm/cache && ln -s /root /var/lib/vllm/cache'")
    run = deploy(inventory, env={API_KEY_ENV: ROTATED_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    root = host.file("/root")
    assert (root.user, root.mode) == ("root", 0o700)
    cache = host.file("/var/lib/vllm/cache")
    assert cache.is_directory and not cache.is_symlink and cache.user == "vllm"


def test_a_model_dir_over_an_existing_tree_changes_no_mode(first_run, fleet, inventory, test_model):
    """model_source 'path' over a tree the site keeps with its own modes: verified, never chmod-ed."""
    host = fleet_host(fleet[1])
    store = host.check_output("ls -d /var/lib/glmfleet/models/*/*")
    host.check_output(
        f"rm -rf /srv/site && mkdir -p /srv/site && cp -a {store} /srv/site/model && "
        "chmod 750 /srv/site/model/.glmfleet && chmod 640 /srv/site/model/config.json"
    )
    before = host.check_output("find /srv/site -printf '%m %p\\n' | sort")
    run = pyinfra(
        inventory,
        "--limit",
        fleet[1],
        "deploy.py",
        data={"model_source": "path", "model_dir": "/srv/site/model"},
        env={API_KEY_ENV: ROTATED_KEY},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert host.check_output("find /srv/site -printf '%m %p\\n' | sort") == before


def test_the_unit_is_sandboxed(first_run, fleet):
    output = fleet_host(fleet[0]).check_output("systemd-analyze security --no-pager vllm.service")
    exposure = float(re.search(r"Overall exposure level for vllm\.service: ([0-9.]+)", output)[1])
    assert exposure <= 3.5, output  # 8.3 EXPOSED before the sandbox; 3.3 with it (systemd 252)
    # The GPUs stay reachable: no directive closed the device policy (ProtectClock= would).
    policy = fleet_host(fleet[0]).check_output("systemctl show -p DevicePolicy -p DeviceAllow vllm.service")
    assert "DevicePolicy=auto" in policy and not re.search(r"DeviceAllow=\S", policy), policy
