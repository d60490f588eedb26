"""`glmfleet status`: per host, what its vLLM runs and how it is doing, in one round trip each."""

from __future__ import annotations

from collections.abc import Callable

from glmfleet.facts.vllm import VllmStatus
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


def render(rows: list[tuple[str, ...]]) -> str:
    rows = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows)


def fleet_status(
    inventory_path: str, data: dict, limit: list[str] | None = None, say: Callable[[str], None] = print
) -> int:
    """Print the table; returns 1 when a host is unreachable or does not serve, else 0."""
    inventory = load_inventory(inventory_path, data)
    names = select(inventory, limit or [])
    with Run(inventory, names) as run:
        statuses = run.facts(VllmStatus, path=UNIT_PATH)
        unreachable = run.unreachable
    say(render([row(name, statuses.get(name), unreachable.get(name)) for name in names]))
    healthy = all(statuses.get(name, {}).get("health") == 200 for name in names)
    return 0 if healthy else 1
