"""Replica groups: the checks that run before any host is touched, and each rank's command and
environment as the roles render them (vLLM's own multi-node flags, as vllm-project/recipes'
strategies run them)."""

from __future__ import annotations

import pytest

from glmfleet.config import ConfigError, all_settings, resolve, values
from glmfleet.groups import group_problems, replica_groups
from roles.vllm_service import render_unit, serve_args, vllm_environment

REVISION = "a" * 40


def fleet(*hosts: tuple[str, dict], **common) -> dict:
    """Validated configurations of hosts (name, data), as validate_inventory makes them."""
    settings = all_settings()
    configs = {}
    for name, data in hosts:
        merged = {"model_revision": REVISION, **common, **data}
        resolve(merged, name)  # every host passes its own checks first
        configs[name] = values(merged, settings)
    return configs


def pair(**common) -> dict:
    """Two hosts as ranks 0 and 1 of group g1; one GPU each unless the layout says otherwise."""
    common.setdefault("vllm_tensor_parallel_size", 1 if common.get("vllm_data_parallel_size", 1) > 1 else 2)
    return fleet(
        ("gpu-a", {"vllm_group": "g1", "vllm_group_rank": 0, "vllm_group_address": "10.0.0.1"}),
        ("gpu-b", {"vllm_group": "g1", "vllm_group_rank": 1, "vllm_group_address": "10.0.0.2"}),
        **common,
    )


def flags_after(argv: list[str], first: str) -> list[str]:
    return argv[argv.index(first) :]


def test_tensor_parallel_over_two_hosts_runs_vllms_multiprocessing_backend_with_a_headless_rank():
    configs = pair(model="glm-5-fp8", vllm_tensor_parallel_size=16)
    group = replica_groups(configs)["g1"]
    head = serve_args(resolve_of(configs, "gpu-a"), None, group)
    rank = serve_args(resolve_of(configs, "gpu-b"), None, group)
    assert flags_after(head, "--nnodes") == [
        "--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1", "--master-port", "29501",
        "--distributed-timeout-seconds", "600",
    ]  # fmt: skip
    assert flags_after(rank, "--nnodes") == [
        "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29501", "--headless",
        "--distributed-timeout-seconds", "600",
    ]  # fmt: skip
    assert head[head.index("--tensor-parallel-size") + 1] == "16"
    assert group.endpoints() == ("gpu-a",)


def test_data_parallel_over_hosts_runs_hybrid_load_balancing_and_every_rank_serves():
    configs = pair(model="glm-5-fp8", vllm_data_parallel_size=16, vllm_enable_expert_parallel=True)
    group = replica_groups(configs)["g1"]
    rank = serve_args(resolve_of(configs, "gpu-b"), None, group)
    assert flags_after(rank, "--data-parallel-size-local") == [
        "--data-parallel-size-local", "8", "--data-parallel-start-rank", "8", "--data-parallel-address", "10.0.0.1",
        "--data-parallel-rpc-port", "29550", "--data-parallel-hybrid-lb", "--distributed-timeout-seconds", "600",
    ]  # fmt: skip
    assert "--headless" not in rank and group.endpoints() == ("gpu-a", "gpu-b")


def test_each_rank_names_its_own_address_and_the_groups_interface():
    configs = pair(vllm_group_interface="ib0")
    group = replica_groups(configs)["g1"]
    env = vllm_environment(resolve_of(configs, "gpu-b"), group)
    assert env["VLLM_HOST_IP"] == "10.0.0.2"
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0"
    assert env["GLMFLEET_GROUP_REVISION"] == group.revision


def test_a_change_on_any_rank_changes_every_ranks_environment():
    """vLLM's ranks do not rejoin a restarted head: the group restarts together."""
    before = replica_groups(pair())["g1"].revision
    changed = fleet(
        ("gpu-a", {"vllm_group": "g1", "vllm_group_rank": 0, "vllm_group_address": "10.0.0.1"}),
        ("gpu-b", {"vllm_group": "g1", "vllm_group_rank": 1, "vllm_group_address": "10.0.0.2", "vllm_port": 8001}),
        vllm_tensor_parallel_size=2,
    )
    assert replica_groups(changed)["g1"].revision != before
    # what only glmfleet reads does not restart the group
    calm = pair(vllm_ready_timeout=60)
    assert replica_groups(calm)["g1"].revision == before


def test_a_headless_rank_restarts_whatever_its_exit_status():
    configs = pair()
    group = replica_groups(configs)["g1"]
    assert "Restart=always" in render_unit(resolve_of(configs, "gpu-b"), None, group)
    assert "Restart=on-failure" in render_unit(resolve_of(configs, "gpu-a"), None, group)


@pytest.mark.parametrize(
    ("ranks", "words"),
    [
        ([0, 0], "replica group 'g1': vllm_group_rank = 0 is given to gpu-a and gpu-b"),
        ([0, 2], "replica group 'g1': ranks [0, 2] leave out [1]"),
        ([1, 2], "leave out [0]"),
    ],
)
def test_ranks_twice_or_missing_are_refused(ranks, words):
    configs = fleet(
        ("gpu-a", {"vllm_group": "g1", "vllm_group_rank": ranks[0], "vllm_group_address": "10.0.0.1"}),
        ("gpu-b", {"vllm_group": "g1", "vllm_group_rank": ranks[1], "vllm_group_address": "10.0.0.2"}),
        vllm_tensor_parallel_size=2,
    )
    assert any(words in problem for problem in group_problems(configs)), group_problems(configs)


def test_ranks_that_disagree_on_what_they_serve_are_refused():
    configs = fleet(
        ("gpu-a", {"vllm_group": "g1", "vllm_group_rank": 0, "vllm_group_address": "10.0.0.1"}),
        (
            "gpu-b",
            {"vllm_group": "g1", "vllm_group_rank": 1, "vllm_group_address": "10.0.0.2", "vllm_version": "0.21.0"},
        ),
        vllm_tensor_parallel_size=2,
    )
    assert group_problems(configs) == [
        "replica group 'g1': its ranks disagree on vllm_version (gpu-a: '0.22.0', gpu-b: '0.21.0'): set one value for "
        "the group"
    ]


def test_a_secret_that_differs_is_named_not_shown():
    configs = pair()
    configs["gpu-b"] = {**configs["gpu-b"], "vllm_api_key": "sk-b"}
    [problem] = group_problems(configs, frozenset({"vllm_api_key"}))
    assert "vllm_api_key (gpu-a: <hidden>, gpu-b: <hidden>)" in problem and "sk-b" not in problem


@pytest.mark.parametrize(
    ("layout", "words"),
    [
        ({"vllm_tensor_parallel_size": 3, "model": "x/y"}, "(3 GPUs) does not split over its 2 hosts"),
        ({"vllm_data_parallel_size": 3}, "vllm_data_parallel_size = 3 does not split over its 2 hosts"),
        ({"vllm_tensor_parallel_size": 4}, None),
        ({"vllm_data_parallel_size": 4, "vllm_enable_expert_parallel": True}, None),
    ],
)
def test_a_layout_the_hosts_cannot_share_is_refused(layout, words):
    found = group_problems(pair(**layout))
    assert (found == []) if words is None else any(words in problem for problem in found), found


def test_a_rank_without_an_address_is_refused():
    configs = fleet(
        ("gpu-a", {"vllm_group": "g1", "vllm_group_rank": 0}),
        ("gpu-b", {"vllm_group": "g1", "vllm_group_rank": 1, "vllm_group_address": "10.0.0.2"}),
        vllm_tensor_parallel_size=2,
    )
    assert any(
        problem.startswith("gpu-a: vllm_group = 'g1' needs vllm_group_address") for problem in group_problems(configs)
    )


def test_the_inventory_address_is_the_ranks_address_where_it_is_an_ip():
    data = {"vllm_group": "g1", "ssh_hostname": "10.1.2.3"}
    assert values(data, all_settings())["vllm_group_address"] == "10.1.2.3"
    assert values({**data, "ssh_hostname": "gpu-7.example"}, all_settings())["vllm_group_address"] is None


def test_group_flags_in_extra_args_are_refused():
    with pytest.raises(ConfigError, match="vllm_extra_args contains '--node-rank'; set vllm_group_rank instead"):
        resolve({"vllm_extra_args": ["--node-rank", "1"]})


def resolve_of(configs: dict, name: str):
    from glmfleet.config import HostConfig

    return HostConfig(name, configs[name])
