"""node_exporter: the host's own metrics (CPU, memory, disks, network) for Prometheus, from the
distribution's ``prometheus-node-exporter``, on every host of a monitored fleet (an inventory
with a ``monitoring`` group)."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from glmfleet import checks, filesyntax
from glmfleet.config import HostConfig, Setting, documented, host_config
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.network import ListeningPorts
from glmfleet.facts.paths import ManagedPaths
from glmfleet.layout import NODE_EXPORTER, NODE_EXPORTER_DEFAULTS, NODE_EXPORTER_TEXTFILES, NODE_EXPORTER_UNIT
from glmfleet.operations import PackagedDaemon, daemon_installed, directory, port_taken, service_running

DAEMON = PackagedDaemon("prometheus-node-exporter", NODE_EXPORTER, NODE_EXPORTER_UNIT, NODE_EXPORTER_DEFAULTS)

SETTINGS = (
    Setting(
        "node_exporter_listen_address",
        "0.0.0.0",
        "address the node exporter listens on (Prometheus on the monitoring hosts must reach it; "
        "it serves host metrics, no secrets)",
        checks.listen_address,
    ),
    Setting("node_exporter_port", 9100, "TCP port the node exporter listens on", checks.int_in(1, 65535)),
)


def flags(cfg: HostConfig) -> list[str]:
    """Debian's default collectors; glmfleet's own gauges (layout.GPUS_EXPECTED) from its own directory."""
    return [
        f"--web.listen-address={filesyntax.host_port(cfg.node_exporter_listen_address, cfg.node_exporter_port)}",
        f"--collector.textfile.directory={NODE_EXPORTER_TEXTFILES}",
    ]


def questions(cfg: HostConfig) -> dict[str, Question]:
    return {
        "managed": Question(
            ManagedPaths,
            {"paths": [NODE_EXPORTER, NODE_EXPORTER_DEFAULTS, NODE_EXPORTER_TEXTFILES], "units": [DAEMON.unit]},
        ),
        "listeners": Question(ListeningPorts, {"port": cfg.node_exporter_port}),
    }


@deploy("node exporter")
@documented(SETTINGS)
def node_exporter():
    """
    Run the distribution's node exporter where Prometheus can scrape it.

    Its flags are written before its package is installed, so it never listens where it was not
    told to; it is (re)started when they change and waited for until it listens. A converged
    host plans nothing.
    """
    cfg = host_config(host)
    answers = ask_together(host, questions(cfg))
    managed = answers["managed"]
    if port_taken(answers["listeners"], cfg.node_exporter_port, "node_exporter_port", DAEMON.unit):
        return
    directory(
        managed, NODE_EXPORTER_TEXTFILES, name=f"glmfleet's gauges for the node exporter: {NODE_EXPORTER_TEXTFILES}"
    )
    changes = daemon_installed(managed, DAEMON, flags(cfg), "node exporter")
    service_running(
        managed,
        DAEMON.unit,
        changes,
        cfg.node_exporter_port,
        cfg.verify_journal_lines,
        "node exporter",
        (DAEMON.defaults,),
    )
