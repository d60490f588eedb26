"""`glmfleet rollout`: apply a changed inventory to a serving fleet in health-gated batches.

For each batch (a canary first): build what is slow to build while the hosts still serve, take
them out of the gateway's pool, wait for their in-flight requests, apply the deploy's own roles
(restart, verify with a real request), and put them back. A host that fails to verify is rolled
back to its known-good state and verified again; the rollout stops once more hosts failed than
--max-fail allows. A replica group (several hosts serving one model) is one unit of a batch:
its ranks leave the pool, restart, verify and roll back together, and --max-fail counts it
once.

Which hosts are done is read from the hosts themselves: a host the deploy would not change and
that serves is at the target, so running the same command again after a stop resumes it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyinfra import host
from pyinfra.api import Inventory
from pyinfra.context import ctx_host, ctx_state

from glmfleet.config import replica_group
from glmfleet.facts.vllm import VllmStatus
from glmfleet_cli.runner import Run, UsageError, load_inventory, select
from roles import serving_host
from roles.gateway import GATEWAY_GROUP, gateway
from roles.known_good import drain, keep_known_good, roll_back, serves
from roles.vllm_service import UNIT_PATH

# A rollout restarts services, it does not reboot hosts; the driver role reboots where allowed.
REBOOT_NEEDED = (
    "the new NVIDIA driver is installed but not loaded, and its role may not reboot "
    "(nvidia_allow_reboot is false): reboot the host, then run the rollout again"
)
DEFAULT_BATCHES = "1,25%,100%"
DEFAULT_MAX_FAIL = "0"


def parse_amount(text: str, option: str, minimum: int) -> tuple[int, bool]:
    """'3' -> (3, False); '25%' -> (25, True)."""
    match = re.fullmatch(r"(\d+)(%?)", text.strip())
    if not match or int(match[1]) < minimum or (match[2] and int(match[1]) > 100):
        accepted = f"a count >= {minimum} or a percentage {minimum}%-100%"
        raise UsageError(f"{option} {text!r}: each value must be {accepted}")
    return int(match[1]), bool(match[2])


def batch_sizes(spec: str, total: int) -> list[int]:
    """Batch sizes covering `total` hosts, as Ansible's `serial:` reads them: counts or
    percentages of all hosts (rounded down, at least 1); the last value repeats."""
    amounts = [parse_amount(part, "--batch", 1) for part in spec.split(",")]
    sizes = []
    while sum(sizes) < total:
        value, percent = amounts[min(len(sizes), len(amounts) - 1)]
        size = max(1, total * value // 100) if percent else value
        sizes.append(min(size, total - sum(sizes)))
    return sizes


def failure_budget(spec: str, total: int) -> Callable[[int], bool]:
    """Whether a number of failed hosts exceeds --max-fail (a count or a share of `total`)."""
    value, percent = parse_amount(spec, "--max-fail", 0)
    if percent:
        return lambda failed: failed * 100 > value * total
    return lambda failed: failed > value


@dataclass
class HostResult:
    name: str
    before: dict | None = None
    after: dict | None = None
    result: str = "not reached (rollout stopped)"
    failed: bool = False
    ready_s: float | None = None
    why: str = ""  # for a failure: the failing step's output (the journal tail for a verify)


def describe(status: dict | None) -> str:
    """A host's running vLLM in a few characters: version and the unit's hash."""
    if not status or not status.get("unit"):
        return "-" if not status else "not deployed"
    unit = status["unit"]
    version = status.get("version") or unit.get("venv") or unit.get("image") or "?"
    return f"{version} unit {unit['sha256'][:8]}"


def first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("---")]
    return lines[0][:100] if lines else ""


def table(results: list[HostResult]) -> str:
    rows = [("host", "before", "after", "result", "ready", "why")]
    for r in results:
        ready = f"{r.ready_s:.1f} s" if r.ready_s is not None else "-"
        rows.append((r.name, describe(r.before), describe(r.after), r.result, ready, first_line(r.why)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows)


def survey_host():
    """What a host runs now, whether it serves that, and whether the deploy would change it."""
    status = host.get_fact(VllmStatus, path=UNIT_PATH) or {}
    serving = serves(status.get("unit"))
    serving_host()
    return status, serving


def would_change(run: Run, name: str) -> bool:
    """Whether planning found an operation that would change the host. Operations with an
    `_if` are consequences of others (a restart after a changed unit) and are not counted."""
    host_obj = run.inventory.get_host(name)
    with ctx_state.use(run.state), ctx_host.use(host_obj):
        return any(
            data.operation_meta.will_change
            for data in (run.state.ops[host_obj][op_hash] for op_hash in host_obj.op_hash_order)
            if not data.global_arguments.get("_if")
        )


def update_host():
    """One host of a batch, out of the pool: keep what serves, drain, apply the roles."""
    keep_known_good()
    drain()
    return serving_host()


def units_of(inventory: Inventory, targets: list[str]) -> list[tuple[str, ...]]:
    """What a rollout moves as one: a host, or every rank of its replica group (in rank order,
    each group once, where any of its ranks is a target)."""
    units: list[tuple[str, ...]] = []
    for name in targets:
        group = replica_group(inventory.get_host(name))
        unit = group.ranks if group is not None else (name,)
        if unit not in units:
            units.append(unit)
    return units


@dataclass
class Rollout:
    inventory: Inventory
    targets: list[str]
    exceeded: Callable[[int], bool]
    say: Callable[[str], None]
    results: dict[str, HostResult] = field(default_factory=dict)
    out_of_pool: set[str] = field(default_factory=set)
    last_step: float = 0.0
    units: list[tuple[str, ...]] = field(default_factory=list)

    def unit_of(self, name: str) -> tuple[str, ...]:
        return next(unit for unit in self.units if name in unit)

    @property
    def gateways(self) -> list[str]:
        return [h.name for h in self.inventory.groups.get(GATEWAY_GROUP, [])]

    def failed_count(self) -> int:
        """Failed units: a replica group counts once, however many of its ranks failed."""
        return sum(any(self.results[name].failed for name in unit if name in self.results) for unit in self.units)

    def fail(self, name: str, result: str, why: str) -> None:
        self.results[name].result, self.results[name].failed, self.results[name].why = result, True, why

    def fail_with_group(self, names: list[str]) -> list[str]:
        """Every rank of a group one of ``names`` is in fails with it; returns them all."""
        failed = list(names)
        for name in names:
            for rank in self.unit_of(name):
                if rank not in failed:
                    self.fail(rank, "FAILED with its replica group", f"rank {name} of its group failed")
                    failed.append(rank)
        return failed

    def edit_pool(self) -> str | None:
        """Render every gateway's pool without the hosts out of it; returns why it failed."""
        if not self.gateways:
            return None
        with Run(self.inventory, self.gateways) as run:
            run.plan(gateway, out_of_pool=frozenset(self.out_of_pool))
            run.execute()
            failed = run.failed()
        return "; ".join(f"gateway {name}: {why}" for name, why in failed.items()) or None

    def survey(self) -> list[str]:
        """Read every target; returns the hosts to update (the rest are at the target)."""
        pending = []
        with Run(self.inventory, self.targets, check_for_changes=True) as run:
            planned = run.plan(survey_host)
            failed = run.failed()
            for name in self.targets:
                self.results[name] = HostResult(name)
                if name in failed:
                    self.fail(
                        name, "FAILED: unreachable" if name in run.unreachable else "FAILED while reading", failed[name]
                    )
                    self.out_of_pool.add(name)
                    continue
                status, serves = planned[name]
                self.results[name].before = status
                if serves and not would_change(run, name):
                    self.results[name].result = "already at target"
                    self.results[name].after = status
                else:
                    pending.append(name)
                if not serves:
                    self.out_of_pool.add(name)
        # A group is pending, and out of the pool, as a whole.
        for unit in self.units:
            if set(unit) & set(pending):
                pending += [name for name in unit if name not in pending and not self.results[name].failed]
        return [name for unit in self.units for name in unit if name in pending]

    def step(self, text: str) -> None:
        """Progress, with the time since the previous step."""
        now = time.monotonic()
        self.say(f"  {text} ({now - self.last_step:.1f} s)")
        self.last_step = now

    def run_batch(self, batch: list[str]) -> str | None:
        """One batch; returns why the rollout must stop at once (the gateway failed)."""
        self.last_step = time.monotonic()
        # Build while serving: a host that fails here still runs what it ran, in the pool.
        with Run(self.inventory, batch) as run:
            run.plan(serving_host, stage_only=True)
            run.execute()
            for name, why in run.failed().items():
                if name in run.unreachable:
                    self.fail(name, "FAILED: unreachable", why)
                    self.out_of_pool.add(name)
                else:
                    self.fail(name, "FAILED while staging (unchanged)", why)
                self.say(f"  {name} failed: {first_line(why)}")
        unstaged = self.fail_with_group([name for name in batch if self.results[name].failed])
        staged = [name for name in batch if name not in unstaged]
        self.step(f"staged: {', '.join(staged) or 'none'}")
        self.out_of_pool.update(staged)
        if error := self.edit_pool():
            return error
        if not staged:
            return None
        self.step(f"out of the pool: {', '.join(staged)}")

        with Run(self.inventory, staged) as run:
            planned = run.plan(update_host)
            run.execute()
            failed = run.failed()
            for name in staged:
                if name in failed:
                    continue
                if planned[name] is None:  # the service was left alone: nothing to verify or roll back
                    self.fail(name, "FAILED: needs a reboot into the new NVIDIA driver", REBOOT_NEEDED)
                    continue
                restart, verified = planned[name]
                self.results[name].result = "updated"
                self.results[name].ready_s = (
                    run.seconds(name, restart, verified) if restart and restart.executed else None
                )
                self.out_of_pool.discard(name)
        for name, why in failed.items():
            self.say(f"  {name} failed: {first_line(why)}")
            self.results[name].why = why
        updated = [name for name in staged if self.results[name].result == "updated"]
        self.step(f"drained, updated, verified: {', '.join(updated) or 'none'}")
        if failed:
            for name in self.fail_with_group(sorted(failed)):
                if name not in failed:
                    failed[name] = self.results[name].why
                    self.results[name].result = "FAILED with its replica group"
                    self.out_of_pool.add(name)
            self.roll_back(sorted(failed))
            recovered = [name for name in failed if name not in self.out_of_pool]
            self.step(f"rolled back and verified: {', '.join(recovered) or 'none'}")

        if error := self.edit_pool():
            return error
        back = [name for name in staged if name not in self.out_of_pool]
        self.step(f"back in the pool: {', '.join(back) or 'none'}")
        return None

    def roll_back(self, names: list[str]) -> None:
        """Return failed hosts to their known-good state; one that then serves rejoins the pool."""
        with Run(self.inventory, names) as run:
            run.plan(roll_back)
            run.execute()
            failed, unreachable = run.failed(), run.unreachable
        for name in names:
            why = self.results[name].why
            if name in unreachable:
                self.fail(name, "FAILED: unreachable, not rolled back", why)
            elif name in failed:
                self.fail(name, "FAILED, rollback failed", f"{why}\n--- the rollback:\n{failed[name]}")
            else:
                self.fail(name, "FAILED, rolled back", why)
                self.out_of_pool.discard(name)

    def finish(self) -> None:
        """Every target's state after the rollout, and the final pool."""
        reached = [name for name in self.targets if self.results[name].result != "already at target"]
        with Run(self.inventory, reached) as run:
            for name, status in run.facts(VllmStatus, path=UNIT_PATH).items():
                self.results[name].after = status


def rollout(
    inventory_path: str,
    data: dict,
    batch_spec: str = DEFAULT_BATCHES,
    max_fail: str = DEFAULT_MAX_FAIL,
    limit: list[str] | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Roll the inventory out; prints progress and the per-host table; returns the exit code
    (0: every host at the target; 1: a host failed or the rollout stopped)."""
    inventory = load_inventory(inventory_path, data)
    units = units_of(inventory, select(inventory, limit or []))
    targets = [name for unit in units for name in unit]
    batch_sizes(batch_spec, 1)  # a malformed --batch stops here, before any host is touched
    plan = Rollout(inventory, targets, failure_budget(max_fail, len(units)), say, units=units)
    started = time.monotonic()

    say(f"--> reading {len(targets)} hosts")
    pending = plan.survey()
    pending_units = [unit for unit in plan.units if set(unit) & set(pending)]
    sizes = batch_sizes(batch_spec, len(pending_units))
    batches = [
        [name for unit in pending_units[sum(sizes[:i]) : sum(sizes[: i + 1])] for name in unit if name in pending]
        for i in range(len(sizes))
    ]
    say(
        f"    {len(targets) - len(pending) - plan.failed_count()} at the target, {plan.failed_count()} failed to read, "
        f"{len(pending)} to update in {len(batches)} batches ({', '.join(map(str, sizes))})"
    )

    def over_budget() -> str | None:
        failed = plan.failed_count()
        if plan.exceeded(failed):
            return f"{failed} replica{'s' if failed > 1 else ''} failed, more than --max-fail {max_fail} allows"
        return None

    stop = over_budget()
    if not stop and (error := plan.edit_pool()):
        stop = f"the gateway failed, nothing was changed: {error}"
    for number, batch in enumerate(batches, start=1):
        if stop:
            break
        say(f"--> batch {number}/{len(batches)}: {', '.join(batch)}")
        if error := plan.run_batch(batch):
            stop = f"the gateway failed: {error}"
        else:
            stop = over_budget()

    plan.finish()
    results = [plan.results[name] for name in targets]
    say("")
    say(table(results))
    for r in results:
        if r.failed and r.why:
            say(f"\n--- {r.name}: {r.result}\n{r.why.strip()}")
    failed = plan.failed_count()
    summary = f"rollout stopped: {stop}" if stop else f"rollout complete: {failed} of {len(units)} replicas failed"
    say(f"\n{summary} ({time.monotonic() - started:.1f} s)")
    return 1 if stop or failed else 0
