"""`glmfleet status`: per host, what its vLLM runs and how it is doing, in one round trip each;
a replica group as one row with its ranks under it."""

from __future__ import annotations

from collections.abc import Callable

from glmfleet.config import replica_group
from glmfleet.facts.vllm import VllmStatus
from glmfleet.groups import ReplicaGroup
from glmfleet_cli.runner import Run, load_inventory, select
from roles.vllm_service import UNIT_PATH

COLUMNS = ("host", "unit", "vllm", "model", "gpus", "health", "in flight")


def gpu_summary(status: dict) -> str:
    gpus = status.get("gpus")
    if not gpus:
        # nvidia-smi's errors run to several sentences; the first says what is wrong.
        return (status.get("gpu_error") or "none").split(". ")[0]
    names = sorted({gpu["name"] for gpu in gpus})
    used = sum(gpu["memory_used_mib"] for gpu in gpus) / 1024
    total = sum(gpu["memory_total_mib"] for gpu in gpus) / 1024
    return f"{len(gpus)}x {'/'.join(names)} ({used:.0f}/{total:.0f} GiB used)"


def row(name: str, status: dict | None, unreachable: str | None = None) -> tuple[str, ...]:
    if status is None:
        return (name, f"unreachable: {unreachable}", "", "", "", "", "")
    unit, service = status.get("unit"), status.get("service", {})
    if unit is None:
        return (name, "not deployed", "", "", gpu_summary(status), "", "")
    model = unit["model"] + (f"@{unit['revision'][:12]}" if unit.get("revision") else "")
    if unit["served_model_name"] != unit["model"]:
        model += f" as {unit['served_model_name']}"
    health = status.get("health")
    return (
        name,
        f"{service.get('ActiveState', '?')} ({service.get('SubState', '?')})",
        status.get("version") or unit.get("venv") or unit.get("image") or "?",
        model,
        gpu_summary(status),
        "ok" if health == 200 else (f"HTTP {health}" if isinstance(health, int) else f"no answer ({health})"),
        "-" if status.get("in_flight") is None else str(status["in_flight"]),
    )


def rank_row(name: str, rank: int, status: dict | None, unreachable: str | None) -> tuple[str, ...]:
    """A headless rank serves no API: its unit's state is its health."""
    cells = row(f"  rank {rank} {name}", status, unreachable)
    if status is None or status.get("unit") is None:
        return cells
    active = status.get("service", {}).get("ActiveState") == "active"
    return (*cells[:5], "runs (headless)" if active else "DOWN", "-")


def group_rows(group: ReplicaGroup, statuses: dict, unreachable: dict) -> tuple[list[tuple[str, ...]], bool]:
    """The group's row, then one per rank; and whether the group serves: every rank up and every
    endpoint healthy."""
    rows, down = [], []
    for rank, name in enumerate(group.ranks):
        status = statuses.get(name)
        if name in group.endpoints():
            cells = row(f"  rank {rank} {name}", status, unreachable.get(name))
            healthy = status is not None and status.get("health") == 200
        else:
            cells = rank_row(name, rank, status, unreachable.get(name))
            healthy = status is not None and status.get("service", {}).get("ActiveState") == "active"
        rows.append(cells)
        if not healthy:
            down.append(f"rank {rank} ({name})")
    layout = "data parallel, every rank serves" if group.every_rank_serves else f"head {group.head} serves"
    state = f"DOWN: {', '.join(down)}" if down else "serving"
    return [(f"group {group.name}", f"{group.size} hosts, {layout}", "", "", "", state, ""), *rows], not down


def render(rows: list[tuple[str, ...]]) -> str:
    rows = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows)


def fleet_status(
    inventory_path: str, data: dict, limit: list[str] | None = None, say: Callable[[str], None] = print
) -> int:
    """Print the table; returns 1 when a host is unreachable or does not serve, else 0."""
    inventory = load_inventory(inventory_path, data)
    selected = select(inventory, limit or [])
    # A group is shown whole: every rank of a group any selected host is in.
    names = []
    for name in selected:
        group = replica_group(inventory.get_host(name))
        names += [rank for rank in (group.ranks if group else (name,)) if rank not in names]
    with Run(inventory, names) as run:
        statuses = run.facts(VllmStatus, path=UNIT_PATH)
        unreachable = run.unreachable
    rows, healthy, shown = [], True, set()
    for name in names:
        group = replica_group(inventory.get_host(name))
        if group is None:
            rows.append(row(name, statuses.get(name), unreachable.get(name)))
            healthy = healthy and statuses.get(name, {}).get("health") == 200
        elif group.name not in shown:
            shown.add(group.name)
            group_lines, serves = group_rows(group, statuses, unreachable)
            rows += group_lines
            healthy = healthy and serves
    say(render(rows))
    return 0 if healthy else 1
