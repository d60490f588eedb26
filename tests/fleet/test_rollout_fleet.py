"""glmfleet rollout and status on 4 real fleet hosts behind the gateway (nginx on the first).

The tests run in file order on one fleet: each rollout starts from where the one before left
the hosts. The hosts serve through the vLLM test double, with a latency per request so that
requests are in flight whenever a host is drained.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devfleet import localfleet
from roles.gateway import CONFIG_PATH, KEYS_PATH
from tests.support.fleettools import (
    API_KEY_ENV,
    ROOT,
    TEST_DOUBLE,
    data_args,
    deploy,
    fleet_host,
    gateway_port,
    glmfleet,
    write_inventory,
)
from tests.support.loadgen import Load

pytestmark = pytest.mark.fleet

HOSTS = 4
# nginx's map and the env file must both carry every printable character: quotes, backslash, $, ;
API_KEY = "sk-rollout-\"q'\\$x{y};#2b7e41"
ENV = {API_KEY_ENV: API_KEY}
MODEL = "zai-org/GLM-4-9B-0414"
LATENCY = {"VLLM_TEST_DOUBLE_LATENCY": "1"}
FAIL_SWITCH = {"vllm_env": {**LATENCY, "VLLM_TEST_DOUBLE_FAIL": "exit"}, "vllm_ready_timeout": 15}


@pytest.fixture(scope="module")
def hosts(fleet):
    localfleet.up(HOSTS)
    return [host["name"] for host in localfleet.load_hosts()][:HOSTS]


@pytest.fixture(scope="module")
def data(package_index, test_model):
    """--data for every run; the ready timeout stays host data (--data would override it)."""
    double = {key: value for key, value in TEST_DOUBLE.items() if key != "vllm_ready_timeout"}
    return double | test_model | {"pip_index_url": package_index}


@pytest.fixture
def inventory(tmp_path, hosts):
    """An inventory where every host has `setting` and the test double's latency, some hosts
    have more, and the first host is the gateway."""

    def write(setting: dict, static: list[tuple[str, dict]] | None = None, **extra: dict) -> str:
        host_data = {
            name: {"vllm_env": LATENCY, "vllm_ready_timeout": 60, **setting, **extra.get(name, {})} for name in hosts
        }
        groups = {"gateway": ([hosts[0]], {"gateway_port": gateway_port()})}
        return str(write_inventory(tmp_path / "inventory.py", host_data, groups, static))

    return write


@pytest.fixture(scope="module")
def deployed(hosts, data, tmp_path_factory):
    """The plain deploy first: every host serves, the gateway runs."""
    path = tmp_path_factory.mktemp("deployed") / "inventory.py"
    host_data = {name: {"vllm_env": LATENCY, "vllm_ready_timeout": 60} for name in hosts}
    write_inventory(path, host_data, {"gateway": ([hosts[0]], {"gateway_port": gateway_port()})})
    run = deploy(path, data=data, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    return path


def gateway_url() -> str:
    return f"http://127.0.0.1:{gateway_port()}"


def vllm_port(name: str) -> int:
    return dict(localfleet.inventory_hosts())[name]["vllm_port"]


def served_max_model_len(name: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{vllm_port(name)}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["data"][0]["max_model_len"]


def main_pid(name: str) -> str:
    return fleet_host(name).check_output("systemctl show --property MainPID --value vllm.service")


def rows(stdout: str) -> dict[str, list[str]]:
    """The rollout's final table: host -> its cells (before, after, result, ready, why)."""
    table = {}
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and re.fullmatch(r"fleet\d*-\d\d", cells[0]):
            table[cells[0]] = cells[1:]
    return table


def result(stdout: str, name: str) -> str:
    return rows(stdout)[name][2]


def gateway_config(hosts) -> str:
    return fleet_host(hosts[0]).file(CONFIG_PATH).content_string


def in_pool(hosts, name: str) -> bool:
    line = next(
        line
        for line in gateway_config(hosts).splitlines()
        if line.rstrip().endswith(f"# {name}") or f"# {name}:" in line
    )
    return " down;" not in line


def test_deploy_with_the_gateway_converges(deployed, data):
    again = deploy(deployed, data=data, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.changed() == {}


def test_gateway_checks_the_key_and_keeps_it_root_only(deployed, hosts):
    request = urllib.request.Request(f"{gateway_url()}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    request.add_header("Authorization", f"Bearer {API_KEY}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert [model["id"] for model in json.loads(response.read())["data"]] == [MODEL]
    with Load(gateway_url(), MODEL, API_KEY, workers=2, max_seconds=2) as load:
        pass
    assert load.result.ok > 0 and load.result.failed == 0, load.result
    gateway = fleet_host(hosts[0])
    keys = gateway.file(KEYS_PATH)
    assert (keys.mode, keys.user, keys.group) == (0o600, "root", "root")
    assert API_KEY not in gateway.file(CONFIG_PATH).content_string
    assert API_KEY not in gateway.check_output("cat /var/log/nginx/*.log; journalctl --no-pager -u nginx")
    # Every host is an upstream, in the pool.
    assert all(in_pool(hosts, name) for name in hosts)


def test_rollout_of_a_new_setting_drops_no_request(deployed, hosts, data, inventory):
    path = inventory({"vllm_max_model_len": 4096})
    with Load(gateway_url(), MODEL, API_KEY, workers=4, max_seconds=300) as load:
        run = glmfleet("rollout", path, "--batch", "1,1,2", data=data, env=ENV)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "--> batch 3/3: " + ", ".join(hosts[2:]) in run.stdout
    for name in hosts:
        assert result(run.stdout, name) == "updated"
        assert served_max_model_len(name) == 4096
        assert in_pool(hosts, name)
    assert load.result.failed == 0, load.result
    assert load.result.ok >= 40, load.result  # the load ran through the whole rollout


def test_restart_without_drain_loses_requests(deployed, hosts):
    """The check above can fail: restarting a host that still takes requests drops some."""
    with Load(gateway_url(), MODEL, API_KEY, workers=8, max_seconds=60) as load:
        for _ in range(3):
            fleet_host(hosts[1]).check_output("sleep 1; systemctl restart vllm.service")
    assert load.result.failed > 0, load.result


def test_failing_host_stops_the_rollout_and_is_rolled_back(deployed, hosts, data, inventory):
    broken, untouched = hosts[2], hosts[3]
    pid_untouched = main_pid(untouched)
    path = inventory({"vllm_max_model_len": 2048}, **{broken: FAIL_SWITCH})
    with Load(gateway_url(), MODEL, API_KEY, workers=4, max_seconds=300) as load:
        run = glmfleet("rollout", path, "--batch", "1", data=data, env=ENV)
    assert run.returncode != 0
    assert [result(run.stdout, name) for name in hosts] == [
        "updated",
        "updated",
        "FAILED, rolled back",
        "not reached (rollout stopped)",
    ]
    assert "rollout stopped: 1 replica failed, more than --max-fail 0 allows" in run.stdout
    # Why, with the failing host's journal tail.
    assert rows(run.stdout)[broken][4].startswith("not serving after 15 s")
    assert "--- last lines of the vllm.service journal:" in run.stdout
    assert "Engine core initialization failed (VLLM_TEST_DOUBLE_FAIL=exit)" in run.stdout
    # Back on what it ran before, serving, in the pool.
    assert served_max_model_len(broken) == 4096
    assert "VLLM_TEST_DOUBLE_FAIL" not in fleet_host(broken).check_output("cat /etc/glmfleet/vllm.env")
    kept = fleet_host(broken).file("/etc/glmfleet/known-good/vllm.env")  # a copy of a file with secrets
    assert (kept.mode, kept.user, kept.group) == (0o600, "root", "root")
    assert in_pool(hosts, broken)
    assert main_pid(untouched) == pid_untouched and served_max_model_len(untouched) == 4096
    assert load.result.failed == 0, load.result


def test_resume_skips_finished_hosts(deployed, hosts, data, inventory):
    pids = {name: main_pid(name) for name in hosts[:2]}
    run = glmfleet("rollout", inventory({"vllm_max_model_len": 2048}), "--batch", "1", data=data, env=ENV)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "2 at the target, 0 failed to read, 2 to update in 2 batches (1, 1)" in run.stdout
    assert [result(run.stdout, name) for name in hosts] == ["already at target"] * 2 + ["updated"] * 2
    assert {name: main_pid(name) for name in hosts[:2]} == pids
    assert all(served_max_model_len(name) == 2048 for name in hosts)


def rollout_stopping_a_host(path: str, data: dict, stop: str, when: str, *args: str) -> tuple[int, str]:
    """Run a rollout and power `stop` off (like pulling its plug) when a line starts with `when`."""
    command = [str(Path(sys.executable).parent / "glmfleet"), "rollout", path, *args, *data_args(data)]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **ENV}
    )
    watchdog = threading.Timer(600, process.kill)
    watchdog.start()
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith(when):
            localfleet.stop_host(stop, force=True)
    watchdog.cancel()
    return process.wait(), "".join(output)


def test_host_powered_off_mid_rollout_counts_against_max_fail(deployed, hosts, data, inventory):
    lost = hosts[1]
    path = inventory({"vllm_max_model_len": 1024})
    try:
        returncode, stdout = rollout_stopping_a_host(
            path, data, lost, "--> batch 1/4", "--batch", "1", "--max-fail", "25%"
        )
        assert returncode == 1, stdout
        assert [result(stdout, name) for name in hosts] == ["updated", "FAILED: unreachable", "updated", "updated"]
        assert "rollout complete: 1 of 4 replicas failed" in stdout
        assert not in_pool(hosts, lost)
    finally:
        localfleet.start_host(lost)
    # Resumed once it is back: only it is updated, and it rejoins the pool.
    run = glmfleet("rollout", path, "--batch", "1", data=data, env=ENV)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert [result(run.stdout, name) for name in hosts] == [
        "already at target",
        "updated",
        "already at target",
        "already at target",
    ]
    assert in_pool(hosts, lost) and served_max_model_len(lost) == 1024


def test_a_host_down_before_the_rollout_stops_it_before_any_change(deployed, hosts, data, inventory):
    down = hosts[3]
    pids = {name: main_pid(name) for name in hosts[:3]}
    path = inventory({"vllm_max_model_len": 512}, static=localfleet.inventory_hosts()[:HOSTS])
    localfleet.stop_host(down, force=True)
    try:
        run = glmfleet("rollout", path, data=data, env=ENV)
    finally:
        localfleet.start_host(down)
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    assert "rollout stopped: 1 replica failed, more than --max-fail 0 allows" in run.stdout
    assert result(run.stdout, down) == "FAILED: unreachable"
    assert [result(run.stdout, name) for name in hosts[:3]] == ["not reached (rollout stopped)"] * 3
    assert {name: main_pid(name) for name in hosts[:3]} == pids


def test_status_shows_every_host(deployed, hosts, data, inventory):
    run = glmfleet("status", inventory({"vllm_max_model_len": 1024}), data=data, env=ENV)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["host", "unit", "vllm", "model", "gpus", "health", "in flight"]
    model = f"{MODEL}@{data['model_revision'][:12]}"
    for name in hosts:
        cells = re.split(r"\s{2,}", next(line for line in lines if line.startswith(name + " ")))
        # Hosts the GPU stack tests gave the driver packages have an nvidia-smi without a driver.
        smi = fleet_host(name).run("nvidia-smi")
        gpus = "no nvidia-smi" if smi.rc == 127 else (smi.stdout + smi.stderr).strip().split(". ")[0]
        assert cells[1:] == ["active (running)", TEST_DOUBLE["vllm_version"], model, gpus, "ok", "0"]
