"""Where operators' fleets already live, on the local fleet: the deploy through Ansible
inventories (YAML with group_vars/ and host_vars/, INI with a wholly vaulted file), read by
ansible-core, with the API key encrypted by the real `ansible-vault`; then `glmfleet logs` on the
deployed fleet. The tests run in file order on one deploy; after test_deploy_fleet.py, whose
converged fleet makes that deploy short (a new key, a restart).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from devfleet import localfleet
from roles.vllm_service import UNIT_PATH
from tests.support.entry_points import metadata_dir
from tests.support.fleettools import (
    API_KEY_ENV,
    ROOT,
    TEST_DOUBLE,
    deploy,
    fleet_host,
    glmfleet,
    pyinfra,
    wait_for,
    write_inventory,
)

pytestmark = pytest.mark.fleet

ANSIBLE_VAULT = Path(sys.executable).parent / "ansible-vault"
API_KEY = "sk-ansible-vault-\"q'\\$HOME`id`%n;#5e1f"
# The connector as pyproject.toml registers it, whatever the venv was installed from.
CHECKOUT = {"PYTHONPATH": f"{ROOT}{os.pathsep}{metadata_dir()}"}


@pytest.fixture(scope="module")
def settings(package_index, test_model):
    return {**TEST_DOUBLE, **test_model, "pip_index_url": package_index}


@pytest.fixture(scope="module")
def passwords(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vault")
    files = {"right": directory / "vault-pass", "wrong": directory / "wrong-pass"}
    for path, password in zip(files.values(), ("fleet-vault-pw", "not-the-password")):
        path.write_text(password + "\n")
        path.chmod(0o600)
    return files


def ansible_vault(*args: str) -> str:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_VAULT")}
    return subprocess.run([ANSIBLE_VAULT, *args], capture_output=True, text=True, check=True, env=env).stdout


def hosts() -> list[dict]:
    return sorted(localfleet.load_hosts(), key=lambda host: host["name"])


def ssh_args(host: dict) -> str:
    return f"-o UserKnownHostsFile={host['known_hosts']} -o StrictHostKeyChecking=yes"


@pytest.fixture(scope="module")
def yaml_inventory(fleet, settings, passwords, tmp_path_factory) -> Path:
    """hosts.yml with the connection variables, group_vars/gpu.yml with glmfleet's keys and the
    API key as a !vault value, host_vars/ with each host's port; and other tools' variables."""
    directory = tmp_path_factory.mktemp("ansible-yaml")
    fleet_hosts = hosts()
    inventory = {
        "all": {
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": fleet_hosts[0]["ssh_key"],
                "ansible_ssh_common_args": ssh_args(fleet_hosts[0]),
                "ansible_python_interpreter": "/usr/bin/python3",
                "ntp_servers": ["ntp1.example.internal"],
            },
            "children": {
                "gpu": {"hosts": {host["name"]: {"ansible_host": "127.0.0.1"} for host in fleet_hosts}},
            },
        }
    }
    (directory / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (directory / "group_vars").mkdir()
    (directory / "group_vars" / "gpu.yml").write_text(
        yaml.safe_dump(settings)
        + ansible_vault(
            "encrypt_string", "--vault-password-file", str(passwords["right"]), "--name", "vllm_api_key", API_KEY
        )
    )
    (directory / "host_vars").mkdir()
    for host in fleet_hosts:
        (directory / "host_vars" / f"{host['name']}.yml").write_text(
            yaml.safe_dump({"ansible_port": host["ssh_port"], "vllm_port": host["vllm_port"]})
        )
    return directory / "hosts.yml"


@pytest.fixture(scope="module")
def ini_inventory(fleet, settings, passwords, tmp_path_factory) -> Path:
    """hosts.ini with the hosts and ansible_become=yes (INI's string), group_vars/all/ with
    glmfleet's keys and a wholly vaulted file holding the API key."""
    directory = tmp_path_factory.mktemp("ansible-ini")
    fleet_hosts = hosts()
    (directory / "hosts.ini").write_text(
        "[gpu]\n"
        + "".join(
            f"{host['name']} ansible_host=127.0.0.1 ansible_port={host['ssh_port']} vllm_port={host['vllm_port']}\n"
            for host in fleet_hosts
        )
        + "\n[gpu:vars]\n"
        + "ansible_user=root\nansible_become=yes\n"
        + f"ansible_ssh_private_key_file={fleet_hosts[0]['ssh_key']}\n"
        + f"ansible_ssh_common_args='{ssh_args(fleet_hosts[0])}'\n"
    )
    group_vars = directory / "group_vars" / "all"
    group_vars.mkdir(parents=True)
    (group_vars / "main.yml").write_text(yaml.safe_dump(settings))
    (group_vars / "vault.yml").write_text(yaml.safe_dump({"vllm_api_key": API_KEY}))
    ansible_vault("encrypt", "--vault-password-file", str(passwords["right"]), str(group_vars / "vault.yml"))
    return directory / "hosts.ini"


def through(inventory: Path, password: Path, *args: str, **kwargs):
    """`pyinfra @ansible/INVENTORY deploy.py` with the vault password file Ansible would use."""
    env = {**CHECKOUT, "ANSIBLE_VAULT_PASSWORD_FILE": str(password)}
    return pyinfra(f"@ansible/{inventory}", *args, "deploy.py", env=env, **kwargs)


@pytest.fixture(scope="module")
def first_run(yaml_inventory, passwords):
    run = through(yaml_inventory, passwords["right"])
    assert run.returncode == 0, run.stderr[-3000:]
    return run


RUNS = []  # every run's output, searched for the key at the end


def unit_hashes(fleet) -> dict[str, str]:
    return {name: fleet_host(name).file(UNIT_PATH).sha256sum for name in fleet}


def test_the_deploy_converges_through_the_yaml_inventory(first_run, yaml_inventory, passwords, fleet):
    RUNS.append(first_run)
    second = through(yaml_inventory, passwords["right"])
    RUNS.append(second)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.changed() == {}
    for name in fleet:
        # the vaulted key is in force
        port = dict(localfleet.inventory_hosts())[name]["vllm_port"]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models")
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(request, timeout=10)
        request.add_header("Authorization", f"Bearer {API_KEY}")
        assert urllib.request.urlopen(request, timeout=10).status == 200


def test_the_ini_inventory_with_a_vaulted_file_and_become_changes_nothing(first_run, ini_inventory, passwords, fleet):
    """Same keys, another form (and sudo): the same configuration, nothing to change."""
    units = unit_hashes(fleet)
    run = through(ini_inventory, passwords["right"])
    RUNS.append(run)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.changed() == {}
    assert unit_hashes(fleet) == units


def test_the_pyinfra_inventory_with_the_same_keys_writes_the_same_unit(first_run, settings, fleet):
    units = unit_hashes(fleet)
    run = deploy(data=settings, env={API_KEY_ENV: API_KEY})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.changed() == {}
    assert unit_hashes(fleet) == units


def test_the_vaulted_key_appears_nowhere_else(first_run, yaml_inventory, passwords, fleet):
    """Not in any output mode (--json, -vvv --debug, the plain one), not on a command line,
    not in the unit or the journal; on the host only in the root-only env file."""
    RUNS.append(through(yaml_inventory, passwords["right"], "-vvv", "--debug"))
    plain = subprocess.run(
        [str(Path(sys.executable).parent / "pyinfra"), "-y", f"@ansible/{yaml_inventory}", "deploy.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **CHECKOUT, "ANSIBLE_VAULT_PASSWORD_FILE": str(passwords["right"])},
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    outputs = [run.stdout + run.stderr for run in RUNS] + [plain.stdout + plain.stderr]
    assert len(outputs) == 5 and not [output for output in outputs if API_KEY in output]
    for name in fleet:
        host = fleet_host(name)
        env_file = host.file("/etc/glmfleet/vllm.env")
        assert (env_file.mode, env_file.user, env_file.group) == (0o600, "root", "root")
        pid = host.check_output("systemctl show --property MainPID --value vllm.service")
        assert f"VLLM_API_KEY={API_KEY}" in host.check_output(f"tr '\\0' '\\n' < /proc/{pid}/environ").splitlines()
        assert API_KEY not in host.check_output("cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        assert API_KEY not in host.check_output("journalctl --no-pager")
        assert API_KEY not in host.file(UNIT_PATH).content_string


def test_a_wrong_vault_password_stops_the_run_before_any_host(first_run, yaml_inventory, passwords):
    run = through(yaml_inventory, passwords["wrong"])
    assert run.returncode != 0
    assert (
        f"vllm_api_key (set in {yaml_inventory.parent}/group_vars/gpu.yml:" in run.stderr
        and "Decryption failed" in run.stderr
    ), run.stderr[-2000:]
    assert "Connecting" not in run.stderr and "Beginning operation run" not in run.stderr


def test_an_unknown_glmfleet_key_is_refused_before_any_host(first_run, yaml_inventory, passwords, fleet, tmp_path):
    misspelt = tmp_path / "ansible"
    subprocess.run(["cp", "-a", str(yaml_inventory.parent), str(misspelt)], check=True)
    (misspelt / "host_vars" / f"{fleet[0]}.yml").open("a").write("vllm_max_modle_len: 4096\n")
    run = through(misspelt / "hosts.yml", passwords["right"])
    assert run.returncode != 0
    assert f"{fleet[0]}: unknown key vllm_max_modle_len = 4096 (did you mean vllm_max_model_len?)" in run.stderr, (
        run.stderr[-2000:]
    )
    assert "Connecting" not in run.stderr and "Beginning operation run" not in run.stderr


# --- glmfleet logs on the deployed fleet ----------------------------------------------------


def prefixed_lines(stdout: str) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        name, _, text = line.partition(" | ")
        lines.setdefault(name.strip(), []).append(text)
    return lines


def test_logs_of_every_host_arrive_prefixed(first_run, yaml_inventory, passwords, fleet):
    run = glmfleet(
        "logs",
        f"@ansible/{yaml_inventory}",
        "-n",
        "3",
        env={**CHECKOUT, "ANSIBLE_VAULT_PASSWORD_FILE": str(passwords["right"])},
    )
    assert run.returncode == 0, run.stderr
    lines = prefixed_lines(run.stdout)
    assert sorted(lines) == sorted(fleet) and all(len(lines[name]) == 3 for name in fleet), run.stdout
    # journalctl's short-iso lines: the host's own name after the time
    assert all(re.match(rf"\S+ {re.escape(name)} ", lines[name][0]) for name in fleet), run.stdout
    # the pyinfra inventory, one host
    limited = glmfleet("logs", "inventory/local.py", "--limit", fleet[1], "--since=-1h", env=CHECKOUT)
    assert limited.returncode == 0 and list(prefixed_lines(limited.stdout)) == [fleet[1]], limited.stderr


def test_logs_refuse_a_host_key_that_is_not_known(first_run, fleet, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    inventory = write_inventory(tmp_path / "inventory.py", {fleet[0]: {"ssh_known_hosts_file": str(empty)}})
    run = glmfleet("logs", str(inventory), "-n", "1", env=CHECKOUT)
    assert run.returncode == 1
    assert f"glmfleet logs: {fleet[0]}: unreachable: Server '[127.0.0.1]:" in run.stderr
    assert "not found in known_hosts" in run.stderr
    assert list(prefixed_lines(run.stdout)) == [fleet[1]]


def journalctl_running(name: str) -> bool:
    return fleet_host(name).run("ps -C journalctl -o pid=").stdout.strip() != ""


def test_logs_follow_new_lines_until_ctrl_c(first_run, fleet):
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "glmfleet"), "logs", "inventory/local.py", "-f", "-n", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **CHECKOUT},
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        wait_for(lambda: all(map(journalctl_running, fleet)), what="journalctl -f on every host", timeout_s=30)
        marker = f"follow-{uuid.uuid4().hex[:8]}"
        for host in hosts():  # one request each: the test double logs its request line
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{host['vllm_port']}/health?{marker}", timeout=10)
            except urllib.error.HTTPError:
                pass

        def both_arrived() -> bool:
            while not lines.empty():
                seen.append(lines.get())
            return {line.split(" | ")[0].strip() for line in seen if marker in line} == set(fleet)

        wait_for(both_arrived, what="the new lines of both hosts", timeout_s=30)
        assert process.poll() is None  # still following
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=30)
    finally:
        process.kill()
    stderr = process.stderr.read()
    assert returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    wait_for(lambda: not any(map(journalctl_running, fleet)), what="journalctl to end on every host", timeout_s=15)


def test_logs_name_a_powered_off_host_and_the_others_go_on(first_run, ini_inventory, passwords, fleet):
    """Through the INI inventory, whose ansible_become makes it read the journal through sudo."""
    lost, other = fleet[1], fleet[0]
    localfleet.stop_host(lost, force=True)
    try:
        run = glmfleet(
            "logs",
            f"@ansible/{ini_inventory}",
            "-n",
            "2",
            env={**CHECKOUT, "ANSIBLE_VAULT_PASSWORD_FILE": str(passwords["right"])},
        )
    finally:
        localfleet.start_host(lost)
    assert run.returncode == 1
    assert list(prefixed_lines(run.stdout)) == [other] and len(prefixed_lines(run.stdout)[other]) == 2
    assert re.search(rf"glmfleet logs: {re.escape(lost)}: unreachable: Unable to connect to port \d+", run.stderr)
    assert "Traceback" not in run.stderr
