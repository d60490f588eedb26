"""Replica groups on 5 real fleet hosts: two groups of two hosts and one host alone, behind the
gateway. Group g1 runs tensor parallel over its hosts (vLLM's multiprocessing backend: the head
serves, rank 1 runs --headless); g2 runs data parallel with hybrid load balancing (both ranks
serve). The hosts run the vLLM test double, which joins ranks as vLLM does (tests/support/
vllm_test_double: group.py). Runs after test_rollout_fleet.py, on its hosts plus a fifth,
which is powered off afterwards; the tests run in file order.
"""

from __future__ import annotations

import re

import pytest

from devfleet import localfleet
from tests.fleet.test_rollout_fleet import (
    API_KEY,
    ENV,
    LATENCY,
    MODEL,
    gateway_config,
    gateway_url,
    in_pool,
    main_pid,
    result,
)
from tests.support.fleettools import TEST_DOUBLE, deploy, fleet_host, gateway_port, glmfleet, pyinfra, write_inventory
from tests.support.loadgen import Load

pytestmark = pytest.mark.fleet

HOSTS = 5


@pytest.fixture(scope="module")
def hosts(fleet):
    before = {host["name"] for host in localfleet.load_hosts()}
    localfleet.up(HOSTS)
    names = [host["name"] for host in localfleet.load_hosts()][:HOSTS]
    yield names
    for name in names:
        if name not in before:
            localfleet.stop_host(name)


@pytest.fixture(scope="module")
def data(package_index, test_model):
    double = {key: value for key, value in TEST_DOUBLE.items() if key != "vllm_ready_timeout"}
    return double | test_model | {"pip_index_url": package_index}


def group_data(hosts, **extra: dict) -> dict[str, dict]:
    """g1: tensor parallel 2 over hosts 1-2; g2: data parallel 2 over hosts 3-4 (its own ports:
    the fleet's hosts share one network namespace); host 5 alone."""
    g1 = {"vllm_group": "g1", "vllm_tensor_parallel_size": 2}
    g2 = {
        "vllm_group": "g2",
        "vllm_data_parallel_size": 2,
        "vllm_enable_expert_parallel": True,
        "vllm_group_master_port": 29511,
        "vllm_group_rpc_port": 29551,
    }
    ranks = [{**g1, "vllm_group_rank": 0}, {**g1, "vllm_group_rank": 1}]
    ranks += [{**g2, "vllm_group_rank": 0}, {**g2, "vllm_group_rank": 1}, {}]
    return {
        name: {"vllm_env": LATENCY, "vllm_ready_timeout": 60, **rank, **extra.get(name, {})}
        for name, rank in zip(hosts, ranks)
    }


def write(tmp_path, hosts, **extra: dict) -> str:
    groups = {"gateway": ([hosts[0]], {"gateway_port": gateway_port()})}
    return str(write_inventory(tmp_path / "inventory.py", group_data(hosts, **extra), groups))


@pytest.fixture(scope="module")
def deployed(hosts, data, tmp_path_factory):
    path = write(tmp_path_factory.mktemp("groups"), hosts)
    run = deploy(path, data=data, env=ENV)
    assert run.returncode == 0, run.stderr[-4000:]
    return path


def unit_of(name: str) -> str:
    return fleet_host(name).file("/etc/systemd/system/vllm.service").content_string


def listening(name: str) -> bool:
    port = dict(localfleet.inventory_hosts())[name]["vllm_port"]
    return fleet_host(name).run(f"ss -Hltn 'sport = :{port}'").stdout.strip() != ""


def upstreams(hosts) -> list[str]:
    return re.findall(r"# (fleet\d*-\d\d)", gateway_config(hosts))


def test_two_groups_and_a_host_converge_and_a_second_run_changes_nothing(deployed, hosts, data):
    head, rank, dp_a, dp_b, alone = hosts
    assert "--nnodes 2 --node-rank 1 --master-addr 127.0.0.1 --master-port 29501 --headless" in unit_of(rank)
    assert "--nnodes 2 --node-rank 0" in unit_of(head) and "--headless" not in unit_of(head)
    assert "--data-parallel-start-rank 1 --data-parallel-address 127.0.0.1 --data-parallel-rpc-port 29551" in unit_of(
        dp_b
    )
    # The headless rank serves no API; the head and both data parallel ranks do.
    assert not listening(rank)
    assert all(listening(name) for name in (head, dp_a, dp_b, alone))
    # The gateway sends to every endpoint, never to the headless rank.
    assert sorted(set(upstreams(hosts))) == sorted([head, dp_a, dp_b, alone])
    again = deploy(deployed, data=data, env=ENV)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.changed() == {}


def test_status_shows_each_group_with_its_ranks(deployed, hosts, data):
    run = glmfleet("status", deployed, data=data, env=ENV)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    g1 = next(i for i, line in enumerate(lines) if line.startswith("group g1"))
    assert "2 hosts, head " + hosts[0] + " serves" in lines[g1] and "serving" in lines[g1]
    assert lines[g1 + 1].startswith(f"  rank 0 {hosts[0]}") and lines[g1 + 1].split()[-2:] == ["ok", "0"]
    assert lines[g1 + 2].startswith(f"  rank 1 {hosts[1]}") and "runs (headless)" in lines[g1 + 2]
    assert any(line.startswith("group g2") and "every rank serves" in line for line in lines)
    assert any(line.startswith(hosts[4] + " ") for line in lines)


def test_a_rank_stopped_by_hand_is_named_and_the_next_run_brings_the_group_back(deployed, hosts, data):
    fleet_host(hosts[1]).run("systemctl stop vllm.service")
    status = glmfleet("status", deployed, data=data, env=ENV)
    assert status.returncode == 1
    assert re.search(rf"group g1 .*DOWN: .*rank 1 \({hosts[1]}\)", status.stdout), status.stdout
    run = deploy(deployed, data=data, env=ENV)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "vLLM service | (re)start vllm.service" in run.changed()[hosts[1]]
    assert glmfleet("status", deployed, data=data, env=ENV).returncode == 0


def test_a_rollout_rolls_a_group_back_whole_and_the_gateway_never_sends_to_it_half_up(deployed, hosts, data, tmp_path):
    head, rank = hosts[0], hosts[1]
    # every host gets the new setting; rank 1 of g1 cannot start with it
    changed = {name: {"vllm_max_model_len": 4096} for name in hosts}
    changed[rank]["vllm_env"] = {**LATENCY, "VLLM_TEST_DOUBLE_FAIL": "exit"}
    path = write(tmp_path, hosts, **changed)
    untouched = {name: main_pid(name) for name in hosts[2:]}
    with Load(gateway_url(), MODEL, API_KEY, workers=4, max_seconds=300) as load:
        run = glmfleet("rollout", path, "--batch", "1", data=data, env=ENV)
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    # g1 is the first unit: both ranks fail and roll back together; the rest is not reached.
    assert result(run.stdout, head) in ("FAILED, rolled back", "FAILED with its replica group")
    assert result(run.stdout, rank) == "FAILED, rolled back"
    assert "rollout stopped: 1 replica failed, more than --max-fail 0 allows" in run.stdout
    assert "WorkerProc initialization failed (VLLM_TEST_DOUBLE_FAIL=exit)" in run.stdout
    assert {name: main_pid(name) for name in hosts[2:]} == untouched
    # Back on the known-good units: the group serves again, in the pool.
    assert "--max-model-len 4096" not in unit_of(head) + unit_of(rank)
    assert glmfleet("status", deployed, data=data, env=ENV).returncode == 0
    assert in_pool(hosts, head)
    assert load.result.failed == 0, load.result


def test_a_rank_twice_is_refused_before_any_host_is_touched(hosts, data, tmp_path):
    path = write(tmp_path, hosts, **{hosts[1]: {"vllm_group_rank": 0}})
    run = pyinfra(path, "deploy.py", data=data, env=ENV)
    assert run.returncode != 0
    assert "no host was changed" in run.stderr
    assert f"replica group 'g1': vllm_group_rank = 0 is given to {hosts[0]} and {hosts[1]}" in run.stderr
