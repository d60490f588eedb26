"""The rollout's pieces that need no fleet: batches, the failure budget, host selection, the
gateway's rendered configuration, the status program's parsing, and the tables."""

from __future__ import annotations

import hashlib
import json
import re
import runpy
import subprocess

import prometheus_client
import pytest
from pyinfra.api import Inventory

from glmfleet.config import ConfigError, resolve
from glmfleet_cli.rollout import HostResult, batch_sizes, describe, failure_budget, table
from glmfleet_cli.runner import UsageError, copy_inventory, load_inventory, select
from glmfleet_cli.status import render, row
from roles.gateway import pool, reload_command, render_config, render_keys
from roles.known_good import keep_command, restore_command
from roles.vllm_service import render_unit, vllm_command
from tests.support.paths import FIXTURES, ROOT

DATA = FIXTURES
STATUS = runpy.run_path(str(ROOT / "files" / "vllm_status.py"))
REVISION = "c7e1f1b4a0d0b8cd1f5d0a1e5a8f6f0f3c2b1a09"


@pytest.mark.parametrize(
    "spec, total, sizes",
    [
        ("1,25%,100%", 40, [1, 10, 29]),
        ("1,25%,100%", 4, [1, 1, 2]),
        ("1,1,2", 4, [1, 1, 2]),
        ("1", 4, [1, 1, 1, 1]),
        ("2", 5, [2, 2, 1]),
        ("50%", 3, [1, 1, 1]),
        ("1,1,2", 0, []),
    ],
)
def test_batches_are_counts_or_percentages_and_the_last_repeats(spec, total, sizes):
    assert batch_sizes(spec, total) == sizes


@pytest.mark.parametrize("spec", ["0", "abc", "150%", "1,,2", "-1"])
def test_a_bad_batch_spec_says_what_is_accepted(spec):
    with pytest.raises(UsageError, match="--batch .*: each value must be a count >= 1 or a percentage 1%-100%"):
        batch_sizes(spec, 4)


def test_max_fail_is_a_count_or_a_share_of_the_rollout():
    assert failure_budget("0", 4)(1)
    assert not failure_budget("1", 4)(1) and failure_budget("1", 4)(2)
    assert not failure_budget("25%", 4)(1) and failure_budget("25%", 4)(2)
    assert failure_budget("10%", 4)(1)
    with pytest.raises(UsageError, match="--max-fail '101%'"):
        failure_budget("101%", 4)


def test_limit_selects_groups_and_name_patterns_in_inventory_order():
    inventory = Inventory(
        (["gpu-01", "gpu-02", "gpu-03", "gw"], {}), gpus=(["gpu-02", "gpu-01"], {}), gateway=(["gw"], {})
    )
    assert select(inventory, []) == ["gpu-01", "gpu-02", "gpu-03", "gw"]
    assert select(inventory, ["gpus"]) == ["gpu-01", "gpu-02"]
    assert select(inventory, ["gpu-0[23]", "gateway"]) == ["gpu-02", "gpu-03", "gw"]
    with pytest.raises(UsageError, match="--limit 'nope' matches no group and no host"):
        select(inventory, ["nope"])


def test_the_inventory_loads_as_pyinfra_loads_it_and_copies_exactly(monkeypatch):
    monkeypatch.setenv("GLMFLEET_VLLM_API_KEY", "sk-test-copy")
    inventory = load_inventory(str(ROOT / "inventory" / "prod.py"), {"vllm_port": 9000})
    copy = copy_inventory(inventory)
    assert (
        [h.name for h in copy] == [h.name for h in inventory] == ["gpu-01.example.internal", "gpu-02.example.internal"]
    )
    for original in inventory:
        data = copy.get_host(original.name).data.dict()
        assert data == original.data.dict()
        assert (
            data["vllm_port"] == 9000
            and data["vllm_tensor_parallel_size"] == 8
            and data["vllm_api_key"] == "sk-test-copy"
        )
    assert {name: [h.name for h in hosts] for name, hosts in copy.groups.items()} == {
        name: [h.name for h in hosts] for name, hosts in inventory.groups.items()
    }


def test_a_bad_value_stops_the_rollout_before_connecting():
    with pytest.raises(
        ConfigError, match="gpu-01.example.internal: vllm_port = 0 is invalid; accepted: an integer 1-65535"
    ):
        load_inventory(str(ROOT / "inventory" / "prod.py"), {"vllm_port": 0})


# --- the gateway ---------------------------------------------------------------------------


def fleet_inventory() -> Inventory:
    """Three hosts, two served names; the second listens on every address."""
    return Inventory(
        (
            [
                ("gpu-01", {"ssh_hostname": "10.0.0.1", "vllm_port": 8001}),
                ("gpu-02", {"ssh_hostname": "10.0.0.2", "vllm_host": "0.0.0.0"}),
                ("gpu-03", {"vllm_served_model_name": "glm-air", "vllm_host": "10.0.0.3"}),
            ],
            {"vllm_api_key": "sk-edge"},
        )
    )


def gateway_cfg(**data):
    return resolve({"vllm_api_key": "sk-edge", "gateway_port": 8443, **data}, "gw")


def test_the_pool_has_an_upstream_per_served_model_with_reachable_addresses():
    models = pool(fleet_inventory(), out_of_pool={"gpu-02"})
    assert [(m["name"], m["upstream"]) for m in models] == [
        ("zai-org/GLM-4-9B-0414", "glmfleet_model_0"),
        ("glm-air", "glmfleet_model_1"),
    ]
    assert models[0]["servers"] == [
        {"host": "gpu-01", "address": "127.0.0.1:8001", "in_pool": True},
        {"host": "gpu-02", "address": "10.0.0.2:8000", "in_pool": False},
    ]
    assert models[1]["servers"] == [{"host": "gpu-03", "address": "10.0.0.3:8000", "in_pool": True}]


def test_a_host_out_of_the_pool_is_marked_down():
    config = render_config(gateway_cfg(), pool(fleet_inventory(), out_of_pool={"gpu-02"}))
    assert "    server 127.0.0.1:8001 max_fails=1 fail_timeout=10s;  # gpu-01\n" in config
    assert "    server 10.0.0.2:8000 down;  # gpu-02: out of the pool (rollout)\n" in config
    assert "listen 127.0.0.1:8443;" in config


def routes(config: str) -> list[tuple[re.Pattern, str]]:
    """The model map's regexes, read as nginx reads a quoted string (\\" is ")."""
    block = config.split("map $request_body $glmfleet_upstream {", 1)[1].split("}", 1)[0]
    return [
        (re.compile(pattern.replace('\\"', '"')), upstream)
        for pattern, upstream in re.findall(r'^\s*"~(.*)" (\w+);$', block, re.M)
    ]


def route(config: str, body: dict) -> str | None:
    text = json.dumps(body)
    return next((upstream for pattern, upstream in routes(config) if pattern.search(text)), None)


def test_requests_route_by_the_model_in_their_body():
    config = render_config(gateway_cfg(), pool(fleet_inventory()))
    messages = [{"role": "user", "content": 'say "model": "glm-air"'}]
    assert route(config, {"model": "glm-air", "messages": messages}) == "glmfleet_model_1"
    assert route(config, {"messages": messages, "model": "zai-org/GLM-4-9B-0414"}) == "glmfleet_model_0"
    # Neither a prefix nor a model named only inside a message matches.
    assert route(config, {"model": "glm-air-2", "messages": messages}) is None
    assert route(config, {"model": "zai-org/GLM-4-9B", "messages": messages}) is None
    assert "    default glmfleet_model_0;" in config


def test_the_key_is_checked_at_the_edge_from_a_root_only_include():
    config = render_config(gateway_cfg(), pool(fleet_inventory()))
    assert "sk-edge" not in config
    assert "    default 0;\n    include /etc/nginx/glmfleet-gateway-keys.conf;" in config
    assert render_keys("sk-edge").splitlines()[1] == '"Bearer sk-edge" 1;'
    assert "    default 1;" in render_config(gateway_cfg(vllm_api_key=None), pool(fleet_inventory()))
    assert "Bearer" not in render_keys(None)
    assert "$http_authorization" not in config.split("log_format", 1)[1].split(";", 1)[0]


def test_served_names_and_keys_the_gateway_cannot_carry_are_refused():
    with pytest.raises(ConfigError, match=r"gw: vllm_served_model_name = 'glm\$air' cannot be routed by the gateway"):
        gateway_cfg(vllm_served_model_name="glm$air")
    with pytest.raises(
        ConfigError, match="gw: vllm_api_key = <hidden> is invalid; accepted: None or printable ASCII without spaces"
    ) as error:
        gateway_cfg(vllm_api_key="sk secret")
    assert "sk secret" not in str(error.value)


@pytest.mark.parametrize(
    "command",
    [
        reload_command(),
        keep_command(resolve({}, "h")),
        restore_command(resolve({}, "h")),
    ],
)
def test_host_commands_are_valid_shell(command):
    assert subprocess.run(["sh", "-n", "-c", command]).returncode == 0


# --- the status program, on real output ----------------------------------------------------


def test_the_unit_parses_back_to_the_command_it_was_rendered_from(tmp_path):
    cfg = resolve(
        {
            "vllm_host": "0.0.0.0",
            "vllm_allow_unauthenticated": True,
            "vllm_port": 9000,
            "vllm_served_model_name": "glm",
            "model_revision": REVISION,
            "vllm_extra_args": ["--chat-template", "/srv/a b/100%$x.jinja"],
            "vllm_tensor_parallel_size": 8,
        }
    )
    unit = tmp_path / "vllm.service"
    unit.write_text(render_unit(cfg))
    parsed = STATUS["read_unit"](str(unit))
    assert parsed["argv"] == vllm_command(cfg)
    assert (parsed["model"], parsed["revision"], parsed["served_model_name"]) == (cfg.model, REVISION, "glm")
    assert (parsed["base_url"], parsed["tensor_parallel_size"]) == ("http://127.0.0.1:9000", 8)
    assert STATUS["read_unit"](str(tmp_path / "absent.service")) is None


def test_an_image_units_command_parses_to_its_image_and_model(tmp_path):
    cfg = resolve(
        {
            "vllm_runtime": "image",
            "vllm_image_digest": "sha256:" + "ab" * 32,
            "vllm_port": 8100,
            "vllm_served_model_name": "glm",
            "model_revision": REVISION,
        }
    )
    unit = tmp_path / "vllm.service"
    unit.write_text(render_unit(cfg))
    parsed = STATUS["read_unit"](str(unit))
    assert parsed["argv"] == vllm_command(cfg)
    assert (parsed["image"], parsed["venv"]) == ("vllm/vllm-openai@sha256:" + "ab" * 32, None)
    assert (parsed["model"], parsed["revision"], parsed["served_model_name"], parsed["base_url"]) == (
        cfg.model,
        REVISION,
        "glm",
        "http://127.0.0.1:8100",
    )


def test_requests_in_flight_sum_vllms_gauges_over_engines():
    """As vLLM renders /metrics: prometheus_client, a sample per engine and model."""
    registry = prometheus_client.CollectorRegistry()
    labels = ["engine", "model_name"]
    running = prometheus_client.Gauge("vllm:num_requests_running", "running", labels, registry=registry)
    waiting = prometheus_client.Gauge("vllm:num_requests_waiting", "waiting", labels, registry=registry)
    done = prometheus_client.Counter("vllm:request_success", "done", labels, registry=registry)
    for engine in ("0", "1"):
        running.labels(engine, "glm").set(0)
        waiting.labels(engine, "glm").set(0)
        done.labels(engine, "glm").inc(7)
    assert STATUS["in_flight"](prometheus_client.generate_latest(registry).decode()) == 0
    running.labels("0", "glm").set(2)
    running.labels("1", "glm").set(1)
    waiting.labels("1", "glm").set(3)
    assert STATUS["in_flight"](prometheus_client.generate_latest(registry).decode()) == 6


def test_gpus_parse_from_nvidia_smi_on_an_h200():
    """tests/fixtures/nvidia-smi-query-h200.csv: `nvidia-smi --query-gpu=...` on an H200 machine."""
    gpus = STATUS["parse_gpus"]((DATA / "nvidia-smi-query-h200.csv").read_text())
    assert gpus == [
        {"index": 0, "name": "NVIDIA H200", "memory_used_mib": 0, "memory_total_mib": 143771, "utilization_percent": 0}
    ]
    status = {"gpus": gpus * 8, "gpu_error": None, "unit": None}
    assert row("gpu-01", status)[4] == "8x NVIDIA H200 (0/1123 GiB used)"


# --- the tables ----------------------------------------------------------------------------


def fleet_status() -> dict:
    """tests/fixtures/vllm-status-fleet-host.json: files/vllm_status.py's output on a fleet host."""
    return json.loads((DATA / "vllm-status-fleet-host.json").read_text())


def test_status_rows_say_what_each_host_runs():
    assert row("fleet-01", fleet_status()) == (
        "fleet-01",
        "active (running)",
        "0.1.0",
        "zai-org/GLM-4-9B-0414",
        "no nvidia-smi",
        "ok",
        "0",
    )
    with_revision = fleet_status()
    with_revision["unit"] |= {"revision": REVISION, "served_model_name": "glm"}
    assert row("fleet-01", with_revision)[3] == f"zai-org/GLM-4-9B-0414@{REVISION[:12]} as glm"
    stopped = fleet_status() | {"health": "[Errno 111] Connection refused", "version": None, "in_flight": None}
    stopped["service"] |= {"ActiveState": "failed", "SubState": "failed"}
    assert row("fleet-01", stopped)[1:] == (
        "failed (failed)",
        "vllm-test-double-0.1.0-a0aee950abfd",
        "zai-org/GLM-4-9B-0414",
        "no nvidia-smi",
        "no answer ([Errno 111] Connection refused)",
        "-",
    )
    no_driver = fleet_status() | {
        "gpu_error": "NVIDIA-SMI has failed because it couldn't communicate with the "
        "NVIDIA driver. Make sure that the latest NVIDIA driver is installed."
    }
    assert (
        row("fleet-01", no_driver)[4] == "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"
    )
    assert row("fleet-02", None, "timed out")[1] == "unreachable: timed out"
    lines = render([row("fleet-01", fleet_status())]).splitlines()
    assert lines[0].split() == ["host", "unit", "vllm", "model", "gpus", "health", "in", "flight"]


def test_the_rollout_table_shows_before_after_result_time_and_why():
    after = fleet_status()
    after["unit"] = after["unit"] | {"sha256": "0" * 64}
    results = [
        HostResult("fleet-01", fleet_status(), after, "updated", ready_s=2.345),
        HostResult(
            "fleet-02",
            fleet_status(),
            fleet_status(),
            "FAILED, rolled back",
            True,
            None,
            "not serving after 15 s: no answer\n--- last lines of the vllm.service journal:\nboom",
        ),
        HostResult("fleet-03", None),
    ]
    lines = table(results).splitlines()
    assert re.split(r"\s{2,}", lines[1]) == [
        "fleet-01",
        "0.1.0 unit e7e39d93",
        "0.1.0 unit 00000000",
        "updated",
        "2.3 s",
        "",
    ]
    assert re.split(r"\s{2,}", lines[2])[3:] == ["FAILED, rolled back", "-", "not serving after 15 s: no answer"]
    assert re.split(r"\s{2,}", lines[3])[1:4] == ["-", "-", "not reached (rollout stopped)"]
    assert describe({"unit": None}) == "not deployed"


def test_the_gateway_plans_only_what_differs_and_foresees_what_the_package_brings():
    from roles.gateway import CONFIG_PATH, DEFAULT_SITE, KEYS_PATH, NGINX, gateway
    from tests.support.planning import plan

    data = {"vllm_api_key": "sk-edge", "model_revision": "0" * 40}
    # A bare host: nginx comes in this run with its welcome site, which must go in the same run,
    # and the package starts it before its configuration is written: it must reload.
    bare = plan(gateway, data, {})
    assert [op.name for op in bare] == [
        "gateway | nginx",
        "gateway | no default site",
        f"gateway | API keys {KEYS_PATH}",
        f"gateway | gateway config {CONFIG_PATH}",
        "gateway | nginx running",
        "gateway | reload nginx, wait until the new pool is in force",
    ]
    # nginx installed and running, its welcome site gone, the keys right, the config stale.
    keys = hashlib.sha256(render_keys("sk-edge").encode()).hexdigest()
    # The ManagedPaths command's output: find's lines, sha256sum's, then the unit's and systemctl show's.
    converged = [
        f"path\t{NGINX}\tf|root|root|755",
        f"path\t{KEYS_PATH}\tf|root|root|600",
        f"path\t{CONFIG_PATH}\tf|root|root|644",
        f"{'0' * 64}  {NGINX}",
        f"{keys}  {KEYS_PATH}",
        f"{'0' * 64}  {CONFIG_PATH}",
        "unit\tnginx.service",
        "SubState=running",
        "UnitFileState=enabled",
    ]
    assert DEFAULT_SITE not in "\n".join(converged)
    assert [op.name for op in plan(gateway, data, {NGINX: converged})] == [
        f"gateway | gateway config {CONFIG_PATH}",
        "gateway | reload nginx, wait until the new pool is in force",
    ]


def test_a_gateway_port_that_its_own_vllm_takes_is_refused_before_any_host(tmp_path):
    """On a gateway host that also serves, the two listeners must not collide: refused at
    validation (the reload would fail after 30 s with the bind error only in nginx's log)."""
    from pyinfra.api import Config, State

    from glmfleet.config import validate_inventory

    inventory = Inventory(
        ([("gpu-01", {"vllm_port": 8080}), ("gpu-02", {"vllm_port": 8080})], {"model_revision": REVISION}),
        gateway=(["gpu-01"], {"gateway_port": 8080}),
    )
    State(inventory, Config())
    message = str(pytest.raises(ConfigError, validate_inventory, inventory).value)
    assert (
        "gpu-01: gateway_port = 8080 on 127.0.0.1 is also vllm_port on 127.0.0.1 of this host, which serves and runs "
        "the gateway: set gateway_port to another port"
    ) in message
    assert "gpu-02" not in message  # not a gateway: its port is its own
