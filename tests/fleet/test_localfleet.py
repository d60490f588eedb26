"""The local test fleet itself, on real hosts: needs root and `make fleet-deps`.

They use the default fleet (GLMFLEET_FLEET_DIR): they reboot, power off and take down its
hosts, then boot again those that were up before, so that later tests find them up.
"""

import subprocess
import time
from pathlib import Path

import pytest

from devfleet import localfleet

pytestmark = pytest.mark.fleet


def ssh(host: dict, command: str) -> subprocess.CompletedProcess:
    return subprocess.run([*localfleet.ssh_argv(host), command], capture_output=True, text=True, timeout=60)


def boot_id(host: dict) -> str:
    answer = ssh(host, "cat /proc/sys/kernel/random/boot_id")
    assert answer.returncode == 0, answer.stderr
    return answer.stdout.strip()


def wait_for_new_boot(host: dict, old_boot_id: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while ssh(host, "cat /proc/sys/kernel/random/boot_id").stdout.strip() in ("", old_boot_id):
        assert time.monotonic() < deadline, f"{host['name']} did not boot again"
        time.sleep(0.2)
    localfleet.wait_ready(host)


@pytest.fixture(scope="module")
def fleet_hosts():
    up_before = [host["name"] for host in localfleet.load_hosts()]
    yield localfleet.up(2)[:2]
    for name in up_before:
        localfleet.start_host(name)


def test_hosts_are_systemd_hosts_reached_over_ssh(fleet_hosts):
    assert [host["name"] for host in fleet_hosts] == [localfleet.host_name(1), localfleet.host_name(2)]
    for host in fleet_hosts:
        assert ssh(host, "ps -o comm= -p 1").stdout.strip() == "systemd"
        # Booted to the end; "degraded" once other tests installed units that need a GPU.
        assert ssh(host, "systemctl is-system-running").stdout.strip() in ("running", "degraded")
        assert ssh(host, "hostname").stdout.strip() == host["name"]


def test_hosts_have_what_the_product_needs(fleet_hosts):
    checks = [
        "python3 -c 'import ensurepip, venv'",  # the product bootstraps uv with a venv and pip
        "sudo -n true",
        "command -v curl ip",
        "grep -q 'bookworm main contrib non-free non-free-firmware' /etc/apt/sources.list",
        'test "$(systemctl is-enabled apt-daily.timer)" = masked',
    ]
    for check in checks:
        answer = ssh(fleet_hosts[0], check)
        assert answer.returncode == 0, f"{check}: {answer.stderr}"


def test_each_host_is_charged_the_cpu_it_uses(fleet_hosts):
    """The deploy benchmark splits a run's CPU between the controller and the hosts this way."""
    busy, idle = (host["name"] for host in fleet_hosts)
    before = {name: localfleet.host_cpu_seconds(name) for name in (busy, idle)}
    if None in before.values():
        pytest.skip("this machine gives the hosts no cgroup v2 of their own")
    assert ssh(fleet_hosts[0], "timeout 1 sh -c 'while :; do :; done'; true").returncode == 0
    used = {name: localfleet.host_cpu_seconds(name) - before[name] for name in (busy, idle)}
    assert used[busy] > 0.5 and used[idle] < 0.3, used


def test_rebooted_host_comes_back(fleet_hosts):
    host = fleet_hosts[1]
    before = boot_id(host)
    rebooted_at = time.monotonic()
    ssh(host, "systemctl reboot")
    wait_for_new_boot(host, before)
    assert host in localfleet.load_hosts()
    # The host's clock restarted with it (within a second): pyinfra's server.reboot needs that.
    uptime_s = float(ssh(host, "cut -d' ' -f1 /proc/uptime").stdout)
    assert uptime_s < time.monotonic() - rebooted_at + 1


def test_stopped_host_is_gone_until_started(fleet_hosts):
    host = fleet_hosts[1]
    before = boot_id(host)
    localfleet.stop_host(host["name"], force=True)
    assert host not in localfleet.load_hosts()
    assert ssh(host, "true").returncode == 255  # ssh's own failure: nothing listens
    localfleet.start_host(host["name"])
    assert boot_id(host) != before


def test_up_again_changes_nothing(fleet_hosts):
    boot_ids = {host["name"]: boot_id(host) for host in fleet_hosts}
    assert localfleet.up(2)[:2] == fleet_hosts
    assert {host["name"]: boot_id(host) for host in fleet_hosts} == boot_ids


def test_down_leaves_no_container_and_no_mount(fleet_hosts):
    localfleet.down()
    assert localfleet.load_hosts() == []
    fleet_dir = str(localfleet.fleet_dir())
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        assert f"--directory={fleet_dir}/" not in " ".join(argv), argv  # a systemd-nspawn
    mount_points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    assert not [point for point in mount_points if point.startswith(f"{fleet_dir}/")]


def test_a_host_that_stops_while_booting_is_reported_with_its_console(tmp_path):
    console = tmp_path / "console.log"
    console.write_text("Spawning container fleet-09 on /x.\nDirectory /x is currently busy.\n")
    never_started = {"name": "fleet-09", "console_log": str(console)}  # no supervisor pid file
    with pytest.raises(localfleet.BootStopped) as stopped:
        localfleet.wait_ready(never_started, timeout_s=5)
    assert str(stopped.value).endswith(
        f"console log {console} ends:\nSpawning container fleet-09 on /x.\nDirectory /x is currently busy."
    )
