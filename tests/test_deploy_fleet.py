"""The real deploy on the local fleet: install, serve, verify, converge, change one host, fail well.

The tests run in file order on one converged fleet: each step builds on the one before.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from glmfleet import localfleet
from glmfleet.facts import ListeningPorts
from roles.vllm_service import UNIT_PATH
from tests.fleettools import (API_KEY_ENV, TEST_DOUBLE, TEST_MODEL_REVISION, deploy, fleet_host, make_bare, pyinfra,
                              wait_for, write_inventory)

pytestmark = pytest.mark.fleet

API_KEY = "sk-glmfleet-e2e-7d1c9a"


@pytest.fixture(scope="module")
def settings(package_index, test_model):
    return {**TEST_DOUBLE, **test_model, "pip_index_url": package_index}


@pytest.fixture(scope="module")
def first_run(fleet, settings):
    for name in fleet:
        make_bare(name)
    run = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def vllm_port(name: str) -> int:
    return dict(localfleet.inventory_hosts())[name]["vllm_port"]


def get(url: str, api_key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def main_pid(name: str) -> str:
    return fleet_host(name).check_output("systemctl show --property MainPID --value vllm.service")


def completions_served(name: str) -> int:
    """The host's vLLM's count of requests it answered, from /metrics."""
    metrics = get(f"http://127.0.0.1:{vllm_port(name)}/metrics", API_KEY)[1].decode()
    return int(float(re.search(r"^vllm:request_success_total\{.*\} (\S+)$", metrics, re.MULTILINE)[1]))


def healthy(name: str) -> bool:
    try:
        return get(f"http://127.0.0.1:{vllm_port(name)}/health")[0] == 200
    except OSError:  # nothing listens yet
        return False


def commands_run(run, name: str) -> int:
    return len(re.findall(rf"Running command on {re.escape(name)}:", run.stderr))


def test_first_run_verifies_every_host_with_a_real_request(first_run, fleet):
    # The controller's request through each bare host's SSH connection found nothing listening:
    # an answer, not an error paramiko gets to print.
    assert "open FAILED" not in first_run.stderr
    changed = first_run.changed()
    for name in fleet:
        assert any(op.startswith("verify") for op in changed[name]), changed[name]
        status, body = get(f"http://127.0.0.1:{vllm_port(name)}/v1/models", API_KEY)
        assert status == 200 and json.loads(body)["data"][0]["id"] == "zai-org/GLM-4-9B-0414"


def test_service_runs_as_the_vllm_system_user_from_the_venv(first_run, fleet):
    for name in fleet:
        host = fleet_host(name)
        assert host.service("vllm").is_running and host.service("vllm").is_enabled
        user = host.user("vllm")
        assert user.uid < 1000 and user.shell == "/usr/sbin/nologin"
        assert host.check_output("ps -o user= -p $(systemctl show -p MainPID --value vllm.service)") == "vllm"
        unit = host.file("/etc/systemd/system/vllm.service").content_string
        assert f"ExecStart=/opt/glmfleet/vllm/current/bin/vllm serve /var/lib/vllm/models/zai-org--GLM-4-9B-0414/{TEST_MODEL_REVISION}" in unit
        assert "EnvironmentFile=/etc/glmfleet/vllm.env" in unit
        target = host.file("/opt/glmfleet/vllm/current").linked_to
        assert host.file(f"{target}/.glmfleet-complete").exists
        # Compiled at install: the vllm user cannot write bytecode into the venv at start.
        assert host.check_output(f"find {target}/lib -path '*/vllm_test_double/__pycache__/*.pyc' | head -1")


def test_listening_ports_names_the_service_holding_each_port(first_run, fleet):
    """What preflight reads to tell its own vLLM from a port conflict, on a real systemd host.
    The fleet shares one network: other hosts' listeners show, their processes do not."""
    fact = ListeningPorts()
    name, *others = fleet
    host = fleet_host(name)
    listeners = fact.process(host.check_output(fact.command()).splitlines())
    ssh_port = dict(localfleet.inventory_hosts())[name]["ssh_port"]
    assert {(ssh_port, "ssh.service"), (vllm_port(name), "vllm.service")} <= set(listeners)
    assert {(vllm_port(other), None) for other in others} <= set(listeners)
    assert fact.process(host.check_output(fact.command(port=vllm_port(name))).splitlines()) == [(vllm_port(name), "vllm.service")]


def test_secrets_are_root_only_and_nowhere_else(first_run, fleet):
    assert API_KEY not in first_run.stdout + first_run.stderr
    for name in fleet:
        host = fleet_host(name)
        env_file = host.file("/etc/glmfleet/vllm.env")
        assert (env_file.mode, env_file.user, env_file.group) == (0o600, "root", "root")
        assert host.file("/etc/glmfleet").mode == 0o700
        assert host.run("runuser -u vllm -- cat /etc/glmfleet/vllm.env").rc != 0
        assert API_KEY not in host.check_output("ps -eo args")
        assert API_KEY not in host.check_output("journalctl --no-pager -u vllm.service")
        assert API_KEY not in host.file("/etc/systemd/system/vllm.service").content_string
        # The key is in force: /v1 refuses a client without it.
        assert get(f"http://127.0.0.1:{vllm_port(name)}/v1/models")[0] == 401


def test_second_run_changes_nothing(first_run, fleet, settings):
    pids = {name: main_pid(name) for name in fleet}
    run = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.changed() == {}
    assert {name: main_pid(name) for name in fleet} == pids


def test_a_converged_host_is_checked_in_one_command(first_run, fleet, settings):
    """Every check of a converged host is one of glmfleet's own facts, all asked together in one
    command: none of pyinfra's per-operation file, user or service facts (a command each). With
    the answers in, it plans no operation at all (not even a restart or check that would skip)."""
    served = {name: completions_served(name) for name in fleet}
    run = pyinfra("inventory/local.py", "--debug", "deploy.py", data=settings, env={API_KEY_ENV: API_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.changed() == {}
    assert "Adding operation" not in run.stderr
    for name in fleet:
        facts = re.findall(rf"\[{re.escape(name)}\] Loaded fact (\S+)", run.stderr)
        assert commands_run(run, name) == 1
        assert facts == ["glmfleet.facts.Together"], facts
        # The real request was made all the same: by the controller, through the SSH connection.
        assert completions_served(name) == served[name] + 1
    assert "--deadline 0" not in run.stderr


def test_a_wedged_vllm_fails_a_run_that_changes_nothing_else(first_run, fleet, settings, tmp_path):
    """Healthy, listening, its unit running, and every generation failing: only the real request
    made while planning tells it from a vLLM that serves."""
    wedged = fleet[0]
    host = fleet_host(wedged)
    drop_in_dir = "/etc/systemd/system/vllm.service.d"
    host.check_output(f"mkdir -p {drop_in_dir}; printf '[Service]\\nEnvironment=VLLM_TEST_DOUBLE_FAIL=error\\n' > {drop_in_dir}/wedged.conf; "
                      "systemctl daemon-reload; systemctl restart vllm.service")
    try:
        wait_for(lambda: healthy(wedged), what="the wedged test double to answer /health", timeout_s=60)
        inventory = write_inventory(tmp_path / "inventory.py", {wedged: {"vllm_ready_timeout": 3}})
        data = {key: value for key, value in settings.items() if key != "vllm_ready_timeout"}
        run = deploy(inventory, data=data, env={API_KEY_ENV: API_KEY})
        assert run.returncode != 0
        assert f"not serving after 3 s: http://127.0.0.1:{vllm_port(wedged)}/v1/chat/completions answered 500" in run.stderr
        # Nothing else was planned: the failed check is the one that planning's request asked for.
        assert run.changed() == {}
        assert [op["name"] for op in run.results["operations"] if wedged in op["error"]] == [
            "verify vLLM serves | verify a real request is served"]
    finally:
        host.check_output(f"rm -rf {drop_in_dir}; systemctl daemon-reload; systemctl restart vllm.service")
        healed = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert healed.returncode == 0, healed.stderr[-3000:]


def test_a_host_that_forwards_nothing_is_checked_by_its_own_script(first_run, fleet, settings):
    """Where sshd forwards no connections, the real request runs on the host instead: one more
    command there, the same answer, and nothing on the others."""
    limited = fleet[1]
    host = fleet_host(limited)
    host.check_output("echo 'AllowTcpForwarding no' > /etc/ssh/sshd_config.d/no-forwarding.conf; systemctl reload ssh.service")
    try:
        served = completions_served(limited)
        run = pyinfra("inventory/local.py", "--debug", "deploy.py", data=settings, env={API_KEY_ENV: API_KEY})
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.changed() == {}
        assert {name: commands_run(run, name) for name in fleet} == {name: 2 if name == limited else 1 for name in fleet}
        assert re.search(rf"\[{re.escape(limited)}\] Loaded fact glmfleet\.facts\.VllmServes", run.stderr)
        assert completions_served(limited) == served + 1
        assert "open FAILED" not in run.stderr
    finally:
        host.check_output("rm -f /etc/ssh/sshd_config.d/no-forwarding.conf; systemctl reload ssh.service")


def test_drift_on_a_converged_host_is_put_right(first_run, fleet, settings):
    drifted, untouched = fleet[0], fleet[1]
    host = fleet_host(drifted)
    unit = host.file(UNIT_PATH).content_string
    pid = main_pid(drifted)
    host.check_output(f"chmod 755 /etc/glmfleet; echo '# edited by hand' >> {UNIT_PATH}; "
                      "chmod 700 /opt/glmfleet/bin/verify-vllm; chown nobody /var/lib/vllm/cache")
    run = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(run.changed()) == {drifted}
    assert {"vLLM service | unit vllm.service", "vLLM service | (re)start vllm.service", "verify vLLM serves | verify script",
            "vLLM venv | vllm state dir /var/lib/vllm/cache"} <= run.changed()[drifted]
    assert host.file("/etc/glmfleet").mode == 0o700
    assert host.file(UNIT_PATH).content_string == unit
    assert host.file("/opt/glmfleet/bin/verify-vllm").mode == 0o755
    assert host.file("/var/lib/vllm/cache").user == "vllm"
    assert main_pid(drifted) != pid  # the unit it ran was not the one glmfleet wrote
    assert fleet_host(untouched).file("/etc/glmfleet").mode == 0o700
    assert deploy(data=settings, env={API_KEY_ENV: API_KEY}).changed() == {}


def test_bad_value_stops_the_run_before_any_host_changes(first_run, fleet, settings):
    units = {name: fleet_host(name).file("/etc/systemd/system/vllm.service").sha256sum for name in fleet}
    run = deploy(data={**settings, "vllm_gpu_memory_utilization": 1.5}, env={API_KEY_ENV: API_KEY})
    assert run.returncode != 0
    for name in fleet:
        assert f"{name}: vllm_gpu_memory_utilization = 1.5 is invalid; accepted: a number > 0 and <= 1" in run.stderr
        assert fleet_host(name).file("/etc/systemd/system/vllm.service").sha256sum == units[name]
    assert "Beginning operation run" not in run.stderr


def test_one_setting_on_one_host_restarts_that_host_alone(first_run, fleet, settings, tmp_path):
    changed_host, other_host = fleet[0], fleet[1]
    pids = {name: main_pid(name) for name in fleet}
    inventory = write_inventory(tmp_path / "inventory.py", {changed_host: {"vllm_max_model_len": 4096}})
    run = deploy(inventory, data=settings, env={API_KEY_ENV: API_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(run.changed()) == {changed_host}
    assert run.changed()[changed_host] == {
        "vLLM service | unit vllm.service",
        "vLLM service | systemd daemon-reload",
        "vLLM service | (re)start vllm.service",
        "verify vLLM serves | verify a real request is served",
    }
    assert main_pid(changed_host) != pids[changed_host]
    assert main_pid(other_host) == pids[other_host]
    assert "--max-model-len 4096" in fleet_host(changed_host).file("/etc/systemd/system/vllm.service").content_string
    status, body = get(f"http://127.0.0.1:{vllm_port(changed_host)}/v1/models", API_KEY)
    assert json.loads(body)["data"][0]["max_model_len"] == 4096


def test_a_host_that_cannot_serve_fails_with_its_journal(first_run, fleet, settings, tmp_path):
    broken = fleet[1]
    crash = {"vllm_env": {"VLLM_TEST_DOUBLE_FAIL": "exit"}, "vllm_ready_timeout": 20}
    inventory = write_inventory(tmp_path / "inventory.py", {broken: crash})
    # --data wins over host data: leave the ready timeout to the host.
    data = {key: value for key, value in settings.items() if key != "vllm_ready_timeout"}
    run = deploy(inventory, data=data, env={API_KEY_ENV: API_KEY})
    assert run.returncode != 0
    assert "not serving after 20 s" in run.stderr
    assert "--- last lines of the vllm.service journal:" in run.stderr
    # Put the host back: the plain deploy converges it again.
    healed = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert get(f"http://127.0.0.1:{vllm_port(broken)}/health")[0] == 200
