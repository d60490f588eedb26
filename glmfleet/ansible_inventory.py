"""Ansible inventories as glmfleet's inventory, read by ansible-core itself.

Hosts, groups (``children``, ranges) and variables (inline, ``group_vars/``, ``host_vars/``) are
resolved by ansible-core's own ``InventoryManager`` and ``VariableManager``, with Ansible's
precedence; ``!vault`` values and wholly vaulted files are decrypted with the vault passwords
the operator gives Ansible (``ANSIBLE_VAULT_PASSWORD_FILE``, ``ANSIBLE_VAULT_IDENTITY_LIST``,
ansible.cfg). :func:`pyinfra_hosts` hands them to pyinfra: Ansible's connection variables as
pyinfra's, glmfleet's keys as they are; every other variable is another tool's and is left out
(``config.meant_for_glmfleet`` says which are glmfleet's, and a near miss is refused).

ansible-core's Python API is not a public one (its docs say so): what is used here is checked
at each minor release before the pin moves (pyproject.toml).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from glmfleet import config
from glmfleet.config import ConfigError

# Ansible's connection and become variables glmfleet maps, each with its aliases, lowest first:
# where several are set, the last listed wins, as in ansible-core (config/manager.py).
CONNECTION_VARIABLES = {
    "host": ("ansible_host", "ansible_ssh_host"),
    "port": ("ansible_port", "ansible_ssh_port"),
    "user": ("ansible_user", "ansible_ssh_user"),
    "password": ("ansible_password", "ansible_ssh_pass", "ansible_ssh_password"),
    "key": ("ansible_private_key_file", "ansible_ssh_private_key_file"),
    "key_password": ("ansible_private_key_passphrase", "ansible_ssh_private_key_passphrase"),
    "host_key_checking": ("ansible_host_key_checking", "ansible_ssh_host_key_checking"),
    "ssh_args": ("ansible_ssh_common_args", "ansible_ssh_extra_args"),
    "retries": ("ansible_ssh_retries",),
    "connection": ("ansible_connection",),
    "become": ("ansible_become",),
    "become_method": ("ansible_become_method",),
    "become_user": ("ansible_become_user", "ansible_sudo_user"),
    "become_password": ("ansible_become_password", "ansible_become_pass", "ansible_sudo_pass"),
}
MAPPED = frozenset(name for aliases in CONNECTION_VARIABLES.values() for name in aliases)
# ssh options (-o Name=value in ansible_ssh_common_args / _extra_args) with a pyinfra key.
SSH_OPTIONS = {"stricthostkeychecking": "ssh_strict_host_key_checking", "userknownhostsfile": "ssh_known_hosts_file"}


class AnsibleInventoryError(ConfigError):
    """The Ansible inventory cannot be read (a file, a vault password): nothing was touched."""


@dataclass(frozen=True)
class AnsibleHost:
    """One host as Ansible resolves it: the variables glmfleet reads (plain Python values,
    templates rendered, vaults decrypted), its groups (parents first) and which variables were
    vaulted."""

    name: str
    variables: dict[str, Any]
    groups: list[str]
    vaulted: frozenset[str]


def pyinfra_hosts(source: str) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(name, pyinfra host data, groups) for every host of the Ansible inventory ``source``
    (a file or directory). Raises AnsibleInventoryError naming every problem: a variable that
    looks like glmfleet's and is not one of its keys, a connection setting glmfleet cannot honour."""
    hosts = read(source, wanted=lambda name: name in MAPPED or config.meant_for_glmfleet(name))
    found, result = [], []
    for host in hosts:
        ours = {key: value for key, value in host.variables.items() if key not in MAPPED}
        found += config.unknown_keys(ours, host.name, hidden=host.vaulted)
        try:
            connection = connection_data(host.name, host.variables)
        except ValueError as error:
            found.append(str(error))
            continue
        result.append((host.name, {**ours, **connection}, host.groups))
    if found:
        raise AnsibleInventoryError(f"{source}: " + config.format_problems(found))
    return result


def _last(variables: Mapping[str, Any], what: str) -> Any:
    value = None
    for name in CONNECTION_VARIABLES[what]:
        if variables.get(name) is not None:
            value = variables[name]
    return value


def _boolean(host: str, name: str, value: Any) -> bool:
    # INI values such as ansible_become=yes stay strings: Ansible converts them where it uses them.
    from ansible.module_utils.parsing.convert_bool import boolean

    try:
        return boolean(value, strict=True)
    except TypeError:
        raise ValueError(f"{host}: {name} = {value!r} is not a boolean; accepted: true/false, yes/no, 1/0") from None


def _ssh_options(host: str, args: str) -> dict[str, str]:
    """pyinfra keys for the ``-o Name=value`` options of ansible_ssh_common_args/_extra_args. The
    first value of an option wins, as in OpenSSH; an option pyinfra has no key for is refused, not
    dropped: a ProxyJump left out would connect another way than Ansible does."""
    words, options, refused = shlex.split(args), {}, []
    while words:
        word = words.pop(0)
        option = (
            word[2:] if word.startswith("-o") and len(word) > 2 else (words.pop(0) if word == "-o" and words else "")
        )
        name, _, value = option.replace("=", " ", 1).partition(" ")
        if name.lower() in SSH_OPTIONS:
            options.setdefault(SSH_OPTIONS[name.lower()], value.strip())
        else:
            refused.append(option or word)
    if refused:
        raise ValueError(
            f"{host}: ansible_ssh_common_args/ansible_ssh_extra_args {' '.join(refused)!r} cannot be carried over; "
            "accepted there: -o StrictHostKeyChecking=... and -o UserKnownHostsFile=...; put other ssh options "
            "in ~/.ssh/config, which pyinfra reads"
        )
    return options


def connection_data(host: str, variables: Mapping[str, Any]) -> dict[str, Any]:
    """pyinfra's connection keys (``ssh_*``, ``_sudo``) for one host's Ansible variables.

    The explicit variables win over ssh options, as Ansible puts its own options first.
    Refused (ValueError): connections other than SSH, become methods other than sudo, and a
    become password, which pyinfra would pass in the environment of a command on the host."""
    connection = _last(variables, "connection")
    if connection not in (None, "ssh", "paramiko", "smart"):
        raise ValueError(f"{host}: ansible_connection = {connection!r}: glmfleet deploys over SSH; accepted: ssh")
    # Both apply: common args first, as Ansible puts them.
    ssh_args = " ".join(str(variables[name]) for name in CONNECTION_VARIABLES["ssh_args"] if variables.get(name))
    data: dict[str, Any] = _ssh_options(host, ssh_args)
    data["ssh_hostname"] = str(_last(variables, "host") or host)
    for what, key, kind in (
        ("port", "ssh_port", int),
        ("user", "ssh_user", str),
        ("key", "ssh_key", str),
        ("password", "ssh_password", str),
        ("key_password", "ssh_key_password", str),
        ("retries", "ssh_connect_retries", int),
    ):
        value = _last(variables, what)
        if value is not None:
            try:
                data[key] = kind(value)
            except ValueError:
                raise ValueError(
                    f"{host}: {CONNECTION_VARIABLES[what][0]} = {value!r} is not {kind.__name__}"
                ) from None
    checking = _last(variables, "host_key_checking")
    if checking is not None and not _boolean(host, "ansible_host_key_checking", checking):
        data["ssh_strict_host_key_checking"] = "no"
    become = _last(variables, "become")
    if become is not None and _boolean(host, "ansible_become", become):
        method = _last(variables, "become_method") or "sudo"
        if method != "sudo":
            raise ValueError(f"{host}: ansible_become_method = {method!r} is not supported; accepted: sudo")
        if _last(variables, "become_password") is not None:
            raise ValueError(
                f"{host}: ansible_become_password is set: pyinfra would hand it to sudo in the environment of a "
                "command on the host, where other users can read it; accepted: sudo without a password "
                "(NOPASSWD for the deploy user) or ansible_user root"
            )
        data["_sudo"] = True
        if (user := _last(variables, "become_user")) is not None:
            data["_sudo_user"] = str(user)
    return data


def read(source: str, wanted: Callable[[str], bool]) -> list[AnsibleHost]:
    """Every host of the inventory ``source`` with the variables whose names ``wanted`` accepts.

    Only those are templated and decrypted: another tool's vaulted variables need no password
    here (a wholly vaulted file still does, as Ansible reads it whole)."""
    with _quiet_gevent_resolver():
        import ansible.template  # noqa: F401  first: it sets up ansible-core's controller side, as its CLI does
    from ansible import constants
    from ansible.errors import AnsibleError
    from ansible.inventory.helpers import sort_groups
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.parsing.vault import VaultSecretsContext
    from ansible.template import Templar
    from ansible.vars.hostvars import HostVars
    from ansible.vars.manager import VariableManager

    # Absolute, as ansible's CLI makes -i: a relative source loses host_vars/ in some settings.
    source = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(source):
        raise AnsibleInventoryError(f"Ansible inventory {source} does not exist")
    # Unparsable is otherwise a warning and an inventory of no hosts.
    constants.INVENTORY_ANY_UNPARSED_IS_FAILED = True
    _init_plugins()
    loader = DataLoader()
    # group_vars/ beside the "playbook" are read from the loader's basedir, the cwd by default.
    loader.set_basedir(source if os.path.isdir(source) else os.path.dirname(source))
    try:
        secrets = _vault_secrets(loader)
    except AnsibleError as error:
        raise AnsibleInventoryError(f"{source}: vault password: {error.message}") from None
    # Inline !vault values decrypt on use, with the secrets of this process-wide context.
    context = VaultSecretsContext.current(optional=True)
    if context is None:
        VaultSecretsContext.initialize(VaultSecretsContext(secrets))
    else:
        context.secrets = secrets
    try:
        inventory = InventoryManager(loader=loader, sources=[source])
        variables = VariableManager(loader=loader, inventory=inventory)
        HostVars(inventory=inventory, variable_manager=variables, loader=loader)  # {{ hostvars[...] }} works
        hosts = []
        for host in inventory.get_hosts("all"):
            every = variables.get_vars(host=host)  # group_vars/ and host_vars/ are read here
            templar = Templar(loader=loader, variables=every)
            names = [name for name in every if wanted(name)]
            values = {}
            for name in names:
                try:
                    values[name] = _plain(templar.template(every[name]))
                except AnsibleError as error:
                    where = _origin(every[name], error) or "its file"
                    raise _error(source, f"{host.name}: {name} (set in {where}): ", error, secrets) from None
            hosts.append(
                AnsibleHost(
                    name=host.name,
                    variables=values,
                    groups=[group.name for group in sort_groups(host.get_groups()) if group.name != "all"],
                    vaulted=frozenset(name for name in names if _vaulted(every[name])),
                )
            )
    except AnsibleError as error:
        where = _origin(error)
        raise _error(source, f"{where}: " if where else "", error, secrets) from None
    if not hosts:
        raise AnsibleInventoryError(f"{source}: the Ansible inventory has no hosts")
    return hosts


@functools.cache
def _init_plugins() -> None:
    # Once per process: a second call warns "AnsibleCollectionFinder has already been configured".
    from ansible.plugins.loader import init_plugin_loader

    init_plugin_loader()


def _vault_secrets(loader) -> list:
    """[(vault id, secret)] as ansible's CLI gathers them (CLI.setup_vault_secrets), without
    importing ansible.cli (it exits on a non-UTF-8 locale): ANSIBLE_VAULT_IDENTITY_LIST (or
    ansible.cfg's vault_identity_list), then ANSIBLE_VAULT_PASSWORD_FILE (vault_password_file)
    under the default id. A password file that is executable is run, as Ansible does. A file
    that cannot be read is an error here, where Ansible warns and goes on."""
    from ansible import constants
    from ansible.parsing.vault import get_file_vault_secret

    setting = constants.config.get_config_value  # read now: the environment of this run, not of the import
    default_id = setting("DEFAULT_VAULT_IDENTITY")
    slugs = list(setting("DEFAULT_VAULT_IDENTITY_LIST") or [])
    if setting("DEFAULT_VAULT_PASSWORD_FILE"):
        slugs.append(f"{default_id}@{setting('DEFAULT_VAULT_PASSWORD_FILE')}")
    secrets = []
    for slug in slugs:
        vault_id, _, where = slug.rpartition("@")
        vault_id = vault_id or default_id
        if where in ("prompt", "prompt_ask_vault_pass"):
            raise AnsibleInventoryError(
                f"vault id {vault_id}: glmfleet does not prompt for a vault password; give it a password file"
            )
        secret = get_file_vault_secret(filename=where, vault_id=vault_id, loader=loader)
        secret.load()
        secrets.append((vault_id, secret))
    loader.set_vault_secrets(secrets)  # wholly vaulted files
    return secrets


def _vaulted(value: Any) -> bool:
    """Whether a variable's value was encrypted: a ``!vault`` value, or one read from a wholly
    vaulted file."""
    from ansible.parsing.vault import EncryptedString, is_encrypted_file

    if isinstance(value, EncryptedString):
        return True
    path = _origin_tag(value)
    path = path and path.path
    if not path or not os.path.isfile(path):
        return False
    with open(path, "rb") as file:
        return is_encrypted_file(file)


def _origin_tag(value: Any):
    # ansible-core's internal Origin tag: where it is gone, values and errors lose their file.
    try:
        from ansible._internal._datatag._tags import Origin
    except ImportError:
        return None
    return Origin.get_tag(value)


def _origin(*found: Any) -> str | None:
    """The file (and line) a value or an error came from, as ansible-core tags them."""
    seen = set()
    while found:
        item, *rest = found
        found = tuple(rest)
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        tag = _origin_tag(item)
        if tag is not None and tag.path:
            return str(tag)
        if isinstance(item, BaseException):
            found += (getattr(item, "obj", None), item.__cause__, item.__context__)
    return None


def _error(source: str, where: str, error, secrets: list) -> AnsibleInventoryError:
    """One line: the inventory, where the problem is, ansible-core's message, and for a vault
    the passwords tried (their ids, never a password)."""
    message = " ".join(str(error).split())
    if "vault" in message.lower():
        message += (
            f" (vault ids tried: {', '.join(vault_id for vault_id, _secret in secrets)})"
            if secrets
            else " (no vault password was given: set ANSIBLE_VAULT_PASSWORD_FILE or ANSIBLE_VAULT_IDENTITY_LIST)"
        )
    return AnsibleInventoryError(f"{source}: {where}{message}")


def _plain(value: Any) -> Any:
    """Exact built-in types for ansible-core's tagged ones (its str, int... subclasses)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


@contextlib.contextmanager
def _quiet_gevent_resolver():
    """ansible-core probes socket.getaddrinfo once at import and expects an error; under gevent's
    monkey patching (pyinfra, glmfleet's command) the threadpool resolver also prints that error.
    Resolving in the calling greenlet while ansible is imported keeps it quiet."""
    from gevent import get_hub, monkey
    from gevent.resolver.blocking import Resolver

    if not monkey.is_module_patched("socket"):
        yield
        return
    hub = get_hub()
    resolver, hub.resolver = hub.resolver, Resolver(hub)
    try:
        yield
    finally:
        hub.resolver = resolver
