"""What the monitoring roles tell hosts the local fleet cannot be: GPU hosts with DCGM from NVIDIA's
CUDA repository, Grafana from Grafana's repository (neither is reachable from the tests), and the
scrape targets and files Prometheus gets for an inventory. The real roles plan against pyinfra's
@fake connector (tests/support/planning.py); the fleet test runs Prometheus itself."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all

from glmfleet.config import ConfigError, resolve
from glmfleet.layout import (
    CUDA_DRIVER_PIN,
    DCGM_COUNTERS,
    DCGM_EXPORTER_DROPIN,
    GPUS_EXPECTED,
    GRAFANA_DASHBOARD_PROVIDER,
    GRAFANA_DATASOURCES,
    GRAFANA_DROPIN,
)
from roles import dcgm_exporter as dcgm
from roles import grafana as grafana_role
from roles import monitoring_roles, prometheus
from roles.dcgm_exporter import dcgm_exporter
from roles.grafana import grafana
from tests.support.paths import FIXTURES
from tests.support.planning import H100, gpu_host, installed, plan

# The H100 machine's own `nvidia-smi --version` (driver 580, CUDA 13.0).
CUDA_13 = (FIXTURES / "h100" / "nvidia-smi-version.txt").read_text().splitlines()
GPU_HOST = {**gpu_host(pci=[H100, H100], cuda=CUDA_13), "useradd": ["/usr/sbin/useradd"]}


def commands(ops, name_part: str) -> list[str]:
    found = [op for op in ops if name_part in op.name]
    assert found, f"no operation named like {name_part!r} in {[op.name for op in ops]}"
    return [command for op in found for command in op.commands]


def names(ops) -> list[str]:
    return [op.name for op in ops]


# --- DCGM and dcgm-exporter, from the CUDA repository -------------------------------------------


def test_dcgm_comes_paired_and_held_from_the_signed_cuda_repository_without_its_drivers():
    ops = plan(dcgm_exporter, {}, GPU_HOST)  # the driver from the distribution (the default)
    repository = commands(ops, "NVIDIA CUDA repository (DCGM)")
    assert "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64/3bf863cc.pub;" in repository[0]
    assert "/etc/apt/keyrings/glmfleet-cuda.asc" in repository[0] and "apt-key" not in "\n".join(repository)
    install = commands(ops, "DCGM 4.6.0-4.8.3")[0]
    # The driver's CUDA 13.0 picks DCGM's CUDA 13 build; DCGM 4.6.0 goes with exporter 4.8.3.
    assert (
        "'datacenter-gpu-manager-4-core=1:4.6.0-*' 'datacenter-gpu-manager-4-cuda13=1:4.6.0-*' "
        "'datacenter-gpu-manager-exporter=4.8.3-*'" in install
    )
    assert "apt-mark hold" in commands(ops, "DCGM packages held")[0]
    assert "datacenter-gpu-manager-" in commands(ops, "DCGM packages held")[0]
    assert names(ops).index("DCGM exporter | the CUDA repository offers no driver here") < names(ops).index(
        next(name for name in names(ops) if "DCGM 4.6.0-4.8.3" in name)
    )
    assert "systemctl enable nvidia-dcgm.service" in commands(ops, "DCGM host engine running")


def test_the_cuda_repository_pin_refuses_its_driver_packages_only():
    pin = dcgm.render_pin("https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64")
    assert "Package: *nvidia* libcuda* libnvcuvid* cuda-drivers*\n" in pin
    assert 'Pin: origin "developer.download.nvidia.com"\nPin-Priority: -1\n' in pin
    assert "datacenter-gpu-manager" not in pin
    # A mirror is the origin apt sees; a file: repository's origin is empty.
    assert 'Pin: origin "mirror.example.internal"' in dcgm.render_pin("http://mirror.example.internal/cuda")
    assert 'Pin: origin ""' in dcgm.render_pin("file:///srv/cuda")


def test_the_exporter_asks_the_host_engine_for_glmfleets_fields_and_logs_to_the_journal():
    ops = plan(dcgm_exporter, {"dcgm_exporter_listen_address": "10.0.0.5", "dcgm_exporter_port": 9500}, GPU_HOST)
    dropin = dcgm.render_dropin(resolve({"dcgm_exporter_listen_address": "10.0.0.5", "dcgm_exporter_port": 9500}))
    assert (
        "ExecStart=\nExecStart=/usr/bin/dcgm-exporter --remote-hostengine-info localhost:5555 "
        f"--collectors {DCGM_COUNTERS} --address 10.0.0.5:9500\n" in dropin
    )
    assert "StandardOutput=journal" in dropin
    assert any(DCGM_EXPORTER_DROPIN in name for name in names(ops))
    assert "systemctl daemon-reload" in "\n".join(commands(ops, "daemon-reload for dcgm-exporter"))
    start = commands(ops, "(re)start nvidia-dcgm-exporter.service")[0]
    assert "systemctl restart nvidia-dcgm-exporter.service" in start
    assert "grep -qx '9500 nvidia-dcgm-exporter.service'" in start  # waits until the exporter itself listens
    # Two GPUs on the PCI bus: what the GpuLost alert compares DCGM's count with.
    assert any(GPUS_EXPECTED in name or "GPUs expected" in name for name in names(ops))


def test_with_the_driver_from_the_cuda_repository_dcgm_shares_it_and_pins_nothing():
    mirror = "http://mirror.example.internal/cuda/{distro}/{arch}"
    ops = plan(dcgm_exporter, {"nvidia_driver_source": "cuda-repo", "nvidia_cuda_repo_url": mirror}, GPU_HOST)
    assert not any("CUDA repository" in name for name in names(ops))  # the driver role adds it
    assert not any(CUDA_DRIVER_PIN in name or "offers no driver" in name for name in names(ops))
    assert "'datacenter-gpu-manager-exporter=4.8.3-*'" in commands(ops, "DCGM 4.6.0-4.8.3")[0]


def test_a_mirror_and_a_pinned_key_reach_the_dcgm_repository():
    sha = "b" * 64
    data = {
        "nvidia_cuda_repo_url": "http://mirror.example.internal/cuda/{distro}/{arch}",
        "nvidia_cuda_repo_key_url": "http://mirror.example.internal/cuda/{distro}/{arch}/3bf863cc.pub",
        "nvidia_cuda_repo_key_sha256": sha,
        "dcgm_exporter_release": "4.7.0-4.9.0",
    }
    ops = plan(dcgm_exporter, data, gpu_host(distro="debian|12|bookworm", cuda=CUDA_13))
    repository = commands(ops, "NVIDIA CUDA repository (DCGM)")[0]
    assert "http://mirror.example.internal/cuda/debian12/x86_64/3bf863cc.pub" in repository
    assert f"echo '{sha}  /etc/apt/keyrings/glmfleet-cuda.asc.partial' | sha256sum --check" in repository
    assert "DCGM exporter | the CUDA repository offers no driver here" in names(ops)
    install = commands(ops, "DCGM 4.7.0-4.9.0")[0]
    assert (
        "'datacenter-gpu-manager-4-core=1:4.7.0-*'" in install
        and "'datacenter-gpu-manager-exporter=4.9.0-*'" in install
    )


def test_dcgm_waits_for_a_running_driver_and_stays_off_where_glmfleet_has_no_gpu(caplog):
    assert plan(dcgm_exporter, {}, gpu_host()) == []  # no driver answers yet: no CUDA version
    assert "DCGM waits for a running NVIDIA driver" in caplog.text
    assert plan(dcgm_exporter, {"nvidia_driver_source": "none"}, GPU_HOST) == []
    assert plan(dcgm_exporter, {"dcgm_exporter": False}, GPU_HOST) == []
    assert dcgm.enabled(resolve({"nvidia_driver_source": "none", "dcgm_exporter": True}))


def managed_answer(files: dict[str, str], units: list[str], extra_paths=()) -> list[str]:
    """ManagedPaths' output for files with that content (root's, 644), paths that exist, and
    units enabled and running (started after every file's mtime)."""
    lines = [f"path\t{path}\tf|root|root|644\t1733580000.0" for path in files]
    lines += [f"path\t{path}\td|root|root|755\t1733580000.0" for path in extra_paths]
    lines += [f"{hashlib.sha256(text.encode()).hexdigest()}  {path}" for path, text in files.items()]
    lines.append("clock\t1733590000.0\t10000.0")
    for unit in units:
        lines += [
            f"unit\t{unit}",
            "UnitFileState=enabled",
            "SubState=running",
            "ExecMainStartTimestampMonotonic=5000000000",
        ]
    return lines


def test_a_converged_gpu_host_plans_no_dcgm_operation():
    cfg = resolve({})
    files = {
        CUDA_DRIVER_PIN: dcgm.render_pin("https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64"),
        DCGM_COUNTERS: dcgm.COUNTERS.read_text(),
        DCGM_EXPORTER_DROPIN: dcgm.render_dropin(cfg),
        GPUS_EXPECTED: dcgm.render_gpus_expected(2),
    }
    from glmfleet.operations import render_apt_source

    source = render_apt_source(
        "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64",
        "/",
        [],
        "/etc/apt/keyrings/glmfleet-cuda.asc",
    )
    files["/etc/apt/sources.list.d/glmfleet-cuda.sources"] = source
    files["/etc/apt/keyrings/glmfleet-cuda.asc"] = "a key"
    host = {
        **GPU_HOST,
        "-maxdepth 0 -printf": managed_answer(files, [dcgm.DCGM_UNIT, dcgm.DCGM_EXPORTER_UNIT]),
        **installed(
            "datacenter-gpu-manager-4-core 1:4.6.0-1",
            "datacenter-gpu-manager-4-cuda13 1:4.6.0-1",
            "datacenter-gpu-manager-exporter 4.8.3-1",
            held=True,
        ),
    }
    assert plan(dcgm_exporter, {}, host) == []


# --- Grafana, from Grafana's repository -----------------------------------------------------------

GRAFANA = {"grafana": True, "prometheus_port": 9091, "prometheus_scrape_interval": 5}
# Its settings as the rendering sees them (a host alone has no group: grafana itself aside).
GRAFANA_CFG = resolve({key: value for key, value in GRAFANA.items() if key != "grafana"})


def test_grafana_from_its_signed_repository_pinned_held_and_pointed_at_the_fleets_prometheus():
    ops = plan(grafana, GRAFANA, {}, groups=("monitoring",))
    repository = commands(ops, "Grafana repository")
    assert "https://apt.grafana.com/gpg-full.key" in repository[0]
    assert "/etc/apt/keyrings/glmfleet-grafana.asc" in repository[0]
    assert "apt-key" not in "\n".join(repository)
    assert "'grafana=12.4.2*'" in commands(ops, "Grafana 12.4.2*")[0]
    assert "apt-mark hold" in commands(ops, "Grafana held")[0]
    cfg = GRAFANA_CFG
    dropin = grafana_role.render_dropin(cfg)
    assert "Environment=GF_SERVER_HTTP_ADDR=127.0.0.1\nEnvironment=GF_SERVER_HTTP_PORT=3000\n" in dropin
    assert "Environment=GF_ANALYTICS_REPORTING_ENABLED=false" in dropin
    datasource = yaml.safe_load(grafana_role.render_datasources(cfg))["datasources"][0]
    assert datasource["url"] == "http://127.0.0.1:9091" and datasource["isDefault"] is True
    # vLLM's dashboards pick their data source by this uid, and rate over $__rate_interval.
    assert datasource["uid"] == "prometheus" and datasource["jsonData"]["timeInterval"] == "5s"
    start = commands(ops, "(re)start grafana-server.service")[0]
    assert "systemctl enable --quiet grafana-server.service" in start  # the package does not enable it
    assert "grep -qx '3000 grafana-server.service'" in start
    for name in (GRAFANA_DROPIN, GRAFANA_DATASOURCES, GRAFANA_DASHBOARD_PROVIDER):
        assert any(name in op_name or "Grafana" in op_name for op_name in names(ops))


def test_vllms_dashboards_are_fetched_for_the_fleets_vllm_release_once():
    ops = plan(grafana, GRAFANA, {}, groups=("monitoring",))
    fetch = commands(ops, "vLLM's dashboards")
    base = "https://raw.githubusercontent.com/vllm-project/vllm/v0.22.0/examples/observability"
    for path in (
        "prometheus_grafana/grafana.json",
        "dashboards/grafana/performance_statistics.json",
        "dashboards/grafana/query_statistics.json",
    ):
        assert any(f"{base}/{path}" in command for command in fetch), path
    urls = grafana_role.dashboard_urls(GRAFANA_CFG)
    directory = grafana_role.dashboards_dir(urls)
    assert fetch[0] == f"mkdir -p {directory}"
    assert fetch[-1].startswith("find /var/lib/glmfleet/grafana-dashboards -mindepth 1 -maxdepth 1 ! -path ")
    provider = yaml.safe_load(grafana_role.render_provider(directory))["providers"][0]
    assert provider["options"]["path"] == directory and provider["folder"] == "vLLM"
    # Another release, other URLs: another directory, so the old dashboards go.
    other = grafana_role.dashboard_urls(resolve({"vllm_version": "0.23.0"}))
    assert grafana_role.dashboards_dir(other) != directory
    # Fetched already: nothing to fetch.
    present = [f"path\t{path}\tf|root|root|644\t1.0" for path in grafana_role.dashboard_files(urls).values()]
    assert "vLLM's dashboards" not in "\n".join(
        names(plan(grafana, GRAFANA, {"-maxdepth 0 -printf": present}, groups=("monitoring",)))
    )


def test_a_converged_grafana_host_plans_no_grafana_operation():
    from glmfleet.operations import render_apt_source

    urls = grafana_role.dashboard_urls(GRAFANA_CFG)
    files = {
        GRAFANA_DROPIN: grafana_role.render_dropin(GRAFANA_CFG),
        GRAFANA_DATASOURCES: grafana_role.render_datasources(GRAFANA_CFG),
        GRAFANA_DASHBOARD_PROVIDER: grafana_role.render_provider(grafana_role.dashboards_dir(urls)),
        "/etc/apt/keyrings/glmfleet-grafana.asc": "a key",
        "/etc/apt/sources.list.d/glmfleet-grafana.sources": render_apt_source(
            "https://apt.grafana.com", "stable", ["main"], "/etc/apt/keyrings/glmfleet-grafana.asc"
        ),
        **{path: "{}" for path in grafana_role.dashboard_files(urls).values()},
    }
    host = {
        "-maxdepth 0 -printf": managed_answer(
            files, [grafana_role.GRAFANA_UNIT], ["/var/lib/glmfleet/grafana-dashboards"]
        ),
        **installed("grafana 12.4.2", held=True),
    }
    assert plan(grafana, GRAFANA, host, groups=("monitoring",)) == []


def test_grafana_stays_off_unless_asked_and_only_on_a_monitoring_host():
    assert plan(grafana, {}, {}) == []
    with pytest.raises(ConfigError, match="grafana = True on a host outside the `monitoring` group"):
        problems_inventory({"grafana": True}, groups={})


# --- Prometheus: targets and files from the inventory -------------------------------------------


def inventory(hosts: list[tuple[str, dict]], groups: dict[str, list[str]]) -> Inventory:
    made = Inventory((hosts, {}), **{name: (members, {}) for name, members in groups.items()})
    connect_all(State(made, Config()))
    return made


def fake(name: str, **data) -> tuple[str, dict]:
    return f"@fake/{name}", {"fake_delay": 0, "fake_delay_jitter": 0, **data}


def problems_inventory(data: dict, groups: dict[str, list[str]]):
    from glmfleet.config import validate_inventory

    return validate_inventory(inventory([fake("gpu-1", **data)], groups))


def test_scrape_targets_come_from_the_inventory_each_with_its_hosts_name():
    fleet = inventory(
        [
            fake(
                "gpu-1", ssh_hostname="10.0.0.1", vllm_host="0.0.0.0", vllm_api_key="k", nvidia_driver_source="distro"
            ),
            fake(
                "gpu-2",
                ssh_hostname="10.0.0.2",
                vllm_port=8001,
                node_exporter_listen_address="10.0.1.2",
                nvidia_driver_source="none",
            ),
            fake("mon-1", ssh_hostname="10.0.0.9", dcgm_exporter=False),
        ],
        {"gateway": ["@fake/gpu-1"], "monitoring": ["@fake/mon-1"]},
    )
    jobs = prometheus.scrape_targets(fleet, prometheus.serving_endpoints(fleet))
    T = prometheus.Target
    assert jobs == {
        # A wildcard vLLM is reached at the host's address; loopback stays loopback.
        "vllm": [
            T("@fake/gpu-1", "10.0.0.1:8000"),
            T("@fake/gpu-2", "127.0.0.1:8001"),
            T("@fake/mon-1", "127.0.0.1:8000"),
        ],
        "gateway": [T("@fake/gpu-1", "10.0.0.1:9113")],
        "node": [
            T("@fake/gpu-1", "10.0.0.1:9100"),
            T("@fake/gpu-2", "10.0.1.2:9100"),
            T("@fake/mon-1", "10.0.0.9:9100"),
        ],
        # DCGM where glmfleet manages the driver (gpu-1), not where it does not (gpu-2) nor where it is off.
        "dcgm": [T("@fake/gpu-1", "10.0.0.1:9400")],
    }
    assert json.loads(prometheus.render_targets(jobs["node"][:1])) == [
        {"targets": ["10.0.0.1:9100"], "labels": {"host": "@fake/gpu-1"}}
    ]
    # The serving endpoints are an argument: replica groups hand their API servers.
    assert prometheus.scrape_targets(fleet, [T("head", "10.0.0.1:8000")])["vllm"] == [T("head", "10.0.0.1:8000")]


def test_only_an_inventory_with_a_monitoring_group_gets_the_monitoring_roles():
    plain = inventory([fake("gpu-1"), fake("gpu-2")], {"gateway": ["@fake/gpu-1"]})
    assert [monitoring_roles(member) for member in plain] == [(), ()]
    watched = inventory([fake("gpu-1"), fake("gpu-2")], {"gateway": ["@fake/gpu-1"], "monitoring": ["@fake/gpu-2"]})
    roles = {member.name: [role.__name__.rsplit(".", 1)[1] for role in monitoring_roles(member)] for member in watched}
    assert roles == {
        "@fake/gpu-1": ["node_exporter", "dcgm_exporter", "gateway_exporter"],
        "@fake/gpu-2": ["node_exporter", "dcgm_exporter", "prometheus", "grafana"],
    }


def test_prometheus_configuration_scrapes_every_job_from_its_targets_file():
    cfg = resolve({"prometheus_scrape_interval": 2, "prometheus_alertmanagers": ["10.0.0.7:9093"]}, "mon-1")
    config = yaml.safe_load(prometheus.render_config(cfg))
    assert config["global"] == {"scrape_interval": "2s", "evaluation_interval": "2s", "scrape_timeout": "2s"}
    assert config["rule_files"] == ["glmfleet-alerts.yml"]  # beside the configuration: checked staged as installed
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["10.0.0.7:9093"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["127.0.0.1:9090"], "labels": {"host": "mon-1"}}]
    for job in ("vllm", "gateway", "node", "dcgm"):
        assert jobs[job]["file_sd_configs"] == [{"files": [f"/etc/prometheus/glmfleet-targets/{job}.json"]}]


def test_alert_rules_carry_the_thresholds_and_cover_what_wakes_an_operator():
    rules = yaml.safe_load(
        prometheus.render_rules(
            resolve({"prometheus_alert_kv_cache_usage": 0.9, "prometheus_alert_requests_waiting": 20})
        )
    )
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert set(alerts) == {
        "VllmReplicaDown",
        "VllmNotServing",
        "VllmKvCacheNearFull",
        "VllmRequestsQueueing",
        "GpuXidError",
        "GpuLost",
        "TargetDown",
        "PrometheusConfigReloadFailed",
    }
    assert alerts["VllmKvCacheNearFull"]["expr"].endswith("(vllm:kv_cache_usage_perc) > 0.9")
    assert alerts["VllmRequestsQueueing"]["expr"].endswith("(vllm:num_requests_waiting) > 20")
    # Prometheus's own templates reach the file untouched.
    assert "{{ $labels.host }}" in alerts["VllmReplicaDown"]["annotations"]["summary"]


def test_prometheus_files_are_checked_by_promtool_before_they_replace_the_installed_ones():
    install = prometheus.install_command()
    check = install.index("/usr/bin/promtool check config /var/lib/glmfleet/staging/prometheus.yml")
    assert install.index("/usr/bin/promtool check rules /var/lib/glmfleet/staging/glmfleet-alerts.yml") < check
    assert check < install.index("mv -f /etc/prometheus/prometheus.yml.glmfleet-new /etc/prometheus/prometheus.yml")
    reload = prometheus.reload_command(resolve({"prometheus_port": 9091}))
    assert reload.startswith("since=$(date +%s); systemctl reload prometheus.service && python3 -c ")
    assert 'http://127.0.0.1:9091 "$since" 60' in reload


def test_ports_that_collide_on_a_monitoring_host_are_refused():
    with pytest.raises(ConfigError, match="prometheus_port = 9100 is also node_exporter_port on this host"):
        problems_inventory({"prometheus_port": 9100}, groups={"monitoring": ["@fake/gpu-1"]})
    with pytest.raises(ConfigError, match="gateway_port, gateway_exporter_port and gateway_status_port must differ"):
        problems_inventory({"gateway_status_port": 8080}, groups={"gateway": ["@fake/gpu-1"]})


def test_a_fresh_monitoring_host_writes_the_flags_before_the_package_and_checks_before_it_installs():
    """Debian's Prometheus starts on install: its flags are there first (apt keeps them), so it
    never listens on the package's default address; its configuration only replaces the
    installed one through promtool; the restart comes last and waits until it listens."""
    from roles.node_exporter import node_exporter
    from roles.prometheus import prometheus as prometheus_deploy

    ops = names(plan(prometheus_deploy, {}, {}, groups=("monitoring",)))
    order = [
        "Prometheus | Prometheus flags /etc/default/prometheus",
        "Prometheus | Prometheus: prometheus",
        "Prometheus | Prometheus configuration and rules, checked by promtool",
        "Prometheus | Prometheus: (re)start prometheus.service",
    ]
    assert [op for op in ops if op in order] == order
    assert {f"Prometheus | {job} targets" for job in ("vllm", "gateway", "node", "dcgm")} <= set(ops)
    assert not any("reload" in op for op in ops)  # the restart reads the new configuration
    ops = names(plan(node_exporter, {}, {}))
    assert ops.index("node exporter | node exporter flags /etc/default/prometheus-node-exporter") < ops.index(
        "node exporter | node exporter: prometheus-node-exporter"
    )
