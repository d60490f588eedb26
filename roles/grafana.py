"""grafana: Grafana from Grafana's apt repository (or a mirror), on the hosts of the
``monitoring`` group that ask for it (``grafana: true``), with the fleet's Prometheus as its
data source and vLLM's own dashboards, as vLLM publishes them for the release the fleet runs.

Without Grafana, Prometheus's own fleet page (``/consoles/glmfleet.html``) and graph page show
the fleet (README: Monitoring).
"""

from __future__ import annotations

import hashlib
import posixpath
from urllib.parse import urlsplit

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server, systemd

from glmfleet import checks, filesyntax
from glmfleet.config import HostConfig, Setting, documented, host_config
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.network import ListeningPorts
from glmfleet.facts.packages import DebPackageStates
from glmfleet.facts.paths import ManagedPaths
from glmfleet.layout import (
    GRAFANA_DASHBOARD_PROVIDER,
    GRAFANA_DASHBOARDS_ROOT,
    GRAFANA_DATASOURCES,
    GRAFANA_DROPIN,
    GRAFANA_UNIT,
    local_url,
)
from glmfleet.operations import (
    apt_hold,
    apt_install,
    apt_repository,
    apt_repository_question,
    directory,
    fetch_command,
    packages_due,
    planned,
    port_taken,
    repository_due,
    service_running,
    unheld,
    upload,
)
from glmfleet.shell import quote
from roles.container_toolkit import apt_version
from roles.prometheus import MONITORING_GROUP

GRAFANA_REPO = "https://apt.grafana.com"
# vLLM's dashboards as it publishes them at the tag of the release the fleet runs (0.22.0: these three).
VLLM_EXAMPLES = "https://raw.githubusercontent.com/vllm-project/vllm/v{vllm_version}/examples/observability"
DASHBOARDS = [
    f"{VLLM_EXAMPLES}/prometheus_grafana/grafana.json",
    f"{VLLM_EXAMPLES}/dashboards/grafana/performance_statistics.json",
    f"{VLLM_EXAMPLES}/dashboards/grafana/query_statistics.json",
]
# The data source's uid as vLLM's dashboards name their default one.
DATASOURCE_UID = "prometheus"

SETTINGS = (
    Setting(
        "grafana",
        False,
        "run Grafana on this host of the `monitoring` group, with vLLM's dashboards on the fleet's Prometheus",
        checks.boolean,
    ),
    Setting(
        "grafana_version",
        "12.4.2*",
        "Grafana version from its repository, an apt version or glob (held: it moves only in a deploy)",
        apt_version("12.4.2*"),
    ),
    Setting("grafana_repo_url", GRAFANA_REPO, "Grafana's apt repository (or a mirror)", checks.url),
    Setting("grafana_repo_key_url", GRAFANA_REPO + "/gpg-full.key", "Grafana's signing key", checks.url),
    Setting(
        "grafana_repo_key_sha256",
        None,
        "sha256 of that key file; when set, another key is refused",
        checks.optional(checks.sha256),
    ),
    Setting(
        "grafana_listen_address",
        "127.0.0.1",
        "address Grafana listens on (change its admin password at the first login before opening it wider)",
        checks.listen_address,
    ),
    Setting("grafana_port", 3000, "TCP port Grafana listens on", checks.int_in(1, 65535)),
    Setting(
        "grafana_dashboards",
        DASHBOARDS,
        "the dashboards provisioned into Grafana, JSON files by URL; {vllm_version} becomes the fleet's vLLM version "
        "(default: vLLM's own, at that release's tag; a file: URL on sites without the internet)",
        checks.list_of(
            checks.url_template("vllm_version"), "a list of http(s) or file URLs (placeholder: {vllm_version})"
        ),
    ),
)


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    if cfg["grafana"] and MONITORING_GROUP not in groups:
        return ["grafana = True on a host outside the `monitoring` group, where no Prometheus runs: set it there"]
    return []


def dashboard_urls(cfg: HostConfig) -> list[str]:
    return [url.format(vllm_version=cfg.vllm_version) for url in cfg.grafana_dashboards]


def dashboards_dir(urls: list[str]) -> str:
    """One directory per list of URLs: a changed list gets a new one, and the old goes."""
    return f"{GRAFANA_DASHBOARDS_ROOT}/{hashlib.sha256(' '.join(urls).encode()).hexdigest()[:16]}"


def dashboard_files(urls: list[str]) -> dict[str, str]:
    """Where each dashboard goes: its file name, numbered (two releases' files may share a name)."""
    directory = dashboards_dir(urls)
    return {
        url: f"{directory}/{index:02d}-{posixpath.basename(urlsplit(url).path) or 'dashboard.json'}"
        for index, url in enumerate(urls)
    }


def render_dropin(cfg: HostConfig) -> str:
    environment = {
        "GF_SERVER_HTTP_ADDR": cfg.grafana_listen_address,
        "GF_SERVER_HTTP_PORT": str(cfg.grafana_port),
        # A fleet's servers do not report usage to third parties, nor look for updates there.
        "GF_ANALYTICS_REPORTING_ENABLED": "false",
        "GF_ANALYTICS_CHECK_FOR_UPDATES": "false",
        "GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES": "false",
    }
    lines = [f"Environment={filesyntax.systemd_word(f'{name}={value}')}" for name, value in environment.items()]
    return "# Managed by glmfleet: where Grafana listens; no reports home.\n[Service]\n" + "\n".join(lines) + "\n"


def render_datasources(cfg: HostConfig) -> str:
    return filesyntax.yaml_document(
        {
            "apiVersion": 1,
            "datasources": [
                {
                    "name": "Prometheus",
                    "type": "prometheus",
                    "uid": DATASOURCE_UID,
                    "access": "proxy",
                    "url": local_url(cfg.prometheus_listen_address, cfg.prometheus_port),
                    "isDefault": True,
                    "editable": False,
                    # vLLM's dashboards compute rates over $__rate_interval, derived from this.
                    "jsonData": {"timeInterval": f"{cfg.prometheus_scrape_interval}s", "httpMethod": "POST"},
                }
            ],
        },
        "Managed by glmfleet: the fleet's Prometheus on this host.",
    )


def render_provider(directory: str) -> str:
    return filesyntax.yaml_document(
        {
            "apiVersion": 1,
            "providers": [
                {
                    "name": "vLLM",
                    "folder": "vLLM",
                    "type": "file",
                    "allowUiUpdates": False,
                    "updateIntervalSeconds": 60,
                    "options": {"path": directory},
                }
            ],
        },
        "Managed by glmfleet: vLLM's dashboards (grafana_dashboards).",
    )


def questions(cfg: HostConfig) -> dict[str, Question]:
    if not cfg.grafana:
        return {}
    dashboards = list(dashboard_files(dashboard_urls(cfg)).values())
    paths = [GRAFANA_DROPIN, GRAFANA_DATASOURCES, GRAFANA_DASHBOARD_PROVIDER, GRAFANA_DASHBOARDS_ROOT]
    return {
        "debs": Question(DebPackageStates, {}),
        "managed": Question(
            ManagedPaths,
            {"paths": [*paths, *dashboards, *apt_repository_question("grafana")], "units": [GRAFANA_UNIT]},
        ),
        "listeners": Question(ListeningPorts, {"port": cfg.grafana_port}),
    }


@deploy("Grafana")
@documented(SETTINGS)
def grafana():
    """
    Install Grafana at the pinned version from its ``signed-by`` repository, hold it, point it
    at the fleet's Prometheus and provision vLLM's dashboards.

    The dashboards are fetched once per list of URLs (on the host, credentials of a mirror's
    URL from the root-only netrc); Grafana (which its package does not start) is enabled and
    (re)started when its package, its listen address or its provisioning changed, and waited
    for until it listens. A converged host plans nothing.
    """
    cfg = host_config(host)
    if not cfg.grafana:
        return
    answers = ask_together(host, questions(cfg))
    debs, managed = answers["debs"], answers["managed"]
    if port_taken(answers["listeners"], cfg.grafana_port, "grafana_port", GRAFANA_UNIT):
        return
    if repository_due(managed, "grafana", cfg.grafana_repo_url, "stable", ["main"], cfg.grafana_repo_key_sha256):
        apt_repository(
            name="Grafana repository",
            repo="grafana",
            url=cfg.grafana_repo_url,
            suite="stable",
            components=["main"],
            key_url=cfg.grafana_repo_key_url,
            key_sha256=cfg.grafana_repo_key_sha256,
        )
    wanted = {"grafana": cfg.grafana_version}
    installing = bool(packages_due(debs, wanted))
    installed = apt_install(name=f"Grafana {cfg.grafana_version}", packages=wanted) if installing else None
    if installing or unheld(debs, list(wanted)):
        apt_hold(name="Grafana held", patterns=list(wanted), pending=installing)
    dropin = upload(managed, GRAFANA_DROPIN, render_dropin(cfg), name=f"Grafana's address {GRAFANA_DROPIN}")
    if dropin:
        systemd.daemon_reload(name="systemd daemon-reload for Grafana")

    urls = dashboard_urls(cfg)
    directory(managed, GRAFANA_DASHBOARDS_ROOT, name=f"dashboards {GRAFANA_DASHBOARDS_ROOT}")
    missing = {url: path for url, path in dashboard_files(urls).items() if path not in managed["paths"]}
    if missing:
        current = dashboards_dir(urls)
        server.shell(
            name=f"vLLM's dashboards: {', '.join(posixpath.basename(path) for path in missing.values())}",
            commands=[
                f"mkdir -p {quote(current)}",
                *(fetch_command(url, path) for url, path in missing.items()),
                # The dashboards of an earlier list of URLs go.
                f"find {quote(GRAFANA_DASHBOARDS_ROOT)} -mindepth 1 -maxdepth 1 ! -path {quote(current)} "
                "-exec rm -rf -- {} +",
            ],
        )
    provisioning = [
        upload(managed, GRAFANA_DATASOURCES, render_datasources(cfg), name="Grafana data source"),
        upload(managed, GRAFANA_DASHBOARD_PROVIDER, render_provider(dashboards_dir(urls)), name="Grafana dashboards"),
    ]
    service_running(
        managed,
        GRAFANA_UNIT,
        planned(installed, dropin, *provisioning),
        cfg.grafana_port,
        cfg.verify_journal_lines,
        "Grafana",
        (GRAFANA_DROPIN, GRAFANA_DATASOURCES, GRAFANA_DASHBOARD_PROVIDER),
    )
