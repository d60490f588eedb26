"""prometheus: the fleet's Prometheus, from the distribution's package, on the hosts of the
inventory group ``monitoring``; the fleet is then monitored: every host runs the exporters.

Scrape targets are generated from the inventory, one file per job (``file_sd``): every serving
endpoint's ``/metrics`` (``vllm``), the gateways' nginx (``gateway``), every host's node exporter
(``node``) and the GPU hosts' dcgm-exporter (``dcgm``), each target labelled with its host's
inventory name (``host``). Prometheus watches those files and picks up a changed one by
itself: a host added to the inventory becomes a target without a reload or restart. The
configuration and the alert rules are checked by ``promtool`` before they replace the
installed ones, then Prometheus reloads them and the deploy waits until they are in force.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from io import StringIO

import jinja2
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from glmfleet import FILES, checks, filesyntax
from glmfleet.config import HostConfig, Setting, documented, host_config, replica_group
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.network import ListeningPorts
from glmfleet.facts.paths import ManagedPaths
from glmfleet.layout import (
    PROMETHEUS,
    PROMETHEUS_CONFIG,
    PROMETHEUS_CONSOLE,
    PROMETHEUS_DEFAULTS,
    PROMETHEUS_RULES,
    PROMETHEUS_RULES_NAME,
    PROMETHEUS_TARGETS_DIR,
    PROMETHEUS_UNIT,
    PROMTOOL,
    STAGED_PROMETHEUS_CONFIG,
    STAGED_PROMETHEUS_RULES,
    STAGING_DIR,
    local_url,
)
from glmfleet.operations import (
    PackagedDaemon,
    daemon_installed,
    directory,
    port_taken,
    service_running,
    upload,
)
from glmfleet.shell import join, quote
from roles.dcgm_exporter import enabled as runs_dcgm
from roles.gateway import GATEWAY_GROUP, reach_address, upstream_address

MONITORING_GROUP = "monitoring"
DAEMON = PackagedDaemon("prometheus", PROMETHEUS, PROMETHEUS_UNIT, PROMETHEUS_DEFAULTS)
RULES_TEMPLATE = FILES / "prometheus-alerts.yml.j2"
CONSOLE = FILES / "prometheus-console.html"
JOBS = ("vllm", "gateway", "node", "dcgm")
RELOAD_WAIT_S = 60

alertmanager = checks.Check(
    lambda v: isinstance(v, str) and checks.is_url(f"http://{v}") and ":" in v and "/" not in v and "@" not in v,
    "'host:port'",
)

SETTINGS = (
    Setting(
        "prometheus_listen_address",
        "127.0.0.1",
        "address Prometheus listens on (hosts of the `monitoring` group); its web UI and API have no login: keep it "
        "on loopback (reach it through `ssh -L`) or a trusted network",
        checks.listen_address,
    ),
    Setting("prometheus_port", 9090, "TCP port Prometheus listens on", checks.int_in(1, 65535)),
    Setting(
        "prometheus_scrape_interval",
        15,
        "seconds between two scrapes of a target (and between two evaluations of the alert rules)",
        checks.int_in(1, 3600),
    ),
    Setting("prometheus_retention_days", 15, "days of metrics Prometheus keeps", checks.int_in(1, 3650)),
    Setting(
        "prometheus_alert_kv_cache_usage",
        0.95,
        "KV cache usage (0-1) above which, for 5 minutes, VllmKvCacheNearFull fires",
        checks.number_in(0, 1),
    ),
    Setting(
        "prometheus_alert_requests_waiting",
        50,
        "requests waiting on one vLLM above which, for 5 minutes, VllmRequestsQueueing fires",
        checks.int_in(0, 10**6),
    ),
    Setting(
        "prometheus_alertmanagers",
        [],
        "Alertmanagers Prometheus sends its alerts to, as host:port (none: alerts show in Prometheus's UI only)",
        checks.list_of(alertmanager, "a list of 'host:port' strings"),
    ),
)


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    if MONITORING_GROUP not in groups:
        return []
    ports = {key: cfg[key] for key in ("prometheus_port", "vllm_port", "node_exporter_port")}
    if GATEWAY_GROUP in groups:
        ports.update({key: cfg[key] for key in ("gateway_port", "gateway_exporter_port", "gateway_status_port")})
    taken = [key for key, port in ports.items() if key != "prometheus_port" and port == cfg["prometheus_port"]]
    return [
        f"prometheus_port = {cfg['prometheus_port']} is also {key} on this host: set prometheus_port to another port"
        for key in taken
    ]


def monitored(inventory) -> bool:
    """A fleet is monitored when its inventory has a ``monitoring`` group: every host then runs
    the exporters."""
    return any(MONITORING_GROUP in member.groups for member in inventory)


# --- the targets, from the inventory ----------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One thing to scrape: the inventory name of its host and where Prometheus reaches it."""

    host: str
    address: str


def serving_endpoints(inventory) -> list[Target]:
    """Every endpoint that serves the OpenAI API, whose ``/metrics`` is vLLM's (public in every
    vLLM release, like ``/health``: scraped without the API key): every host, but a replica
    group's headless ranks, which serve no API (the group's engine metrics are its head's)."""
    return [
        Target(member.name, upstream_address(member.name, member.data.dict(), host_config(member)))
        for member in inventory
        if (group := replica_group(member)) is None or member.name in group.endpoints()
    ]


def scrape_targets(inventory, endpoints: list[Target]) -> dict[str, list[Target]]:
    """Each job's targets: the serving ``endpoints``, the gateways, every host's node exporter,
    and dcgm-exporter where it runs (``dcgm_exporter.enabled``)."""
    jobs: dict[str, list[Target]] = {"vllm": list(endpoints), "gateway": [], "node": [], "dcgm": []}
    for member in inventory:
        cfg, data = host_config(member), member.data.dict()
        jobs["node"].append(
            Target(
                member.name, reach_address(member.name, data, cfg.node_exporter_listen_address, cfg.node_exporter_port)
            )
        )
        if GATEWAY_GROUP in member.groups:
            jobs["gateway"].append(
                Target(
                    member.name,
                    reach_address(member.name, data, cfg.gateway_exporter_listen_address, cfg.gateway_exporter_port),
                )
            )
        if runs_dcgm(cfg):
            jobs["dcgm"].append(
                Target(
                    member.name,
                    reach_address(member.name, data, cfg.dcgm_exporter_listen_address, cfg.dcgm_exporter_port),
                )
            )
    return jobs


def render_targets(targets: list[Target]) -> str:
    """A file_sd file: each target with its host's name as the ``host`` label."""
    return filesyntax.json_document([{"targets": [t.address], "labels": {"host": t.host}} for t in targets])


def targets_file(job: str) -> str:
    return f"{PROMETHEUS_TARGETS_DIR}/{job}.json"


# --- Prometheus's own files ------------------------------------------------------------------------


def flags(cfg: HostConfig) -> list[str]:
    """Debian's defaults otherwise (configuration, storage and console paths); no lifecycle API
    (its /-/quit needs no login): reloads go through systemd."""
    return [
        f"--web.listen-address={filesyntax.host_port(cfg.prometheus_listen_address, cfg.prometheus_port)}",
        f"--storage.tsdb.retention.time={cfg.prometheus_retention_days}d",
    ]


def render_config(cfg: HostConfig) -> str:
    interval = f"{cfg.prometheus_scrape_interval}s"
    config: dict = {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": interval,
            "scrape_timeout": f"{min(cfg.prometheus_scrape_interval, 10)}s",
        },
        # Beside this file, named relatively: promtool checks the staged pair as it will be installed.
        "rule_files": [PROMETHEUS_RULES_NAME],
    }
    if cfg.prometheus_alertmanagers:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": list(cfg.prometheus_alertmanagers)}]}]}
    own = local_url(cfg.prometheus_listen_address, cfg.prometheus_port).removeprefix("http://")
    config["scrape_configs"] = [
        {"job_name": "prometheus", "static_configs": [{"targets": [own], "labels": {"host": cfg.host}}]},
        *({"job_name": job, "file_sd_configs": [{"files": [targets_file(job)]}]} for job in JOBS),
    ]
    return filesyntax.yaml_document(
        config,
        "Managed by glmfleet (roles/prometheus.py): edits here are replaced on the next deploy.\n"
        f"The targets are in {PROMETHEUS_TARGETS_DIR}, generated from the inventory.",
    )


def render_rules(cfg: HostConfig) -> str:
    # << >> for glmfleet's values: {{ }} is Prometheus's own template syntax in the annotations.
    environment = jinja2.Environment(
        variable_start_string="<<",
        variable_end_string=">>",
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return environment.from_string(RULES_TEMPLATE.read_text()).render(
        kv_cache_usage=cfg.prometheus_alert_kv_cache_usage, requests_waiting=cfg.prometheus_alert_requests_waiting
    )


def install_command() -> str:
    """Put the staged rules and configuration in place only once promtool accepts them: a file
    Prometheus would refuse never replaces one that works (a reload of a bad file still exits 0)."""
    steps = [f"{quote(PROMTOOL)} check rules {quote(STAGED_PROMETHEUS_RULES)}"]
    steps.append(f"{quote(PROMTOOL)} check config {quote(STAGED_PROMETHEUS_CONFIG)}")
    for staged, final in ((STAGED_PROMETHEUS_RULES, PROMETHEUS_RULES), (STAGED_PROMETHEUS_CONFIG, PROMETHEUS_CONFIG)):
        new = quote(f"{final}.glmfleet-new")
        steps.append(f"install -o root -g root -m 644 {quote(staged)} {new} && mv -f {new} {quote(final)}")
    return " && ".join(steps)


# Waits until Prometheus has loaded its configuration since a moment (argv: URL, unix time,
# seconds to wait): its own metrics say when it last loaded one successfully.
LOADED_PROGRAM = """
import sys, time, urllib.request
url, since, deadline = sys.argv[1] + "/metrics", float(sys.argv[2]), time.monotonic() + float(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while time.monotonic() < deadline:
    try:
        lines = opener.open(url, timeout=5).read().decode().splitlines()
    except OSError:
        lines = []
    found = dict(line.split(" ", 1) for line in lines if line.startswith("prometheus_config_last_reload_"))
    if float(found.get("prometheus_config_last_reload_success_timestamp_seconds", 0)) >= since:
        sys.exit(0)
    time.sleep(0.1)
sys.exit(f"Prometheus did not load its new configuration within {sys.argv[3]} s")
"""


def reload_command(cfg: HostConfig) -> str:
    """Reload through systemd (SIGHUP) and wait until the new configuration is in force; a
    reload Prometheus refuses fails the host with the journal's last lines."""
    unit = quote(PROMETHEUS_UNIT)
    journal = join(["journalctl", "--unit", PROMETHEUS_UNIT, "--lines", str(cfg.verify_journal_lines), "--no-pager"])
    url = local_url(cfg.prometheus_listen_address, cfg.prometheus_port)
    return (
        f"since=$(date +%s); systemctl reload {unit} && "
        f'python3 -c {quote(LOADED_PROGRAM)} {quote(url)} "$since" {RELOAD_WAIT_S} || '
        f"{{ echo {quote(f'--- last lines of the {PROMETHEUS_UNIT} journal:')} >&2; {journal} >&2; exit 1; }}"
    )


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def questions(cfg: HostConfig) -> dict[str, Question]:
    paths = [
        PROMETHEUS,
        PROMETHEUS_DEFAULTS,
        PROMETHEUS_CONFIG,
        PROMETHEUS_RULES,
        PROMETHEUS_CONSOLE,
        PROMETHEUS_TARGETS_DIR,
        STAGING_DIR,
        *(targets_file(job) for job in JOBS),
    ]
    return {
        "managed": Question(ManagedPaths, {"paths": paths, "units": [PROMETHEUS_UNIT]}),
        "listeners": Question(ListeningPorts, {"port": cfg.prometheus_port}),
    }


@deploy("Prometheus")
@documented(SETTINGS)
def prometheus(endpoints: list[Target] | None = None):
    """
    Run the distribution's Prometheus with glmfleet's configuration, alert rules, scrape targets
    and fleet page (``/consoles/glmfleet.html``).

    + endpoints: the serving endpoints to scrape (default: ``serving_endpoints``, every host)

    Its flags are written before its package is installed; a change of them restarts it. The
    targets files are replaced each in one rename, and Prometheus re-reads them by itself. The
    rules and configuration are staged and checked by ``promtool`` before they replace the
    installed ones, then reloaded, and the deploy waits until they are in force. A converged
    host plans nothing.
    """
    cfg = host_config(host)
    answers = ask_together(host, questions(cfg))
    managed = answers["managed"]
    if port_taken(answers["listeners"], cfg.prometheus_port, "prometheus_port", PROMETHEUS_UNIT):
        return
    changes = daemon_installed(managed, DAEMON, flags(cfg), "Prometheus")
    directory(managed, PROMETHEUS_TARGETS_DIR, name=f"scrape targets {PROMETHEUS_TARGETS_DIR}")
    jobs = scrape_targets(host.inventory, serving_endpoints(host.inventory) if endpoints is None else endpoints)
    for job, targets in jobs.items():
        upload(managed, targets_file(job), render_targets(targets), name=f"{job} targets", atomic=True)
    upload(managed, PROMETHEUS_CONSOLE, CONSOLE, name=f"fleet page {PROMETHEUS_CONSOLE}")

    config, rules = render_config(cfg), render_rules(cfg)
    installed = None
    differ = [
        path
        for path, text in ((PROMETHEUS_CONFIG, config), (PROMETHEUS_RULES, rules))
        if managed["paths"].get(path, {}).get("sha256") != sha256(text)
    ]
    if differ:
        directory(managed, STAGING_DIR, name="glmfleet staging dir")
        for staged, text in ((STAGED_PROMETHEUS_RULES, rules), (STAGED_PROMETHEUS_CONFIG, config)):
            files.put(name=f"{staged} staged", src=StringIO(text), dest=staged, user="root", group="root", mode="644")
        installed = server.shell(
            name="Prometheus configuration and rules, checked by promtool", commands=[install_command()]
        )
    started = service_running(
        managed,
        PROMETHEUS_UNIT,
        changes,
        cfg.prometheus_port,
        cfg.verify_journal_lines,
        "Prometheus",
        (PROMETHEUS_DEFAULTS,),
    )
    # A (re)start reads the new configuration; a running Prometheus reloads it.
    if installed and not started:
        server.shell(
            name="reload Prometheus, wait until the new configuration is in force", commands=[reload_command(cfg)]
        )
