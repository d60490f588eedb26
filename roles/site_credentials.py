"""site_credentials: the credentials that site URLs carry, in root-only files on the host, so
that no command line, file or output ever holds them (glmfleet/credentials.py)."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from glmfleet import credentials
from glmfleet.config import HostConfig, host_config
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.paths import ManagedPaths
from glmfleet.layout import APT_AUTH, NETRC, SECRETS_DIR
from glmfleet.operations import directory, upload
from glmfleet.shell import quote


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    return credentials.problems(cfg)


def questions(cfg: HostConfig) -> dict[str, Question]:
    return {"managed": Question(ManagedPaths, {"paths": [SECRETS_DIR, NETRC, APT_AUTH]})}


@deploy("site credentials")
def site_credentials():
    """
    Write the logins of every URL setting that carries ``user:password@`` into root-only files
    in netrc syntax: ``/etc/glmfleet/netrc`` (uv, pip, curl) and apt's auth.conf.d; remove them
    where no URL carries one any more. A converged host plans nothing.
    """
    cfg = host_config(host)
    managed = ask_together(host, questions(cfg))["managed"]
    entries = credentials.logins(cfg)
    if not entries:
        present = [path for path in (NETRC, APT_AUTH) if path in managed["paths"]]
        if present:
            server.shell(name="no site credentials any more", commands=[f"rm -f {' '.join(map(quote, present))}"])
        return
    directory(managed, SECRETS_DIR, mode="700", name="root-only secrets dir")
    upload(managed, NETRC, credentials.render_netrc(entries), mode="600", name=f"site credentials {NETRC}", secret=True)
    upload(
        managed,
        APT_AUTH,
        credentials.render_apt_auth(entries),
        mode="600",
        name=f"apt credentials {APT_AUTH}",
        secret=True,
    )
