"""gateway_exporter: the gateway's nginx counters (connections, requests) for Prometheus, from the
distribution's ``prometheus-nginx-exporter``, on the gateway hosts of a monitored fleet.

nginx serves its ``stub_status`` page on loopback only; the exporter turns it into metrics.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from glmfleet import checks, filesyntax
from glmfleet.config import HostConfig, Setting, documented, host_config
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.network import ListeningPorts
from glmfleet.facts.paths import ManagedPaths
from glmfleet.layout import (
    NGINX_EXPORTER,
    NGINX_EXPORTER_DEFAULTS,
    NGINX_EXPORTER_UNIT,
    NGINX_STATUS_CONFIG,
    NGINX_UNIT,
)
from glmfleet.operations import PackagedDaemon, daemon_installed, port_taken, service_running, upload
from roles.gateway import GATEWAY_GROUP, reload_command

DAEMON = PackagedDaemon("prometheus-nginx-exporter", NGINX_EXPORTER, NGINX_EXPORTER_UNIT, NGINX_EXPORTER_DEFAULTS)
# The exporter exits when nginx does not answer at its start: it waits for nginx a while instead.
NGINX_WAIT = ["-nginx.retries=30", "-nginx.retry-interval=1s"]

SETTINGS = (
    Setting(
        "gateway_exporter_listen_address",
        "0.0.0.0",
        "address the gateway's exporter listens on (Prometheus on the monitoring hosts must reach it)",
        checks.listen_address,
    ),
    Setting("gateway_exporter_port", 9113, "TCP port the gateway's exporter listens on", checks.int_in(1, 65535)),
    Setting(
        "gateway_status_port",
        8079,
        "TCP port of nginx's status page on 127.0.0.1, which only the exporter reads",
        checks.int_in(1, 65535),
    ),
)


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    ports = {
        "gateway_port": cfg["gateway_port"],
        "gateway_exporter_port": cfg["gateway_exporter_port"],
        "gateway_status_port": cfg["gateway_status_port"],
    }
    if GATEWAY_GROUP in groups and len(set(ports.values())) < len(ports):
        return [
            "gateway_port, gateway_exporter_port and gateway_status_port must differ on a gateway host, not "
            + ", ".join(f"{key} = {port}" for key, port in ports.items())
        ]
    return []


def render_status_page(cfg: HostConfig) -> str:
    return (
        "# Managed by glmfleet: nginx's connection and request counters for prometheus-nginx-exporter,\n"
        "# on loopback only.\n"
        "server {\n"
        f"    listen 127.0.0.1:{cfg.gateway_status_port};\n"
        "    access_log off;\n"
        "    location = /stub_status { stub_status; }\n"
        "    location / { return 404; }\n"
        "}\n"
    )


def flags(cfg: HostConfig) -> list[str]:
    return [
        f"-web.listen-address={filesyntax.host_port(cfg.gateway_exporter_listen_address, cfg.gateway_exporter_port)}",
        f"-nginx.scrape-uri=http://127.0.0.1:{cfg.gateway_status_port}/stub_status",
        *NGINX_WAIT,
    ]


def questions(cfg: HostConfig) -> dict[str, Question]:
    return {
        "managed": Question(
            ManagedPaths,
            {"paths": [NGINX_EXPORTER, NGINX_EXPORTER_DEFAULTS, NGINX_STATUS_CONFIG], "units": [DAEMON.unit]},
        ),
        "listeners": Question(ListeningPorts, {}),
    }


@deploy("gateway exporter")
@documented(SETTINGS)
def gateway_exporter():
    """
    Serve nginx's status page on loopback and run the distribution's nginx exporter on it.

    Applies after the gateway role, on a gateway host of a monitored fleet. A changed status
    page is tested and reloaded as the gateway's configuration is; the exporter's flags are
    written before its package is installed; it is (re)started when they change and waited for
    until it listens. A converged host plans nothing.
    """
    cfg = host_config(host)
    answers = ask_together(host, questions(cfg))
    managed, listeners = answers["managed"], answers["listeners"]
    if port_taken(listeners, cfg.gateway_exporter_port, "gateway_exporter_port", DAEMON.unit) or port_taken(
        listeners, cfg.gateway_status_port, "gateway_status_port", NGINX_UNIT
    ):
        return
    if upload(managed, NGINX_STATUS_CONFIG, render_status_page(cfg), name=f"nginx status page {NGINX_STATUS_CONFIG}"):
        server.shell(name="reload nginx for its status page", commands=[reload_command()])
    changes = daemon_installed(managed, DAEMON, flags(cfg), "gateway exporter")
    service_running(
        managed,
        DAEMON.unit,
        changes,
        cfg.gateway_exporter_port,
        cfg.verify_journal_lines,
        "gateway exporter",
        (DAEMON.defaults,),
    )
