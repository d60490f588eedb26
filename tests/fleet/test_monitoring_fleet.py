"""Monitoring on the local fleet: Debian's Prometheus on the host of the `monitoring` group scrapes
every vLLM (the test double's /metrics, rendered as vLLM renders it), the gateway and every host's
node exporter; a host added to the inventory becomes a target without Prometheus restarting; a
bounded loopback load moves `vllm:num_requests_running`; a real browser shows the request rate
per host and the fleet page; the alert rules fire as written; a second run changes nothing.

The tests run in file order on one fleet: the monitoring host is deployed alone first, then the
other host joins (and runs the gateway). Screenshots and the pages' DOM are kept in
``.artifacts/monitoring`` (or ``$GLMFLEET_ARTIFACTS/monitoring``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from devfleet import localfleet
from tests.support.browser import rendered_dom, screenshot
from tests.support.fleettools import (
    API_KEY_ENV,
    ROOT,
    TEST_DOUBLE,
    deploy,
    fleet_host,
    gateway_port,
    pyinfra,
    wait_for,
    write_inventory,
)
from tests.support.loadgen import Load
from tests.support.paths import FIXTURES

pytestmark = pytest.mark.fleet

API_KEY = "sk-monitoring-5b2e"
ENV = {API_KEY_ENV: API_KEY}
MODEL = "zai-org/GLM-4-9B-0414"
# Requests stay in flight long enough for a scrape every second to see them.
LATENCY = {"VLLM_TEST_DOUBLE_LATENCY": "0.5"}
ARTIFACTS = Path(os.environ.get("GLMFLEET_ARTIFACTS", ROOT / ".artifacts")) / "monitoring"
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- ports: the fleet's hosts share one network, so each listener has its own port --------------


def port_base() -> int:
    """This fleet slot's range for monitoring, clear of the vLLM and gateway ports (8xxx)."""
    return 9100 + 100 * localfleet.fleet_slot()


def node_exporter_port(name: str) -> int:
    return port_base() + int(name.rsplit("-", 1)[1])


def prometheus_url() -> str:
    return f"http://127.0.0.1:{port_base() + 90}"


GATEWAY_EXPORTER_PORT_OFFSET, GATEWAY_STATUS_PORT_OFFSET = 91, 92


@pytest.fixture(scope="module")
def hosts(fleet):
    """The monitoring host first (deployed alone), then the host that joins and runs the gateway."""
    return {"monitoring": fleet[1], "joining": fleet[0]}


@pytest.fixture(scope="module")
def data(package_index, test_model):
    """--data for every run; the ready timeout stays host data (--data would override it)."""
    double = {key: value for key, value in TEST_DOUBLE.items() if key != "vllm_ready_timeout"}
    return double | test_model | {"pip_index_url": package_index}


def write(path, names: list[str], monitoring: str, gateway: str | None = None, **monitoring_data) -> str:
    """An inventory of ``names`` (hosts up now), ``monitoring`` the Prometheus host, ``gateway``
    the gateway, each listener on its own port."""
    listed = [(name, host) for name, host in localfleet.inventory_hosts() if name in names]
    host_data = {
        name: {"vllm_env": LATENCY, "vllm_ready_timeout": 60, "node_exporter_port": node_exporter_port(name)}
        for name in names
    }
    groups = {
        "monitoring": (
            [monitoring],
            {"prometheus_port": port_base() + 90, "prometheus_scrape_interval": 1, **monitoring_data},
        )
    }
    if gateway:
        groups["gateway"] = (
            [gateway],
            {
                "gateway_port": gateway_port(),
                "gateway_exporter_port": port_base() + GATEWAY_EXPORTER_PORT_OFFSET,
                "gateway_status_port": port_base() + GATEWAY_STATUS_PORT_OFFSET,
            },
        )
    return str(write_inventory(path, host_data, groups, listed))


def api(path: str, **params) -> dict:
    url = f"{prometheus_url()}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with _direct.open(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]


def query(expr: str) -> dict[str, float]:
    """An instant query's value per ``instance``."""
    return {
        sample["metric"].get("instance", ""): float(sample["value"][1]) for sample in api("query", query=expr)["result"]
    }


def targets() -> dict[tuple[str, str], dict]:
    """Prometheus's active targets by (job, host)."""
    return {(t["labels"]["job"], t["labels"]["host"]): t for t in api("targets", state="active")["activeTargets"]}


def all_up(expected: set[tuple[str, str]]) -> bool:
    try:
        found = targets()
    except OSError:
        return False
    return set(found) == expected and all(target["health"] == "up" for target in found.values())


def prometheus_pid(name: str) -> str:
    return fleet_host(name).check_output("systemctl show --property MainPID --value prometheus.service")


def vllm_address(name: str) -> str:
    return f"127.0.0.1:{dict(localfleet.inventory_hosts())[name]['vllm_port']}"


@pytest.fixture(scope="module")
def monitoring_host(hosts, data, tmp_path_factory):
    """The monitoring host deployed alone: it serves, and runs Prometheus and its node exporter."""
    path = write(tmp_path_factory.mktemp("alone") / "inventory.py", [hosts["monitoring"]], hosts["monitoring"])
    run = deploy(path, data=data, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    yield path
    # The other tests' runs have no monitoring group: nothing would stop these.
    for name in hosts.values():
        fleet_host(name).run(
            "systemctl disable --now prometheus.service prometheus-node-exporter.service "
            "prometheus-nginx-exporter.service"
        )


@pytest.fixture(scope="module")
def joined(monitoring_host, hosts, data, tmp_path_factory):
    """The other host added to the inventory, as the gateway: (the run, Prometheus's PID before it)."""
    pid = prometheus_pid(hosts["monitoring"])
    path = write(
        tmp_path_factory.mktemp("joined") / "inventory.py",
        list(hosts.values()),
        hosts["monitoring"],
        gateway=hosts["joining"],
    )
    run = deploy(path, data=data, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    return path, run, pid


def test_the_monitoring_host_scrapes_its_own_vllm_and_node(monitoring_host, hosts):
    mon = hosts["monitoring"]
    expected = {("prometheus", mon), ("vllm", mon), ("node", mon)}
    wait_for(lambda: all_up(expected), what=f"targets {sorted(expected)} to be up", timeout_s=30)
    assert targets()[("vllm", mon)]["scrapeUrl"] == f"http://{vllm_address(mon)}/metrics"
    # The node exporter reads glmfleet's own gauges from root's directory (none on a host without GPUs).
    assert query("node_textfile_scrape_error") == {f"127.0.0.1:{node_exporter_port(mon)}": 0}
    # Where the flags say, and only there: loopback, the fleet slot's port.
    defaults = fleet_host(mon).file("/etc/default/prometheus").content_string
    assert f'ARGS="--web.listen-address=127.0.0.1:{port_base() + 90} ' in defaults


def test_a_host_added_to_the_inventory_becomes_a_target_without_a_restart(joined, hosts):
    _, run, pid_before = joined
    mon, new = hosts["monitoring"], hosts["joining"]
    # On the monitoring host only the targets files changed: no reload, no restart.
    assert run.changed()[mon] == {
        "Prometheus | vllm targets",
        "Prometheus | node targets",
        "Prometheus | gateway targets",
    }
    expected = {(job, name) for job in ("vllm", "node") for name in (mon, new)} | {
        ("prometheus", mon),
        ("gateway", new),
    }
    wait_for(lambda: all_up(expected), what=f"targets {sorted(expected)} to be up", timeout_s=30)
    assert prometheus_pid(mon) == pid_before
    assert query("up{job='gateway'} * on(instance) nginx_up") == {
        f"127.0.0.1:{port_base() + GATEWAY_EXPORTER_PORT_OFFSET}": 1
    }


def load_and_look(hosts, seconds: float) -> dict:
    """A bounded load through the gateway; once every vLLM shows it, the browser looks.
    Returns what was seen."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    instances = {vllm_address(name) for name in hosts.values()}
    graph = f"{prometheus_url()}/classic/graph?" + urllib.parse.urlencode(
        {
            "g0.expr": "sum by (host, instance) (rate(vllm:request_success_total[10s]))",
            "g0.tab": "0",
            "g0.range_input": "5m",
        }
    )
    fleet_page = f"{prometheus_url()}/consoles/glmfleet.html"
    seen = {"before": query("vllm:num_requests_running")}
    with Load(f"http://127.0.0.1:{gateway_port()}", MODEL, API_KEY, workers=4, max_seconds=90) as load:
        started = time.monotonic()
        # Scraped every second, a request held 0.5 s shows on every vLLM the gateway sends load to.
        wait_for(
            lambda: set(query("max_over_time(vllm:num_requests_running[10s]) >= 1")) == instances,
            what="requests in flight on every vLLM",
            timeout_s=45,
        )
        seen["running"] = query("max_over_time(vllm:num_requests_running[10s])")
        wait_for(
            lambda: set(query("rate(vllm:request_success_total[10s]) > 1")) == instances,
            what="a steady request rate on every vLLM",
            timeout_s=45,
        )
        seen["graph_png"] = screenshot(graph, ARTIFACTS / "request-rate.png")
        seen["graph_dom"] = rendered_dom(graph)
        seen["page_png"] = screenshot(fleet_page, ARTIFACTS / "fleet-page.png")
        seen["page_dom"] = rendered_dom(fleet_page)
        time.sleep(max(0.0, started + seconds - time.monotonic()))
    seen["load"] = load.result
    (ARTIFACTS / "request-rate.html").write_text(seen["graph_dom"])
    (ARTIFACTS / "fleet-page.html").write_text(seen["page_dom"])
    (ARTIFACTS / "load.txt").write_text(f"{load.result}\nrequests in flight, most in 10 s: {seen['running']}\n")
    return seen


@pytest.fixture(scope="module")
def under_load(joined, hosts):
    return load_and_look(hosts, seconds=10)


def test_requests_running_moves_under_a_bounded_load(under_load, hosts):
    assert under_load["load"].failed == 0 and under_load["load"].ok > 0, str(under_load["load"])
    instances = {vllm_address(name) for name in hosts.values()}
    assert set(under_load["before"]) == instances and set(under_load["before"].values()) == {0.0}
    assert set(under_load["running"]) == instances and min(under_load["running"].values()) >= 1, under_load["running"]
    # And back to nothing once the load is over.
    wait_for(lambda: set(query("vllm:num_requests_running").values()) == {0.0}, what="the fleet to be idle")


def test_a_browser_shows_the_request_rate_of_each_host(under_load, hosts):
    """Prometheus's graph page, as Chromium rendered it while the load ran: one series per host
    in its legend (drawn from the query's answer, so only once data came back)."""
    legend = re.findall(r'<span class="label">(\{[^<]*\})</span>', under_load["graph_dom"])
    series = {tuple(re.findall(r'(\w+)="([^"]*)"', label)) for label in legend}
    assert series == {(("host", name), ("instance", vllm_address(name))) for name in hosts.values()}, legend
    assert "Total time series: 2" in under_load["graph_dom"]
    assert under_load["graph_png"].stat().st_size > 10_000  # a drawn graph, not a blank page


def test_the_fleet_page_shows_every_host_serving(under_load, hosts):
    """glmfleet's console page (no Grafana needed): a row per vLLM, up, with its request rate."""
    page = under_load["page_dom"]
    rows = re.findall(
        r"<tr>\s*<td>([^<]+)</td>\s*<td class=\"name\">([^<]+)</td>\s*<td class=\"(up|down)\">[^<]*</td>"
        r"(?:\s*<td>[^<]*</td>){3}\s*<td>([0-9.]+)</td>",
        page[page.index('id="vllm"') : page.index('id="gpus"')],
    )
    assert {(host, instance, state) for host, instance, state, _ in rows} == {
        (name, vllm_address(name), "up") for name in hosts.values()
    }
    assert all(float(rate) > 0 for *_, rate in rows), rows
    assert "no GPU host" in page  # the fleet's hosts have none: no DCGM target
    assert under_load["page_png"].stat().st_size > 10_000


def test_the_alert_rules_are_loaded_and_fire_as_written(joined, hosts):
    mon = fleet_host(hosts["monitoring"])
    loaded = {rule["name"] for group in api("rules")["groups"] for rule in group["rules"]}
    assert loaded == {
        "VllmReplicaDown",
        "VllmNotServing",
        "VllmKvCacheNearFull",
        "VllmRequestsQueueing",
        "GpuXidError",
        "GpuLost",
        "TargetDown",
        "PrometheusConfigReloadFailed",
    }
    assert api("alerts")["alerts"] == []  # a fleet that serves wakes nobody
    # The installed rules, with the installed promtool, against the cases of each alert.
    cases = (FIXTURES / "prometheus" / "alert-rules.test.yml").read_text()
    mon.check_output(f"printf '%s' {shlex.quote(cases)} > /tmp/glmfleet-alert-rules.test.yml")
    result = mon.run("promtool test rules /tmp/glmfleet-alert-rules.test.yml")
    assert result.rc == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_a_second_run_changes_nothing_and_plans_nothing(joined, hosts, data):
    """Converged, every host (the monitoring host, the gateway with its exporter) is read in one
    command and plans no operation."""
    path, _, _ = joined
    again = pyinfra(path, "--debug", "deploy.py", data=data, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.changed() == {}
    for name in hosts.values():
        assert again.planned(name) == []
        assert len(re.findall(rf"Running command on {re.escape(name)}:", again.stderr)) == 1


def test_a_changed_setting_reloads_prometheus_without_a_restart(joined, hosts, data, tmp_path):
    mon = hosts["monitoring"]
    pid = prometheus_pid(mon)
    path = write(
        tmp_path / "inventory.py", list(hosts.values()), mon, gateway=hosts["joining"], prometheus_scrape_interval=2
    )
    run = deploy(path, data=data, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    # (The staged rules are those of the run before: unchanged.)
    assert run.changed() == {
        mon: {
            "Prometheus | /var/lib/glmfleet/staging/prometheus.yml staged",
            "Prometheus | Prometheus configuration and rules, checked by promtool",
            "Prometheus | reload Prometheus, wait until the new configuration is in force",
        }
    }
    # In force when the run returned: no waiting here.
    assert "scrape_interval: 2s" in api("status/config")["yaml"]
    assert prometheus_pid(mon) == pid
