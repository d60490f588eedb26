"""gateway: one OpenAI-compatible entry point for the fleet, nginx from the distribution.

It runs on the hosts of the inventory group ``gateway``; its upstreams are every serving endpoint
of the inventory (a host, or the API servers of a replica group), one upstream per served model
name. A rollout takes a host (or a whole group) out of the pool (``down``) before draining it
and puts it back once it is verified.
"""

from __future__ import annotations

import json
import re

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.util import get_template
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from glmfleet import FILES, checks, filesyntax
from glmfleet.config import HostConfig, Setting, documented, host_config, replica_group
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.network import ListeningPorts, port_holders
from glmfleet.facts.paths import ManagedPaths
from glmfleet.layout import (
    GATEWAY_CONFIG as CONFIG_PATH,
)
from glmfleet.layout import (
    GATEWAY_KEYS as KEYS_PATH,
)
from glmfleet.layout import (
    NGINX,
    NGINX_ERROR_LOG,
    NGINX_PID,
    NGINX_UNIT,
)
from glmfleet.layout import (
    NGINX_DEFAULT_SITE as DEFAULT_SITE,
)
from glmfleet.operations import apt_install, planned, stop_host, upload
from glmfleet.shell import quote
from roles.vllm_service import served_model_name

GATEWAY_GROUP = "gateway"
TEMPLATE = FILES / "nginx-gateway.conf.j2"

# One refused or dropped connection rests a host for FAIL_TIMEOUT_S (nginx open source has no
# active health checks: this passive check and the rollout's explicit pool edits stand in).
MAX_FAILS = 1
FAIL_TIMEOUT_S = 10
NEXT_UPSTREAM_TRIES = 3
CONNECT_TIMEOUT_S = 2
MAX_BODY = "32m"  # long contexts and base64 images; held in memory per request
RELOAD_WAIT_S = 30

# Names the gateway can match in a JSON body and put in its configuration unescaped.
ROUTABLE_NAME = re.compile(r"[A-Za-z0-9._:@+/-]+")

SETTINGS = (
    Setting(
        "gateway_listen_address",
        "127.0.0.1",
        "address the gateway listens on (hosts of the `gateway` group; "
        "another than loopback needs vllm_api_key, or vllm_allow_unauthenticated)",
        checks.listen_address,
    ),
    Setting("gateway_port", 8080, "TCP port the gateway listens on", checks.int_in(1, 65535)),
    Setting(
        "gateway_request_timeout",
        600,
        "seconds the gateway waits on an upstream (a long generation)",
        checks.int_in(10, 86400),
    ),
)


def listens_on(address: str, port: int, other_address: str, other_port: int) -> bool:
    """Whether two listeners on one host collide: the same port where either takes every address."""
    return port == other_port and (
        address == other_address or "0.0.0.0" in (address, other_address) or "::" in (address, other_address)
    )


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    found = []
    if GATEWAY_GROUP in groups and listens_on(
        cfg["gateway_listen_address"], cfg["gateway_port"], cfg["vllm_host"], cfg["vllm_port"]
    ):
        found.append(
            f"gateway_port = {cfg['gateway_port']} on {cfg['gateway_listen_address']} is also vllm_port on "
            f"{cfg['vllm_host']} of this host, which serves and runs the gateway: set gateway_port to another port"
        )
    name = cfg["vllm_served_model_name"] or cfg["model"]
    if not ROUTABLE_NAME.fullmatch(name):
        key = "vllm_served_model_name" if cfg["vllm_served_model_name"] else "model"
        found.append(f"{key} = {name!r} cannot be routed by the gateway; use letters, digits and . _ : @ + / -")
    if (
        not checks.is_loopback(cfg["gateway_listen_address"])
        and not cfg["vllm_api_key"]
        and not cfg["vllm_allow_unauthenticated"]
    ):
        found.append(
            f"gateway_listen_address = {cfg['gateway_listen_address']!r} lets every client that reaches the gateway "
            "use the fleet, and vllm_api_key is not set: set vllm_api_key, or vllm_allow_unauthenticated: true if "
            "the network is trusted"
        )
    return found


def reach_address(name: str, data: dict, listen_address: str, port: int) -> str:
    """Where other hosts reach a server that listens on ``listen_address`` and ``port`` of the
    host ``name`` (pyinfra ``data``): that address, or for a wildcard the address pyinfra
    reaches the host at."""
    address = listen_address
    if address in ("0.0.0.0", "::"):
        address = data.get("ssh_hostname") or name
    return filesyntax.host_port(address, port)


def upstream_address(name: str, data: dict, cfg: HostConfig) -> str:
    """Where the gateway reaches a host's vLLM."""
    return reach_address(name, data, cfg.vllm_host, cfg.vllm_port)


def pool(inventory, out_of_pool=frozenset()) -> list[dict]:
    """The upstreams: per served model name (in inventory order), its endpoints (a host, or a
    replica group's API servers) and whether each is in the pool: a group's endpoints only while
    none of its ranks is out of it."""
    models: dict[str, list[dict]] = {}
    for member in inventory:
        cfg = host_config(member)
        group = replica_group(member)
        if group is not None and member.name not in group.endpoints():
            continue  # a headless rank serves no API
        ranks = group.ranks if group is not None else (member.name,)
        models.setdefault(served_model_name(cfg), []).append(
            {
                "host": member.name,
                "address": upstream_address(member.name, member.data.dict(), cfg),
                "in_pool": not set(ranks) & set(out_of_pool),
            }
        )
    return [
        {"name": name, "upstream": f"glmfleet_model_{index}", "pattern": re.escape(name), "servers": servers}
        for index, (name, servers) in enumerate(models.items())
    ]


def render_config(cfg: HostConfig, models: list[dict]) -> str:
    listen = cfg.gateway_listen_address
    return get_template(str(TEMPLATE)).render(
        models=models,
        models_json=json.dumps(
            {
                "object": "list",
                "data": [{"id": model["name"], "object": "model", "owned_by": "glmfleet"} for model in models],
            }
        ),
        listen=f"[{listen}]:{cfg.gateway_port}" if ":" in listen else f"{listen}:{cfg.gateway_port}",
        api_key=cfg.vllm_api_key,
        keys_file=KEYS_PATH,
        max_fails=MAX_FAILS,
        fail_timeout=FAIL_TIMEOUT_S,
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=cfg.gateway_request_timeout,
        next_upstream_tries=NEXT_UPSTREAM_TRIES,
        max_body=MAX_BODY,
    )


def render_keys(api_key: str | None) -> str:
    """The `map` entries that let a client in: the exact Authorization header value."""
    lines = ["# Managed by glmfleet. Root-only: it holds the API key."]
    if api_key:
        lines.append(f"{filesyntax.nginx_string(f'Bearer {api_key}')} 1;")
    return "\n".join(lines) + "\n"


def reload_command() -> str:
    """Reload nginx and return only once the new configuration is in force.

    `nginx -s reload` returns at once, and the old workers keep taking requests until the
    master has started new ones and told the old ones to stop: a drain that began earlier could
    still see new requests arrive. So: wait until every worker from before the reload has exited
    or is shutting down (it then only finishes the requests it has). A new configuration the
    master cannot apply (a port it cannot bind) it logs as ``[emerg]`` and keeps the old one:
    that fails the host at once, with nginx's own words.
    """
    log = quote(NGINX_ERROR_LOG)
    return (
        "nginx -t -q || exit 1; "
        f"master=$(cat {quote(NGINX_PID)}); old=$(cat /proc/$master/task/$master/children); "
        f"logged=$(stat -c %s {log} 2>/dev/null || echo 0); "
        "nginx -s reload || exit 1; "
        f"for i in $(seq {RELOAD_WAIT_S * 20}); do left=; "
        "for p in $old; do case \"$(tr '\\0' ' ' < /proc/$p/cmdline 2>/dev/null)\" in "
        "''|*'is shutting down'*) ;; *) left=1;; esac; done; "
        'test -z "$left" && exit 0; '
        f"if tail -c +$((logged + 1)) {log} 2>/dev/null | grep -F '[emerg]' >&2; then "
        f"echo {quote('nginx kept its old configuration: it could not apply the new one (above)')} >&2; exit 1; fi; "
        "sleep 0.05; done; "
        f"echo {quote(f'nginx kept its old workers for {RELOAD_WAIT_S} s: see {NGINX_ERROR_LOG}')}; exit 1"
    )


def questions(cfg: HostConfig) -> dict[str, Question]:
    return {
        "managed": Question(
            ManagedPaths, {"paths": [NGINX, DEFAULT_SITE, KEYS_PATH, CONFIG_PATH], "units": [NGINX_UNIT]}
        ),
        "listeners": Question(ListeningPorts, {"port": cfg.gateway_port}),
    }


@deploy("gateway")
@documented(SETTINGS)
def gateway(out_of_pool=frozenset()):
    """
    Serve the fleet's OpenAI-compatible API from nginx on this host.

    + out_of_pool: names of hosts to mark ``down`` (a rollout drains them); none by default

    nginx checks the API key (``vllm_api_key``) at the edge from a root-only file, routes each
    request by its ``model`` to that model's hosts and retries another host on a connection
    error. A changed configuration is tested and reloaded, and the reload waits until the old
    workers take no more requests; a converged gateway changes nothing.
    """
    cfg = host_config(host)
    answers = ask_together(host, questions(cfg))
    managed = answers["managed"]
    holders = port_holders(answers["listeners"], cfg.gateway_port, NGINX_UNIT)
    if holders:
        stop_host(
            name=f"stop: gateway_port {cfg.gateway_port} is taken",
            reason=(
                f"gateway_port = {cfg.gateway_port} is already in use by {' and '.join(holders)}: set gateway_port to a free "
                "port, or stop what holds it"
            ),
        )
        return
    nginx = managed["units"].get(NGINX_UNIT, {"enabled": False, "running": False})
    # Refresh apt only when something must be installed: a converged host reports no change.
    installing = NGINX not in managed["paths"]
    if installing:
        apt_install(name="nginx", packages={"nginx": None})
    # The distribution's welcome site would listen on port 80 beside the gateway; the package
    # being installed in this run brings it along.
    default_site = None
    if installing or DEFAULT_SITE in managed["paths"]:
        default_site = files.link(name="no default site", path=DEFAULT_SITE, present=False)
    keys = upload(
        managed, KEYS_PATH, render_keys(cfg.vllm_api_key), mode="600", name=f"API keys {KEYS_PATH}", secret=True
    )
    config = upload(
        managed,
        CONFIG_PATH,
        render_config(cfg, pool(host.inventory, out_of_pool)),
        name=f"gateway config {CONFIG_PATH}",
    )
    if not (nginx["enabled"] and nginx["running"]):
        systemd.service(name="nginx running", service=NGINX_UNIT, running=True, enabled=True)
    changed = planned(default_site, keys, config)
    # An nginx not running before this run may be started before the configuration is written
    # (the package starts it on install), so it reloads in any case; a running one on a change.
    if changed or not nginx["running"]:
        server.shell(
            name="reload nginx, wait until the new pool is in force",
            commands=[reload_command()],
            _if=[any_changed(*changed)] if nginx["running"] else [],
        )
