"""Ansible inventories read by real ansible-core: hosts, groups, variables with Ansible's
precedence, vaults made by the real `ansible-vault`, the connection variables mapped to
pyinfra's, glmfleet's keys kept, other tools' variables left alone and near misses refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyinfra.api import State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory

import roles  # noqa: F401  (hands the roles' settings to the configuration model)
from glmfleet.ansible_inventory import AnsibleInventoryError, connection_data, pyinfra_hosts
from glmfleet.config import ConfigError, meant_for_glmfleet, unknown_keys, validate_inventory
from tests.support.entry_points import metadata_dir
from tests.support.paths import ROOT

ANSIBLE_VAULT = Path(sys.executable).parent / "ansible-vault"
REVISION = "ab" * 20
API_KEY = "sk-vaulted-\"q'$HOME`id`;#1"
HF_TOKEN = "hf_vaultedfile"


def without_vault_settings() -> dict:
    # The password is named on the command line: a test's vault settings would clash with it.
    return {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_VAULT")}


def vault_string(password_file: Path, name: str, value: str, vault_id: str = "default") -> str:
    """`name: !vault |...` as `ansible-vault encrypt_string` writes it."""
    return subprocess.run(
        [ANSIBLE_VAULT, "encrypt_string", "--vault-id", f"{vault_id}@{password_file}", "--name", name, value],
        capture_output=True,
        text=True,
        check=True,
        env=without_vault_settings(),
    ).stdout


def vault_file(password_file: Path, path: Path, vault_id: str) -> None:
    subprocess.run(
        [ANSIBLE_VAULT, "encrypt", "--vault-id", f"{vault_id}@{password_file}", str(path)],
        capture_output=True,
        check=True,
        env=without_vault_settings(),
    )


@pytest.fixture(scope="module")
def passwords(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vault-passwords")
    files = {}
    for name, password in (("default", "pw-default"), ("prod", "pw-prod"), ("wrong", "not-it"), ("db", "pw-db")):
        files[name] = directory / name
        files[name].write_text(password + "\n")
        files[name].chmod(0o600)
    return files


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory, passwords):
    """hosts.yml (children, a range), group_vars/ (a file and a directory holding a wholly
    vaulted file under vault id prod), host_vars/, an inline !vault value, and variables of other
    tools: Ansible's own, another role's, and one vaulted with a password glmfleet is not given."""
    inventory = tmp_path_factory.mktemp("ansible")
    (inventory / "hosts.yml").write_text(
        """all:
  vars:
    ntp_servers: [ntp1, ntp2]
    ansible_python_interpreter: /usr/bin/python3
    vllm_port: 8000
  children:
    fleet:
      vars:
        vllm_port: 8100
      children:
        gpu:
          hosts:
            gpu-[01:03]:
              ansible_user: ubuntu
          vars:
            vllm_port: 8200
            vllm_max_model_len: 2048
        gateway:
          hosts:
            gpu-01:
"""
    )
    group_vars, host_vars = inventory / "group_vars", inventory / "host_vars"
    (group_vars / "gpu").mkdir(parents=True)
    host_vars.mkdir()
    (group_vars / "all.yml").write_text(
        f"model_revision: '{REVISION}'\n"
        "vllm_served_model_name: 'glm-on-{{ inventory_hostname }}'\n"
        "docker_users: [alice]\n"
        + vault_string(passwords["default"], "vllm_api_key", API_KEY)
        + vault_string(passwords["db"], "mysql_password", "db-secret", vault_id="db")
    )
    (group_vars / "gpu" / "main.yml").write_text("vllm_max_model_len: 4096\n")
    (group_vars / "gpu" / "vault.yml").write_text(f"hf_token: {HF_TOKEN}\n")
    vault_file(passwords["prod"], group_vars / "gpu" / "vault.yml", "prod")
    (host_vars / "gpu-02.yml").write_text("vllm_port: 9002\nansible_host: 10.0.0.2\nansible_port: 2222\n")
    return inventory


@pytest.fixture
def vault_passwords(monkeypatch, passwords):
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(passwords["default"]))
    monkeypatch.setenv("ANSIBLE_VAULT_IDENTITY_LIST", f"prod@{passwords['prod']}")


def by_name(source) -> dict[str, tuple[dict, list[str]]]:
    return {name: (data, groups) for name, data, groups in pyinfra_hosts(str(source))}


def test_hosts_groups_and_variables_as_ansible_resolves_them(fleet_dir, vault_passwords):
    hosts = by_name(fleet_dir / "hosts.yml")
    assert sorted(hosts) == ["gpu-01", "gpu-02", "gpu-03"]  # the range
    assert hosts["gpu-01"][1] == ["fleet", "gateway", "gpu"]  # parents first, as Ansible merges them
    # host_vars over the child group over its parent over all; templates rendered per host
    assert {name: data["vllm_port"] for name, (data, _) in hosts.items()} == {
        "gpu-01": 8200,
        "gpu-02": 9002,
        "gpu-03": 8200,
    }
    assert hosts["gpu-03"][0]["vllm_served_model_name"] == "glm-on-gpu-03"
    # Ansible's precedence: group_vars/ files over the vars written in the inventory file
    assert hosts["gpu-03"][0]["vllm_max_model_len"] == 4096
    # plain built-in types, as pyinfra's type checks and pickling want them
    assert {type(value) for data, _ in hosts.values() for value in data.values()} <= {str, int, bool}


def test_vaulted_values_and_vaulted_files_are_decrypted(fleet_dir, vault_passwords):
    data, _ = by_name(fleet_dir / "hosts.yml")["gpu-02"]
    assert data["vllm_api_key"] == API_KEY  # an inline !vault value, vault id default
    assert data["hf_token"] == HF_TOKEN  # a wholly vaulted file, vault id prod


def test_other_tools_variables_are_left_alone(fleet_dir, vault_passwords):
    """Not even decrypted: mysql_password is vaulted with a password glmfleet was not given."""
    data, _ = by_name(fleet_dir / "hosts.yml")["gpu-01"]
    assert not {"ntp_servers", "ansible_python_interpreter", "docker_users", "mysql_password", "ansible_user"} & set(
        data
    )


def test_connection_variables_become_pyinfras(fleet_dir, vault_passwords):
    hosts = by_name(fleet_dir / "hosts.yml")
    assert {key: hosts["gpu-02"][0][key] for key in ("ssh_hostname", "ssh_port", "ssh_user")} == {
        "ssh_hostname": "10.0.0.2",
        "ssh_port": 2222,
        "ssh_user": "ubuntu",
    }
    assert hosts["gpu-01"][0]["ssh_hostname"] == "gpu-01"  # no ansible_host: the inventory name


@pytest.mark.parametrize(
    "variables, expected",
    [
        (
            {
                "ansible_host": "10.0.0.1",
                "ansible_ssh_host": "10.0.0.9",  # the later alias wins, as in Ansible
                "ansible_port": "2200",
                "ansible_ssh_private_key_file": "~/.ssh/id_gpu",
                "ansible_become": "yes",  # INI keeps it a string
                "ansible_become_user": "root",
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=yes -o UserKnownHostsFile=/etc/fleet_known_hosts",
            },
            {
                "ssh_hostname": "10.0.0.9",
                "ssh_port": 2200,
                "ssh_key": "~/.ssh/id_gpu",
                "_sudo": True,
                "_sudo_user": "root",
                "ssh_strict_host_key_checking": "yes",
                "ssh_known_hosts_file": "/etc/fleet_known_hosts",
            },
        ),
        (
            {"ansible_host_key_checking": False, "ansible_become": False, "ansible_password": "pw"},
            {"ssh_hostname": "h", "ssh_strict_host_key_checking": "no", "ssh_password": "pw"},
        ),
    ],
)
def test_connection_mapping(variables, expected):
    assert connection_data("h", variables) == expected


@pytest.mark.parametrize(
    "variables, refused",
    [
        ({"ansible_connection": "local"}, "ansible_connection = 'local': glmfleet deploys over SSH"),
        ({"ansible_become": True, "ansible_become_method": "su"}, "ansible_become_method = 'su' is not supported"),
        ({"ansible_become": True, "ansible_become_password": "pw"}, "ansible_become_password is set"),
        ({"ansible_ssh_common_args": "-o ProxyJump=bastion"}, "'ProxyJump=bastion' cannot be carried over"),
        ({"ansible_become": "maybe"}, "ansible_become = 'maybe' is not a boolean"),
        ({"ansible_port": "ssh"}, "ansible_port = 'ssh' is not int"),
    ],
)
def test_connection_settings_glmfleet_cannot_honour_are_refused(variables, refused):
    with pytest.raises(ValueError, match="^h: ") as error:
        connection_data("h", variables)
    assert refused in str(error.value)


def test_the_become_password_is_never_echoed():
    with pytest.raises(ValueError) as error:
        connection_data("h", {"ansible_become": True, "ansible_become_password": "sudo-secret"})
    assert "sudo-secret" not in str(error.value)


@pytest.mark.parametrize(
    "key", ["vllm_prot", "vlm_port", "vllm_anything", "model_name", "gateway_tls", "hf_tokn", "mode"]
)
def test_what_looks_like_a_glmfleet_key_is_glmfleets(key):
    assert meant_for_glmfleet(key)


@pytest.mark.parametrize("key", ["ntp_servers", "docker_users", "pip_install_packages", "uv_python", "ssh_port"])
def test_other_tools_variables_are_not_glmfleets(key):
    assert not meant_for_glmfleet(key)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_misspelt_key_is_refused_and_a_vaulted_value_stays_hidden(tmp_path, passwords, monkeypatch):
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(passwords["default"]))
    write(tmp_path / "hosts.ini", "[gpu]\ngpu-01 vllm_prot=8000\n")
    write(tmp_path / "group_vars/gpu.yml", vault_string(passwords["default"], "vllm_token", "sk-leak-me"))
    with pytest.raises(AnsibleInventoryError) as error:
        pyinfra_hosts(str(tmp_path / "hosts.ini"))
    message = str(error.value)
    assert "gpu-01: unknown key vllm_prot = 8000 (did you mean vllm_port?)" in message
    assert "gpu-01: unknown key vllm_token = <hidden>" in message
    assert "sk-leak-me" not in message


def test_a_misspelt_secret_key_is_never_echoed():
    """In any inventory: the key it is closest to is a secret's."""
    (problem,) = unknown_keys({"vllm_api_kye": "sk-typo"}, "h")
    assert "vllm_api_kye = <hidden> (did you mean vllm_api_key?)" in problem


@pytest.mark.parametrize(
    "password, expected",
    [
        ("wrong", "Decryption failed (no vault secrets were found that could decrypt). (vault ids tried: default)"),
        (None, "no vault password was given: set ANSIBLE_VAULT_PASSWORD_FILE or ANSIBLE_VAULT_IDENTITY_LIST"),
    ],
)
def test_a_wrong_or_missing_vault_password_names_the_file(fleet_dir, passwords, monkeypatch, password, expected):
    monkeypatch.delenv("ANSIBLE_VAULT_IDENTITY_LIST", raising=False)
    if password:
        monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(passwords[password]))
    else:
        monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE", raising=False)
    with pytest.raises(AnsibleInventoryError) as error:
        pyinfra_hosts(str(fleet_dir / "hosts.yml"))
    message = str(error.value)
    assert expected in message
    # the first vaulted thing Ansible reads for the first host: the wholly vaulted file
    assert str(fleet_dir / "group_vars/gpu/vault.yml") in message


def test_an_inline_vault_value_that_fails_names_its_file_and_line(tmp_path, passwords, monkeypatch):
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(passwords["wrong"]))
    write(tmp_path / "hosts.ini", "gpu-01\n")
    write(tmp_path / "host_vars/gpu-01.yml", vault_string(passwords["default"], "vllm_api_key", "sk-x"))
    with pytest.raises(
        AnsibleInventoryError, match=rf"gpu-01: vllm_api_key \(set in {tmp_path}/host_vars/gpu-01.yml:1:"
    ):
        pyinfra_hosts(str(tmp_path / "hosts.ini"))


def test_a_password_file_that_is_missing_is_named(fleet_dir, monkeypatch):
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", "/nonexistent/vault-pass")
    with pytest.raises(AnsibleInventoryError, match="vault password: The vault password file /nonexistent/vault-pass"):
        pyinfra_hosts(str(fleet_dir / "hosts.yml"))


def test_an_inventory_ansible_cannot_parse_is_an_error(tmp_path):
    write(tmp_path / "hosts.yml", "all: [this is: not an inventory\n")
    with pytest.raises(AnsibleInventoryError, match=str(tmp_path / "hosts.yml")):
        pyinfra_hosts(str(tmp_path / "hosts.yml"))
    with pytest.raises(AnsibleInventoryError, match="does not exist"):
        pyinfra_hosts(str(tmp_path / "missing.yml"))


def pyinfra_inventory(source: str, monkeypatch, **override):
    """The inventory as `pyinfra @ansible/SOURCE --data ...` loads it, through the connector
    pyproject.toml registers."""
    monkeypatch.syspath_prepend(str(metadata_dir()))
    with ctx_state.use(State()):
        return make_inventory(f"@ansible/{source}", override_data=override, cwd=str(ROOT))


def test_pyinfra_takes_the_inventory_through_the_connector(fleet_dir, vault_passwords, monkeypatch):
    """Groups are pyinfra groups (--limit, group_data/), and --data wins over Ansible, as over
    any inventory's data."""
    inventory = pyinfra_inventory(str(fleet_dir / "hosts.yml"), monkeypatch, vllm_max_model_len=8192)
    assert sorted(host.name for host in inventory.get_group("gateway")) == ["gpu-01"]
    configs = validate_inventory(inventory)
    assert {cfg.vllm_max_model_len for cfg in configs.values()} == {8192}
    assert configs["gpu-02"].vllm_port == 9002 and configs["gpu-02"].hf_token == HF_TOKEN


def test_the_example_ansible_inventory_is_the_example_pyinfra_inventory(monkeypatch):
    """inventory/ansible/ and inventory/prod.py set the same keys: the same configuration."""
    monkeypatch.setenv("GLMFLEET_VLLM_API_KEY", "sk-example")
    ansible = validate_inventory(pyinfra_inventory("inventory/ansible/hosts.yml", monkeypatch))
    with ctx_state.use(State()):
        pyinfra = validate_inventory(make_inventory("inventory/prod.py", override_data={}, cwd=str(ROOT)))
    assert {name: dict(cfg) for name, cfg in ansible.items()} == {name: dict(cfg) for name, cfg in pyinfra.items()}


def test_errors_reach_pyinfra_as_configuration_errors(tmp_path, monkeypatch):
    write(tmp_path / "hosts.ini", "gpu-01 vllm_prot=1\n")
    with pytest.raises(ConfigError, match="unknown key vllm_prot"):
        pyinfra_inventory(str(tmp_path / "hosts.ini"), monkeypatch)
