"""Replica groups: one model served by several hosts through vLLM's own multi-node runtime.

A host with ``vllm_group`` set is rank ``vllm_group_rank`` of that group; rank 0 is the head.
Hosts without it are replicas of one host each, as before. How the group runs follows the
layout it is given, the way vLLM's recipes (``strategies/multi_node_*.yaml``) run it:

- ``vllm_data_parallel_size`` 1 (tensor and/or pipeline parallel across the hosts,
  ``multi_node_tp``/``_tp_pp``/``_tep``): vLLM's multiprocessing backend, ``--nnodes``,
  ``--node-rank``, ``--master-addr``/``--master-port``; ranks after the head run
  ``--headless`` and serve no API: the head is the group's one endpoint.
- ``vllm_data_parallel_size`` above 1 (``multi_node_dep``): data parallel ranks spread over the
  hosts with hybrid load balancing: every host runs its own API server for its local ranks,
  and every host is an endpoint of the group.

Pure functions of the hosts' configurations: config.validate_inventory checks every group
before any host is touched, the roles render each rank's command from its group.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The keys of what each rank's vLLM runs: a key of these prefixes, but the few that only
# glmfleet itself reads.
GLMFLEET_SIDE_KEYS = {
    "vllm_ready_timeout",
    "vllm_allow_unauthenticated",
    "vllm_flashinfer_index_url",
    "model_source",
    "model_control_dir",
    "model_transfer_limit_mbps",
    "model_fanout",
}
# What every rank must agree on: a key of these prefixes, but the few that are a host's own.
GROUP_WIDE_PREFIXES = ("vllm_", "model")
PER_RANK_KEYS = {
    "vllm_env",  # a host's own tuning (CUDA_VISIBLE_DEVICES, NCCL_IB_HCA) may differ
    "vllm_group_rank",
    "vllm_group_address",
    "vllm_group_interface",
    "vllm_host",
    "vllm_port",
    "vllm_allow_unauthenticated",
    "vllm_ready_timeout",
    "vllm_start_timeout",
    "vllm_shutdown_timeout",
    "vllm_engine_ready_timeout",
    "vllm_state_dir",
    "vllm_venv_root",
    "vllm_python",
    "vllm_flashinfer_index_url",
    "model_dir",
    "model_root",
    "model_source",
    "model_control_dir",
    "model_transfer_limit_mbps",
    "model_fanout",
}


@dataclass(frozen=True)
class ReplicaGroup:
    name: str
    ranks: tuple[str, ...]  # host names, rank 0 (the head) first
    addresses: tuple[str, ...]  # each rank's address on the group's network
    data_parallel: int  # vllm_data_parallel_size of the whole group
    master_port: int
    rpc_port: int
    revision: str  # a digest of every rank's settings (secrets left out)

    @property
    def head(self) -> str:
        return self.ranks[0]

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def every_rank_serves(self) -> bool:
        """Data parallel with hybrid load balancing: each host runs an API server."""
        return self.data_parallel > 1

    def rank_of(self, host: str) -> int:
        return self.ranks.index(host)

    def endpoints(self) -> tuple[str, ...]:
        """The hosts whose API serves the group's model."""
        return self.ranks if self.every_rank_serves else (self.head,)

    def serve_args(self, host: str) -> list[str]:
        """The flags that make ``host`` its rank of the group (after the layout's own flags)."""
        rank, head = self.rank_of(host), self.addresses[0]
        if self.every_rank_serves:
            local = self.data_parallel // self.size
            return [
                "--data-parallel-size-local",
                str(local),
                "--data-parallel-start-rank",
                str(rank * local),
                "--data-parallel-address",
                head,
                "--data-parallel-rpc-port",
                str(self.rpc_port),
                "--data-parallel-hybrid-lb",
            ]
        args = ["--nnodes", str(self.size), "--node-rank", str(rank), "--master-addr", head]
        args += ["--master-port", str(self.master_port)]
        return args + (["--headless"] if rank else [])

    def environment(self, host: str, interface: str | None) -> dict[str, str]:
        """vLLM's address for this host (its message queues bind there), and the interface NCCL
        and Gloo use where the site names one."""
        env = {"VLLM_HOST_IP": self.addresses[self.rank_of(host)]}
        if interface:
            env.update(NCCL_SOCKET_IFNAME=interface, GLOO_SOCKET_IFNAME=interface)
        return env


def gpus_per_host(cfg: Mapping[str, Any], hosts: int) -> int:
    """The GPUs each host of a group of ``hosts`` gives the layout (all of it for one host)."""
    world = cfg["vllm_tensor_parallel_size"] * cfg["vllm_pipeline_parallel_size"] * cfg["vllm_data_parallel_size"]
    return world // hosts


def revision(hosts: tuple[str, ...], configs, secret_keys: frozenset[str]) -> str:
    values = [
        {
            key: value
            for key, value in configs[host].items()
            if key.startswith(GROUP_WIDE_PREFIXES) and key not in GLMFLEET_SIDE_KEYS and key not in secret_keys
        }
        for host in hosts
    ]
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def replica_groups(
    configs: Mapping[str, Mapping[str, Any]], secret_keys: frozenset[str] = frozenset()
) -> dict[str, ReplicaGroup]:
    """The groups of a validated inventory (``group_problems`` found none), by name."""
    members: dict[str, list[tuple[int, str]]] = {}
    for host, cfg in configs.items():
        if cfg["vllm_group"]:
            members.setdefault(cfg["vllm_group"], []).append((cfg["vllm_group_rank"], host))
    groups = {}
    for name, ranked in members.items():
        hosts = tuple(host for _, host in sorted(ranked))
        head = configs[hosts[0]]
        groups[name] = ReplicaGroup(
            name=name,
            ranks=hosts,
            addresses=tuple(configs[host]["vllm_group_address"] for host in hosts),
            data_parallel=head["vllm_data_parallel_size"],
            master_port=head["vllm_group_master_port"],
            rpc_port=head["vllm_group_rpc_port"],
            revision=revision(hosts, configs, secret_keys),
        )
    return groups


def group_of(
    host: str, configs: Mapping[str, Mapping[str, Any]], secret_keys: frozenset[str] = frozenset()
) -> ReplicaGroup | None:
    name = configs[host]["vllm_group"]
    return replica_groups(configs, secret_keys)[name] if name else None


def group_problems(configs: Mapping[str, Mapping[str, Any]], secret_keys: frozenset[str] = frozenset()) -> list[str]:
    """What makes a group unable to form: ranks missing or twice, ranks that disagree on what
    they serve, a layout the hosts cannot divide. Each message names the group and the fix."""
    members: dict[str, list[str]] = {}
    for host, cfg in configs.items():
        if cfg["vllm_group"]:
            members.setdefault(cfg["vllm_group"], []).append(host)
    found = []
    for name, hosts in sorted(members.items()):
        found += rank_problems(name, hosts, configs)
        found += agreement_problems(name, hosts, configs, secret_keys)
        found += layout_problems(name, hosts, configs[min(hosts, key=lambda h: configs[h]["vllm_group_rank"])])
        found += [
            f"{host}: vllm_group = {name!r} needs vllm_group_address (the address the other ranks reach this host "
            "on) or an inventory address that is an IP"
            for host in hosts
            if not configs[host]["vllm_group_address"]
        ]
    return found


def rank_problems(name: str, hosts: list[str], configs) -> list[str]:
    by_rank: dict[int, list[str]] = {}
    for host in hosts:
        by_rank.setdefault(configs[host]["vllm_group_rank"], []).append(host)
    found = [
        f"replica group {name!r}: vllm_group_rank = {rank} is given to {' and '.join(sorted(twice))}: give each "
        "host of the group its own rank"
        for rank, twice in sorted(by_rank.items())
        if len(twice) > 1
    ]
    missing = sorted(set(range(max(by_rank) + 1)) - set(by_rank))
    if missing:
        found.append(
            f"replica group {name!r}: ranks {sorted(by_rank)} leave out {missing}: ranks run 0 (the head) to "
            f"{len(hosts) - 1}, one host each; add the missing hosts or renumber"
        )
    return found


def agreement_problems(name: str, hosts: list[str], configs, secret_keys: frozenset[str]) -> list[str]:
    keys = sorted(
        key
        for key in configs[hosts[0]]
        if key.startswith(GROUP_WIDE_PREFIXES) and key not in PER_RANK_KEYS and key != "vllm_group"
    )
    found = []
    for key in keys:
        values = {host: configs[host][key] for host in hosts}
        if len({repr(value) for value in values.values()}) > 1:
            shown = ", ".join(
                f"{host}: {'<hidden>' if key in secret_keys else repr(value)}" for host, value in sorted(values.items())
            )
            found.append(f"replica group {name!r}: its ranks disagree on {key} ({shown}): set one value for the group")
    return found


def layout_problems(name: str, hosts: list[str], cfg: Mapping[str, Any]) -> list[str]:
    tp, pp, dp = cfg["vllm_tensor_parallel_size"], cfg["vllm_pipeline_parallel_size"], cfg["vllm_data_parallel_size"]
    count = len(hosts)
    if dp > 1:
        if dp % count:
            return [
                f"replica group {name!r}: vllm_data_parallel_size = {dp} does not split over its {count} hosts: make "
                f"it a multiple of {count} (each host runs the same number of data parallel ranks)"
            ]
        return []
    if (tp * pp) % count:
        return [
            f"replica group {name!r}: vllm_tensor_parallel_size = {tp} × vllm_pipeline_parallel_size = {pp} "
            f"({tp * pp} GPUs) does not split over its {count} hosts: make the product a multiple of {count}"
        ]
    return []
