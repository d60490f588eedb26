"""The one configuration model: every data key a role reads, validated before any host is touched.

Each role module declares its keys once, as ``SETTINGS``: a tuple of :class:`Setting` with the
default and a one-line doc. :func:`resolve` turns one host's data (inventory, ``group_data/``,
``--data``; pyinfra merges them, host over group over all) into a :class:`HostConfig`, and
:func:`validate_inventory` checks every host at once, so one bad value stops the run with one
error that names host, key, value and what would be accepted.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from packaging.version import Version
from pyinfra.api import State
from pyinfra.api.exceptions import PyinfraError

from glmfleet import catalog, groups
from glmfleet.checks import Check, control_characters, is_ip, redact

# Keys that belong to pyinfra itself (connectors and global arguments), not to glmfleet.
PYINFRA_KEY_PREFIXES = ("ssh_", "_", "winrm_", "docker_ssh_", "local_", "chroot_", "fake_")


class ConfigError(PyinfraError):
    """Bad configuration: raised before any operation runs on any host."""


@dataclass(frozen=True)
class Setting:
    """One data key: its default, what it means, and which values it accepts.

    ``check`` tests a value and says what it accepts (``checks.Check``); ``accepted`` only where
    the words must say more than the check's. ``secret`` values are never echoed back.
    """

    name: str
    default: Any
    doc: str
    check: Check
    secret: bool = False
    accepted_text: str | None = None

    @property
    def accepted(self) -> str:
        return self.accepted_text or self.check.accepted


class HostConfig(Mapping):
    """One host's validated settings, read as attributes: ``cfg.vllm_port``."""

    def __init__(self, host: str, values: dict[str, Any]):
        self._host = host
        self._values = values

    @property
    def host(self) -> str:
        return self._host

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"HostConfig({self._host!r})"


# The roles, each a module that declares its SETTINGS (the contract: glmfleet/role.py): handed over by the
# roles package when it is imported (``use_roles``), so that this layer never imports upward.
_ROLES: tuple = ()


def use_roles(roles: tuple) -> None:
    """The roles whose settings make the configuration model, in their order."""
    global _ROLES
    _ROLES = tuple(roles)


def registered_roles() -> tuple:
    if not _ROLES:
        raise ConfigError("no roles are known to the configuration model: import roles first (it hands them over)")
    return _ROLES


def all_settings() -> dict[str, Setting]:
    """Every declared key, from every role."""
    return {setting.name: setting for role in registered_roles() for setting in getattr(role, "SETTINGS", ())}


def secret_keys() -> frozenset[str]:
    return frozenset(name for name, setting in all_settings().items() if setting.secret)


def show(setting: Setting | None, value: Any) -> str:
    """A value as an error message shows it: a secret hidden, a URL's credentials masked."""
    return "<hidden>" if setting is not None and setting.secret else redact(repr(value))


def unknown_keys(data: Mapping[str, Any], host: str, hidden: Collection[str] = ()) -> list[str]:
    """A problem for each key of ``data`` that is neither glmfleet's nor pyinfra's, with the key
    it is closest to. The value is hidden where it may be a secret: one in ``hidden`` (a vaulted
    value, say), or one whose closest key is a secret's."""
    settings = all_settings()
    found = []
    for key, value in data.items():
        if key in settings or key.startswith(PYINFRA_KEY_PREFIXES):
            continue
        hint = difflib.get_close_matches(key, settings, n=1)
        secret = key in hidden or (hint and settings[hint[0]].secret)
        found.append(
            f"{host}: unknown key {key} = {'<hidden>' if secret else show(None, value)}"
            + (f" (did you mean {hint[0]}?)" if hint else "")
            + "; see README.md for the keys glmfleet reads"
        )
    return found


# In another tool's inventory (Ansible's), which variables are meant for glmfleet: its keys, those
# in the namespaces of what glmfleet alone configures there, and near misses of a key (typos) - the
# last two refused as unknown keys. Every other variable belongs to that tool's other roles (their
# own docker_*, pip_*, nvidia_* ...) and is left alone.
OWN_NAMESPACES = ("vllm_", "model_", "gateway_")
NEAR_MISS = 0.85  # difflib's ratio: vllm_prot, vlm_port, hf_tokn, mode; not docker_users, uv_python


def meant_for_glmfleet(key: str) -> bool:
    settings = all_settings()
    return (
        key in settings
        or key.startswith(OWN_NAMESPACES)
        or bool(difflib.get_close_matches(key, settings, n=1, cutoff=NEAR_MISS))
    )


def problems(data: Mapping[str, Any], host: str, groups: Iterable[str] = ()) -> list[str]:
    """Every problem with one host's data, each naming host, key, value and what is accepted;
    ``groups``: the inventory groups the host is in (a gateway's ports, say)."""
    settings = all_settings()
    found = unknown_keys(data, host)
    for key, setting in settings.items():
        if key not in data:
            continue
        if control_characters(data[key]):
            found.append(
                f"{host}: {key} = {show(setting, data[key])} is invalid: it holds a control character (a newline, "
                "tab, NUL, escape...), which no command line, unit, env file or config file glmfleet writes "
                f"can hold; accepted: {setting.accepted}"
            )
        elif not setting.check(data[key]):
            found.append(f"{host}: {key} = {show(setting, data[key])} is invalid; accepted: {setting.accepted}")
    if found:
        return found
    return [f"{host}: {message}" for message in combination_problems(values(data, settings), frozenset(groups))]


# Keys whose catalog default and user value combine: the user's entry wins per variable or per
# package, so setting one more variable does not drop a variable the model needs.
MERGED_BY_NAME = {"vllm_env": lambda name: name, "vllm_extra_packages": catalog.package_name}


def values(data: Mapping[str, Any], settings: dict[str, Setting]) -> dict[str, Any]:
    """One host's settings, in three layers: each role's defaults, then the catalog's defaults
    for the model (files/catalog.yaml: its settings, and the vLLM release it was checked with),
    then what the user set, which always wins.

    A catalog name (``glm-4.7-flash``) becomes the model's Hugging Face repo id. The catalog's
    version-dependent defaults apply only to the real ``vllm`` package.
    """
    user = dict(data)
    result = {key: setting.default for key, setting in settings.items()}
    entry = catalog.find(user.get("model", result["model"]))
    from_catalog: dict[str, Any] = {}
    if entry is not None:
        if user.get("model", "").lower() == entry.name:
            user["model"] = entry.hf
        package = user.get("vllm_package", result["vllm_package"])
        if package == "vllm":
            # The release the catalog checked the model with, unless the user pins one.
            result["vllm_version"] = str(entry.vllm_checked)
        release = Version(user.get("vllm_version", result["vllm_version"])) if package == "vllm" else None
        from_catalog = entry.defaults_for(release)
    result.update(from_catalog)
    if user.get("vllm_group") and not user.get("vllm_group_address") and is_ip(user.get("ssh_hostname")):
        # A rank's address on the group's network: where SSH reaches it, unless the user says otherwise.
        result["vllm_group_address"] = user["ssh_hostname"]
    for key in settings.keys() & user.keys():
        name_of = MERGED_BY_NAME.get(key)
        if key not in from_catalog or name_of is None:
            result[key] = user[key]
        elif isinstance(user[key], dict):
            result[key] = {**from_catalog[key], **user[key]}
        else:
            names = {name_of(item) for item in user[key]}
            result[key] = [item for item in from_catalog[key] if name_of(item) not in names] + list(user[key])
    return result


def combination_problems(cfg: dict[str, Any], groups: frozenset[str] = frozenset()) -> Iterable[str]:
    """Values that are each fine alone but cannot work together (each role's ``combination_problems``)."""
    for role in registered_roles():
        if hasattr(role, "combination_problems"):
            yield from role.combination_problems(cfg, groups)


def resolve(data: Mapping[str, Any], host: str = "localhost") -> HostConfig:
    """Validate one host's data and fill in defaults; raise ConfigError listing every problem."""
    found = problems(data, host)
    if found:
        raise ConfigError(format_problems(found))
    return HostConfig(host, values(data, all_settings()))


def format_problems(found: list[str]) -> str:
    return "invalid configuration, no host was changed:\n  " + "\n  ".join(found)


# State -> its inventory's validated configurations, by host name.
_VALIDATED: WeakKeyDictionary[State, dict[str, HostConfig]] = WeakKeyDictionary()


def host_data(host) -> dict[str, Any]:
    """A pyinfra host's merged data (override > host > groups > all) as a plain dict."""
    return dict(host.data.dict())


def validate_inventory(inventory) -> dict[str, HostConfig]:
    """Check every host of a pyinfra inventory; raise one ConfigError naming every problem.

    Once per run: pyinfra executes deploy.py once per host, and checking the whole inventory each
    time made a run's planning grow with the square of the fleet. Each run has its own State.
    """
    state = getattr(inventory, "state", None)
    if state in _VALIDATED:
        return _VALIDATED[state]
    found, configs = [], {}
    for host in inventory:
        data = host_data(host)
        host_problems = problems(data, host.name, host.groups)
        if host_problems:
            found.extend(host_problems)
        else:
            configs[host.name] = HostConfig(host.name, values(data, all_settings()))
    if not found:
        found = groups.group_problems(configs, secret_keys())
    if found:
        raise ConfigError(format_problems(found))
    if state is not None:
        _VALIDATED[state] = configs
    return configs


def replica_group(host) -> groups.ReplicaGroup | None:
    """The replica group a pyinfra host is a rank of (None: it serves alone), from its
    inventory's validated configurations."""
    return groups.group_of(host.name, validate_inventory(host.inventory), secret_keys())


def host_config(host) -> HostConfig:
    """The validated settings of a pyinfra host: those of its run's ``validate_inventory``,
    else its data validated now."""
    state = getattr(host, "state", None)  # None: a host of an inventory that no run has taken up
    validated = _VALIDATED.get(state, {}) if state is not None else {}
    return validated[host.name] if host.name in validated else resolve(host_data(host), host.name)


def documented(settings: tuple[Setting, ...]):
    """Append the role's keys to its docstring, the way pyinfra documents operation arguments."""

    def decorate(func):
        lines = [f"+ {s.name}: {s.doc} (default: {s.default!r})" for s in settings]
        func.__doc__ = (func.__doc__ or "").rstrip() + "\n\nData keys:\n\n" + "\n".join(lines) + "\n"
        return func

    return decorate


def settings_table() -> str:
    """The Markdown table of every key, as README.md carries it (a test keeps the two equal)."""
    rows = ["| key | role | default | meaning | accepted |", "|---|---|---|---|---|"]
    for role in registered_roles():
        role_name = role.__name__.rsplit(".", 1)[-1]
        for s in getattr(role, "SETTINGS", ()):
            cells = (s.name, role_name, repr(s.default), s.doc, s.accepted)
            rows.append(
                "| " + " | ".join(f"`{c}`" if i in (0, 2) else c for i, c in enumerate(cells)).replace("\n", " ") + " |"
            )
    return "\n".join(rows)
