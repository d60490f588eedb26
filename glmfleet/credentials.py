"""Credentials that site URLs carry (``https://user:token@mirror/...``), moved out of every
command line: the hosts' tools read them from root-only files in netrc syntax instead
(``layout.NETRC`` for uv, pip and curl through ``NETRC``/``--netrc-file``; ``layout.APT_AUTH``
for apt), and every URL reaches a command, a file or the output without them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from glmfleet.checks import url_credentials
from glmfleet.config import all_settings
from glmfleet.layout import NETRC

# netrc and apt's auth.conf split tokens on whitespace and know no quoting that every reader shares.
NETRC_TOKEN = re.compile(r"[^\s\"'\\#]+")


@dataclass(frozen=True)
class Login:
    host: str
    user: str
    password: str
    key: str  # the setting it came from


def url_keys() -> list[str]:
    """The settings that hold URLs (their check says so)."""
    return [setting.name for setting in all_settings().values() if setting.check.urls]


def urls_of(cfg: Mapping[str, Any], url_keys: Iterable[str]) -> Iterable[tuple[str, str]]:
    for key in url_keys:
        value = cfg.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                yield key, item


def logins(cfg: Mapping[str, Any]) -> list[Login]:
    """One login per host, from the URL settings that carry credentials."""
    found: dict[str, Login] = {}
    for key, url in urls_of(cfg, url_keys()):
        credentials = url_credentials(url)
        if credentials is not None and credentials[0] not in found:
            found[credentials[0]] = Login(*credentials, key=key)
    return sorted(found.values(), key=lambda login: login.host)


def tool_environment(cfg: Mapping[str, Any]) -> dict[str, str]:
    """What uv and pip need to find the logins: ``NETRC``, where any URL carries one."""
    return {"NETRC": NETRC} if logins(cfg) else {}


def problems(cfg: Mapping[str, Any]) -> list[str]:
    """Credentials the files cannot hold, or two different logins for one host."""
    found, seen = [], {}
    for key, url in urls_of(cfg, url_keys()):
        credentials = url_credentials(url)
        if credentials is None:
            continue
        host, user, password = credentials
        if not (NETRC_TOKEN.fullmatch(user) and NETRC_TOKEN.fullmatch(password)):
            found.append(
                f"{key}: the user name or password in the URL for {host} has whitespace, a quote, a backslash or "
                "#, which the netrc files that keep them out of command lines cannot hold; use a token without them"
            )
        elif host in seen and seen[host][1:] != (user, password):
            found.append(
                f"{key}: the URL for {host} carries other credentials than {seen[host][0]}'s; one host takes one "
                "login: use the same credentials in both"
            )
        seen.setdefault(host, (key, user, password))
    return found


def render_netrc(entries: list[Login]) -> str:
    """``layout.NETRC``: what uv, pip (``NETRC``) and curl (``--netrc-file``) read."""
    return "".join(f"machine {login.host} login {login.user} password {login.password}\n" for login in entries)


def render_apt_auth(entries: list[Login]) -> str:
    """``layout.APT_AUTH``, apt_auth.conf(5): a machine without a scheme matches https only."""
    return "".join(
        f"machine {scheme}://{login.host} login {login.user} password {login.password}\n"
        for login in entries
        for scheme in ("https", "http")
    )
