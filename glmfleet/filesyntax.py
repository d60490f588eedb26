"""One rule per file syntax: how a value is written into each kind of file glmfleet renders
(a systemd unit's command line, a systemd or Docker environment file, nginx's configuration,
authorized_keys, known_hosts, the flags of a Debian /etc/default file, Prometheus's and Grafana's
YAML and JSON), so that the program that reads the file reads back exactly the value, or the
value is refused with the reason. Control characters never get here: the
configuration refuses them in every setting (``checks.control_characters``).
"""

from __future__ import annotations

import json
import re

import yaml

from glmfleet import checks


class Unwritable(ValueError):
    """A value this file's syntax cannot hold; the message says why."""


def no_line_breaks(value: str, where: str) -> str:
    if checks.CONTROL.search(value):
        raise Unwritable(f"{where} cannot hold a control character (a newline, tab, NUL...)")
    return value


# --- systemd unit files (systemd.service(5), systemd.syntax(7)) ---------------------------------

SYSTEMD_BARE = re.compile(r"[\w@%+=:,./$~-]+")


def systemd_word(arg: str) -> str:
    """One argument of ExecStart= (and the other settings that split words): ``%`` specifiers and
    ``$`` variables escaped, quoted where it has anything else than plain characters, and a lone
    ``;`` (which separates commands) escaped."""
    no_line_breaks(arg, "a systemd unit")
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped == ";":
        return "\\;"
    if SYSTEMD_BARE.fullmatch(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_text(value: str) -> str:
    """Free text of a unit (Description=): only ``%`` specifiers are expanded there."""
    return no_line_breaks(value, "a systemd unit").replace("%", "%%")


def systemd_command_line(argv: list[str]) -> str:
    return " ".join(systemd_word(arg) for arg in argv)


def systemd_env_line(name: str, value: str) -> str:
    """``NAME="value"`` for EnvironmentFile=: in double quotes systemd reads ``\\"``, ``\\\\``,
    ``\\$`` and ``\\``` as the character itself, so the value is read back exactly, never expanded."""
    no_line_breaks(value, "an environment file")
    return f'{name}="' + re.sub(r'(["\\\\$`])', r"\\\1", value) + '"'


def host_port(address: str, port: int) -> str:
    """``host:port`` as Go's flags, URLs and Prometheus's targets take it: an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# A word of ``$ARGS`` in ExecStart=: systemd splits the variable's value at whitespace and takes
# each piece as it is, quotes included, so only words that need no quoting are written there.
DEFAULTS_WORD = re.compile(r"[\w@%+=:,./~\[\]-]+")


def debian_defaults(args: list[str]) -> str:
    """A Debian /etc/default file for units that run ``DAEMON $ARGS``: ``ARGS="..."``, read by
    systemd's EnvironmentFile= (and by the package's init script, as sh)."""
    for arg in args:
        if not DEFAULTS_WORD.fullmatch(arg):
            raise Unwritable(f"{arg!r}: a flag in $ARGS cannot hold whitespace, quotes, $ or backslashes")
    return "# Managed by glmfleet.\n" + systemd_env_line("ARGS", " ".join(args)) + "\n"


# --- Docker's --env-file ---------------------------------------------------------------------


def docker_env_line(name: str, value: str) -> str:
    """``NAME=value``: Docker takes everything after the first ``=`` literally, to the line's end."""
    return f"{name}={no_line_breaks(value, 'a Docker env file')}"


# --- nginx configuration -----------------------------------------------------------------------


def nginx_string(value: str) -> str:
    """A double-quoted nginx string (a ``map`` source value): ``\\`` and ``"`` escaped."""
    no_line_breaks(value, "nginx's configuration")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- OpenSSH's authorized_keys and known_hosts (sshd(8)) ---------------------------------------


def authorized_keys_option(value: str) -> str:
    """A quoted option value (``command="..."``): sshd ends it at the first ``"`` not preceded by
    a backslash and has no escape for a backslash itself, so both are refused."""
    no_line_breaks(value, "authorized_keys")
    if '"' in value or "\\" in value:
        raise Unwritable("an authorized_keys option cannot hold a double quote or a backslash")
    return f'"{value}"'


def known_hosts_host(hostname: str, port: int | str) -> str:
    """A known_hosts host pattern for one host: ``[name]:port``, or the bare name on port 22.
    Only a host name or IP address: a comma, space, ``*``, ``?`` or ``!`` would make it a list
    or a pattern that matches other hosts."""
    if not checks.host_or_address(hostname):
        raise Unwritable(f"{hostname!r} is not a host name or IP address, which is all known_hosts may hold")
    return hostname if str(port) == "22" else f"[{hostname}]:{int(port)}"


# --- apt preferences (apt_preferences(5)) ------------------------------------------------------


def apt_preferences_string(value: str) -> str:
    """A double-quoted value of a Pin: line, which has no escape for a double quote."""
    no_line_breaks(value, "apt preferences")
    if '"' in value:
        raise Unwritable("an apt preferences value cannot hold a double quote")
    return f'"{value}"'


# --- YAML and JSON (Prometheus, Grafana) ---------------------------------------------------------


def yaml_document(data, comment: str = "") -> str:
    """A YAML file from plain data: every string quoted or escaped as YAML needs, so Prometheus
    and Grafana read back exactly the values (a label, a host name, a URL)."""
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000)


def json_document(data) -> str:
    """A JSON file (Prometheus's file_sd targets, Grafana dashboards): JSON's own escaping."""
    return json.dumps(data, indent=2) + "\n"
