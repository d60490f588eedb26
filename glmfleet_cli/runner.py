"""pyinfra runs driven from Python, for the `glmfleet` commands (rollout, status).

The inventory is loaded once, the way `pyinfra INVENTORY` loads it (inventory file, group_data/,
--data), and validated whole. Each :class:`Run` then connects to some of its hosts, plans
roles on them in parallel (as pyinfra's CLI plans a deploy file) and executes: a fresh pyinfra
State over a fresh copy of the inventory, because pyinfra's hosts remember the operations of
the State they last served in.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import pyinfra
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operations import run_ops
from pyinfra.api.state import BaseStateCallback, StateStage
from pyinfra.context import ctx_config, ctx_host, ctx_state
from pyinfra_cli.inventory import make_inventory

from glmfleet.config import validate_inventory
from glmfleet.connection import LostConnections, without_nagle
from roles import prepare_control_node


class UsageError(ValueError):
    """A malformed command line (--batch, --max-fail, --limit): nothing was touched."""


def select(inventory: Inventory, limit: list[str]) -> list[str]:
    """The hosts a rollout covers: --limit names groups or host name patterns, as pyinfra's."""
    if not limit:
        return [h.name for h in inventory]
    chosen = set()
    for pattern in limit:
        group = inventory.groups.get(pattern) or [h for h in inventory if fnmatch.fnmatch(h.name, pattern)]
        if not group:
            raise UsageError(f"--limit {pattern!r} matches no group and no host")
        chosen.update(h.name for h in group)
    return [h.name for h in inventory if h.name in chosen]


def load_inventory(path: str, data: dict[str, Any] | None = None) -> Inventory:
    """The inventory as `pyinfra PATH --data ...` sees it; raises ConfigError if any host's
    configuration is invalid (before anything connects)."""
    # Loading executes the inventory and group_data files, which pyinfra does inside a State.
    with ctx_state.use(State()):
        inventory = make_inventory(path, override_data=data or {}, cwd=os.getcwd())
    validate_inventory(inventory)
    return inventory


def copy_inventory(inventory: Inventory) -> Inventory:
    """The same hosts, groups and data in new Host objects."""
    names = [(host.name, inventory.host_data[host.name]) for host in inventory]
    groups = {
        name: ([host.name for host in inventory.groups.get(name, [])], data)
        for name, data in inventory.group_data.items()
    }
    return Inventory((names, inventory.data), override_data=inventory.override_data, **groups)


class OperationTimes(BaseStateCallback):
    """When each operation started and ended on each host (monotonic seconds)."""

    def __init__(self) -> None:
        self.started: dict[tuple[str, str], float] = {}
        self.ended: dict[tuple[str, str], float] = {}

    def operation_host_start(self, state, host, op_hash):
        self.started[host.name, op_hash] = time.monotonic()

    def operation_host_success(self, state, host, op_hash, retry_count=0):
        self.ended[host.name, op_hash] = time.monotonic()

    def operation_host_error(self, state, host, op_hash, retry_count=0, max_retries=0):
        self.ended[host.name, op_hash] = time.monotonic()


class ConnectErrors(BaseStateCallback):
    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def host_connect_error(self, state, host, error):
        self.errors[host.name] = str(error.args[0] if getattr(error, "args", None) else error)


class Run:
    """One pyinfra run over `names` (the rest of the inventory stays visible to the roles,
    e.g. the gateway's pool, but is not connected to)."""

    def __init__(self, inventory: Inventory, names: Iterable[str], check_for_changes: bool = False):
        self.inventory = copy_inventory(inventory)
        self.state = State(check_for_changes=check_for_changes)
        self.state.init(self.inventory, Config(), initial_limit=[self.inventory.get_host(name) for name in names])
        validate_inventory(self.inventory)  # kept on this run's State, for every host_config of the run
        prepare_control_node(self.inventory)
        self.times = OperationTimes()
        self.connect_errors = ConnectErrors()
        self.lost = LostConnections()
        for handler in (self.times, self.connect_errors, self.lost):
            self.state.add_callback_handler(handler)
        self.plan_errors: dict[str, str] = {}

    def __enter__(self) -> Run:
        with ctx_state.use(self.state):
            try:
                connect_all(self.state)
            except PyinfraError:  # "No hosts remaining!": every host failed to connect
                pass
        for host in self.state.active_hosts:
            without_nagle(host)
        return self

    def __exit__(self, *exc) -> None:
        with ctx_state.use(self.state):
            disconnect_all(self.state)

    @property
    def active(self) -> list[str]:
        return sorted(host.name for host in self.state.active_hosts)

    def plan(self, deploy: Callable, *args, **kwargs) -> dict[str, Any]:
        """Call a role (a @deploy function) on every connected host, in parallel as the CLI
        does; returns what it returned, per host name. A host lost while planning (its
        connection dropped) fails alone, where pyinfra's CLI would stop everything."""
        results: dict[str, Any] = {}
        errors: dict = {}
        # pyinfra's API numbers each host's operations, so the n-th operation of two hosts
        # counts as one even where they differ (a head's request check and its rank's check):
        # planned as the CLI plans, an operation is its call site, and hosts meet there.
        self.state.set_stage(StateStage.Prepare)
        pyinfra.is_cli = True

        def plan_host(host):
            try:
                with ctx_config.use(self.state.config.copy()), ctx_host.use(host):
                    results[host.name] = deploy(*args, **kwargs)
            except Exception as error:  # whatever went wrong is this host's failure, reported
                errors[host] = f"planning failed: {type(error).__name__}: {error}"

        try:
            with ctx_state.use(self.state):
                greenlets = [self.state.pool.spawn(plan_host, host) for host in self.inventory.get_active_hosts()]
                gevent.joinall(greenlets, raise_error=True)
        finally:
            pyinfra.is_cli = False
        with ctx_state.use(self.state):
            for host, why in errors.items():
                self.plan_errors[host.name] = why
                try:
                    self.state.fail_hosts({host})
                except PyinfraError:  # "No hosts remaining!"
                    pass
        return results

    def facts(self, fact_cls, **kwargs) -> dict[str, Any]:
        """One fact from every connected host, in parallel; a host whose fact fails is failed."""
        return self.plan(lambda: ctx_host.get().get_fact(fact_cls, **kwargs))

    def execute(self) -> None:
        try:
            run_ops(self.state)
        except PyinfraError:  # "No hosts remaining!": every host failed
            pass

    @property
    def unreachable(self) -> dict[str, str]:
        """Host name -> why it could not be connected to, or why its connection was lost."""
        return {**self.connect_errors.errors, **self.lost.lost}

    def failed(self) -> dict[str, str]:
        """Host name -> why it failed: its connection error, or the output of the first
        operation that failed on it."""
        return {
            host.name: self.unreachable.get(host.name)
            or self.plan_errors.get(host.name)
            or self._failed_op_output(host)
            for host in self.state.failed_hosts
        }

    def _failed_op_output(self, host) -> str:
        for op_hash in host.op_hash_order:
            op_data = self.state.ops[host].get(op_hash)
            if op_data is None:
                continue
            meta = op_data.operation_meta
            if meta.is_complete() and meta.did_error():
                output = "\n".join(meta.stdout_lines + meta.stderr_lines).strip()
                names = " / ".join(sorted(self.state.op_meta[op_hash].names))
                return output or f"{names} failed with no output"
        return "a fact failed while reading the host (-v shows pyinfra's output)"

    def seconds(self, host: str, first_op, last_op) -> float | None:
        """From the start of first_op to the end of last_op on a host, if both ran there."""
        start = self.times.started.get((host, first_op._hash))
        end = self.times.ended.get((host, last_op._hash))
        return None if start is None or end is None else end - start
