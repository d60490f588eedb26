"""The real deploy on the local fleet: install, serve, verify, converge, change one host, fail well.

The tests run in file order on one converged fleet: each step builds on the one before.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devfleet import localfleet
from glmfleet.facts.network import ListeningPorts
from roles.vllm_service import UNIT_PATH
from tests.support.fleettools import (
    API_KEY_ENV,
    ROOT,
    TEST_DOUBLE,
    TEST_MODEL_REVISION,
    data_args,
    deploy,
    fleet_host,
    make_bare,
    pyinfra,
    wait_for,
    write_inventory,
)

pytestmark = pytest.mark.fleet

# Every character a file glmfleet writes could misread: the env file, nginx's map, the verify script's reader.
API_KEY = "sk-e2e-\"q'\\$HOME`id`%n;#7d1c9a"
# Values the unit and env file must carry to vLLM exactly, as systemd reads them.
PROBE = "a b \"c\" \\d $HOME ${IFS} `id` %n 'e';f"


@pytest.fixture(scope="module")
def settings(package_index, test_model):
    return {
        **TEST_DOUBLE,
        **test_model,
        "pip_index_url": package_index,
        "vllm_env": {"GLMFLEET_PROBE": PROBE},
        "vllm_extra_args": [f"--glmfleet-probe={PROBE}"],
    }


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
    """The host's vLLM's count of requests it answered, from /metrics (one series per finish reason)."""
    metrics = get(f"http://127.0.0.1:{vllm_port(name)}/metrics")[1].decode()
    return int(sum(float(v) for v in re.findall(r"^vllm:request_success_total\{.*\} (\S+)$", metrics, re.MULTILINE)))


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
        assert (
            f"ExecStart=/opt/glmfleet/vllm/current/bin/vllm serve /var/lib/glmfleet/models/zai-org--GLM-4-9B-0414/{TEST_MODEL_REVISION}"
            in unit
        )
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
    assert fact.process(host.check_output(fact.command(port=vllm_port(name))).splitlines()) == [
        (vllm_port(name), "vllm.service")
    ]


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


def test_systemd_hands_vllm_every_value_exactly(first_run, fleet):
    """The unit's ExecStart and EnvironmentFile, read by real systemd: the running process's
    argv and environment hold the values byte for byte."""
    for name in fleet:
        host = fleet_host(name)
        pid = main_pid(name)
        argv = host.check_output(f"tr '\\0' '\\n' < /proc/{pid}/cmdline").splitlines()
        environ = dict(
            line.split("=", 1) for line in host.check_output(f"tr '\\0' '\\n' < /proc/{pid}/environ").splitlines()
        )
        assert argv[-1] == f"--glmfleet-probe={PROBE}"
        assert environ["GLMFLEET_PROBE"] == PROBE and environ["VLLM_API_KEY"] == API_KEY


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
        assert facts == ["glmfleet.facts.engine.Together"], facts
        # The real request was made all the same: by the controller, through the SSH connection.
        assert completions_served(name) == served[name] + 1
    assert "--deadline 0" not in run.stderr


def test_a_wedged_vllm_fails_a_run_that_changes_nothing_else(first_run, fleet, settings, tmp_path):
    """Healthy, listening, its unit running, and every generation failing: only the real request
    made while planning tells it from a vLLM that serves."""
    wedged = fleet[0]
    host = fleet_host(wedged)
    # The manager's own environment: nothing of the unit's changes, as for an engine wedged by itself.
    host.check_output("systemctl set-environment VLLM_TEST_DOUBLE_FAIL=error; systemctl restart vllm.service")
    try:
        wait_for(lambda: healthy(wedged), what="the wedged test double to answer /health", timeout_s=60)
        inventory = write_inventory(tmp_path / "inventory.py", {wedged: {"vllm_ready_timeout": 3}})
        data = {key: value for key, value in settings.items() if key != "vllm_ready_timeout"}
        run = deploy(inventory, data=data, env={API_KEY_ENV: API_KEY})
        assert run.returncode != 0
        assert (
            f"not serving after 3 s: http://127.0.0.1:{vllm_port(wedged)}/v1/chat/completions answered 500"
            in run.stderr
        )
        # Nothing else was planned: the failed check is the one that planning's request asked for.
        assert run.changed() == {}
        assert [op["name"] for op in run.results["operations"] if wedged in op["error"]] == [
            "verify vLLM serves | verify a real request is served"
        ]
    finally:
        host.check_output("systemctl unset-environment VLLM_TEST_DOUBLE_FAIL; systemctl restart vllm.service")
        healed = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert healed.returncode == 0, healed.stderr[-3000:]


def test_a_host_that_forwards_nothing_is_checked_by_its_own_script(first_run, fleet, settings):
    """Where sshd forwards no connections, the real request runs on the host instead: one more
    command there, the same answer, and nothing on the others."""
    limited = fleet[1]
    host = fleet_host(limited)
    host.check_output(
        "echo 'AllowTcpForwarding no' > /etc/ssh/sshd_config.d/no-forwarding.conf; systemctl reload ssh.service"
    )
    try:
        served = completions_served(limited)
        run = pyinfra("inventory/local.py", "--debug", "deploy.py", data=settings, env={API_KEY_ENV: API_KEY})
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.changed() == {}
        assert {name: commands_run(run, name) for name in fleet} == {
            name: 2 if name == limited else 1 for name in fleet
        }
        assert re.search(rf"\[{re.escape(limited)}\] Loaded fact glmfleet\.facts\.vllm\.VllmServes", run.stderr)
        assert completions_served(limited) == served + 1
        assert "open FAILED" not in run.stderr
    finally:
        host.check_output("rm -f /etc/ssh/sshd_config.d/no-forwarding.conf; systemctl reload ssh.service")


def test_drift_on_a_converged_host_is_put_right(first_run, fleet, settings):
    drifted, untouched = fleet[0], fleet[1]
    host = fleet_host(drifted)
    unit = host.file(UNIT_PATH).content_string
    pid = main_pid(drifted)
    host.check_output(
        f"chmod 755 /etc/glmfleet; echo '# edited by hand' >> {UNIT_PATH}; "
        "chmod 700 /opt/glmfleet/bin/verify-vllm; chown nobody /var/lib/vllm/cache"
    )
    run = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(run.changed()) == {drifted}
    assert {
        "vLLM service | unit vllm.service",
        "vLLM service | (re)start vllm.service",
        "verify vLLM serves | verify script",
        "vLLM venv | vllm's directories in /var/lib/vllm: cache",
    } <= run.changed()[drifted]
    assert host.file("/etc/glmfleet").mode == 0o700
    assert host.file(UNIT_PATH).content_string == unit
    assert host.file("/opt/glmfleet/bin/verify-vllm").mode == 0o755
    assert host.file("/var/lib/vllm/cache").user == "vllm"
    assert main_pid(drifted) != pid  # the unit it ran was not the one glmfleet wrote
    assert fleet_host(untouched).file("/etc/glmfleet").mode == 0o700
    assert deploy(data=settings, env={API_KEY_ENV: API_KEY}).changed() == {}


def test_a_drop_in_someone_else_wrote_is_named_and_removed(first_run, fleet, settings):
    """A hand-made override (vLLM as root) is found, named, removed, and the service restarted
    as the unit says; a unit edited on disk but not loaded is reloaded and restarted too."""
    host = fleet_host(fleet[0])
    host.check_output(
        "mkdir -p /etc/systemd/system/vllm.service.d && printf '[Service]\\nUser=root\\n' > "
        "/etc/systemd/system/vllm.service.d/override.conf && systemctl daemon-reload && systemctl restart vllm.service"
    )
    assert host.check_output(f"ps -o user= -p {main_pid(fleet[0])}") == "root"
    run = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        "vLLM service | remove drop-ins glmfleet did not write: /etc/systemd/system/vllm.service.d/override.conf"
        in run.changed()[fleet[0]]
    )
    assert host.check_output(f"ps -o user= -p {main_pid(fleet[0])}") == "vllm"
    assert not host.file("/etc/systemd/system/vllm.service.d/override.conf").exists
    # The environment rewritten after vLLM started (as by a restart that then failed): vLLM runs
    # something other than what is on disk, though the file's content is right again.
    pid = main_pid(fleet[1])
    fleet_host(fleet[1]).check_output("touch /etc/glmfleet/vllm.env")
    run = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.changed()[fleet[1]] == {
        "vLLM service | (re)start vllm.service",
        "verify vLLM serves | verify a real request is served",
    }
    assert main_pid(fleet[1]) != pid
    assert deploy(data=settings, env={API_KEY_ENV: API_KEY}).changed() == {}


def test_a_damaged_venv_in_use_is_rebuilt_and_served_again(first_run, fleet, settings):
    """A complete venv whose entry point was deleted: every run failed at verify before; now the
    fact finds it incomplete, and it is rebuilt and the service restarted on it."""
    host = fleet_host(fleet[0])
    venv = host.file("/opt/glmfleet/vllm/current").linked_to
    host.check_output(f"rm {venv}/bin/vllm")
    run = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    changed = run.changed()[fleet[0]]
    assert any(name.startswith("vLLM venv | build venv") for name in changed), changed
    assert "vLLM service | (re)start vllm.service" in changed
    assert host.file(f"{venv}/bin/vllm").exists and healthy(fleet[0])
    assert deploy(data=settings, env={API_KEY_ENV: API_KEY}).changed() == {}


def test_moving_the_state_directory_of_a_serving_host_stops_the_service_first(first_run, fleet, settings):
    """usermod refuses to move the home of a user whose processes run: the service stops first,
    and restarts on the new directory; moving it back works the same."""
    for state_dir in ("/var/lib/vllm-moved", "/var/lib/vllm"):
        moved = {**settings, "vllm_state_dir": state_dir}
        run = deploy(data=moved, env={API_KEY_ENV: API_KEY})
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
        for name in fleet:
            assert any(
                op.startswith("vLLM venv | stop vllm.service: vllm_state_dir moves from") for op in run.changed()[name]
            )
            host = fleet_host(name)
            assert host.user("vllm").home == state_dir and healthy(name)
            assert host.check_output(f"readlink /proc/{main_pid(name)}/cwd") == state_dir


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
        "vLLM service | unit vllm.service staged",
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
    # --data wins over host data: leave the ready timeout and the environment to the host.
    data = {key: value for key, value in settings.items() if key not in ("vllm_ready_timeout", "vllm_env")}
    run = deploy(inventory, data=data, env={API_KEY_ENV: API_KEY})
    assert run.returncode != 0
    assert "not serving after 20 s" in run.stderr
    assert "--- last lines of the vllm.service journal:" in run.stderr
    # Put the host back: the plain deploy converges it again.
    healed = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert get(f"http://127.0.0.1:{vllm_port(broken)}/health")[0] == 200


def test_a_host_lost_during_the_check_is_named_with_the_cause(first_run, fleet, settings, tmp_path):
    """Powered off while the verify step waits for it: the run names the host, the step and why,
    and the other host is unaffected."""
    lost = fleet[1]
    slow = {"vllm_env": {"GLMFLEET_PROBE": PROBE, "VLLM_TEST_DOUBLE_STARTUP_DELAY": "60"}}
    inventory = write_inventory(tmp_path / "inventory.py", {lost: slow})
    data = {key: value for key, value in settings.items() if key != "vllm_env"}
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "pyinfra"),
            "-y",
            str(inventory),
            "deploy.py",
            *data_args({**data, "vllm_ready_timeout": 120}),
        ],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, API_KEY_ENV: API_KEY},
    )
    try:
        wait_for(
            lambda: "verify-vllm --base-url" in fleet_host(lost).check_output("ps -eo args"),
            what="the verify step to wait on the slow host",
            timeout_s=120,
        )
        localfleet.stop_host(lost, force=True)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
        localfleet.start_host(lost)
    assert process.returncode != 0
    assert (
        f"--> {lost}: connection lost during verify vLLM serves | verify a real request is served: the host is down"
        in stderr
    )
    healed = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert healed.returncode == 0, healed.stderr[-3000:]
