"""Deploy speed on the local fleet: converge of bare hosts and no-op re-runs, by fleet size.

    .venv/bin/python -m benchmarks.deploy_speed [--sizes 1,4,8,16] [--converge 1,8] [--rounds 15]

Runs in its own fleet slot (GLMFLEET_FLEET_SLOT, default 8), serves through the vLLM test
double from a loopback package index (so the network does not dominate), prints a table and
appends it, with machine and date, to benchmarks/RESULTS.md. Not part of `make test`.
Remote commands per host are counted from pyinfra's own debug log ("Running command"), in a run
of their own: debug logging slows a run down. The no-op re-runs go in rounds, one run of every
size per round, so that the machine's other work, which drifts over minutes, weighs on every size
alike: a size's wall time is the (low) median of its rounds, and each scaling ratio the (low)
median of the rounds' own ratios, with their quartiles. Each round also runs the SSH floor,
`pyinfra exec -- true` (pyinfra's start, one login and one trivial command per host, nothing of
glmfleet's) at every size: on this machine the hosts share the controller's cores, so the
floor's own ratios show what the fleet's size costs before glmfleet does anything.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from devfleet import localfleet
from tests.support.fleettools import API_KEY_ENV, TEST_DOUBLE, UV_VERSION, data_args, make_bare, test_model_settings
from tests.support.pkgindex import PackageIndex, fill_index_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
COMMAND_LINE = re.compile(r"Running command on (\S+?):")


def busy_cpu_seconds() -> float:
    """CPU time the whole machine (controller and every host) has spent busy, from /proc/stat."""
    user, nice, system, _idle, iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass
class Timing:
    seconds: float  # wall
    cpu: float  # the whole machine's busy CPU: controller, hosts and anything else
    controller_cpu: float  # pyinfra's own process
    host_cpu: float | None  # mean per host, from the hosts' cgroups (None without cgroup v2)
    commands: Counter  # remote commands per host (debug runs only)


DEPLOY = ("deploy.py",)
SSH_FLOOR = ("exec", "--", "true")


def timed_deploy(hosts: list[str], settings: dict, debug: bool = False, operations=DEPLOY) -> Timing:
    """One `pyinfra -y` run of deploy.py (or other operations) limited to hosts, with, in a
    debug run (whose logging costs time of its own), the remote commands per host."""
    limits = [arg for name in hosts for arg in ("--limit", name)]
    # The operations come last: after `exec --`, every word is the command's, options included.
    command = [
        str(ROOT / ".venv/bin/pyinfra"),
        "-y",
        *(["--debug"] if debug else []),
        *limits,
        *data_args(settings),
        "inventory/local.py",
        *operations,
    ]
    host_cpu = [localfleet.host_cpu_seconds(name) for name in hosts]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, started = busy_cpu_seconds(), time.monotonic()
    run = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), API_KEY_ENV: "bench-key"},
    )
    seconds, cpu = time.monotonic() - started, busy_cpu_seconds() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    controller = after.ru_utime - children.ru_utime + after.ru_stime - children.ru_stime
    host_cpu_after = [localfleet.host_cpu_seconds(name) for name in hosts]
    per_host = (
        None if None in host_cpu + host_cpu_after else sum(b - a for a, b in zip(host_cpu, host_cpu_after)) / len(hosts)
    )
    commands = Counter(COMMAND_LINE.findall(run.stderr))
    if run.returncode != 0 or (debug and set(commands) != set(hosts)):
        raise SystemExit(f"deploy failed on {hosts} (commands seen on {sorted(commands)}):\n{run.stderr[-3000:]}")
    return Timing(seconds, cpu, controller, per_host, commands)


def machine() -> str:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {os.cpu_count()} cores, {memory_gib:.0f} GiB, {platform.platform()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,8,16", help="fleet sizes for the no-op re-run")
    parser.add_argument("--converge", default="1,8", help="fleet sizes for the converge of bare hosts")
    parser.add_argument("--rounds", type=int, default=15, help="no-op re-runs of every size, taken in turns")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: at least 2 (the ratios' quartiles need two)")
    os.environ.setdefault("GLMFLEET_FLEET_SLOT", "8")
    sizes = [int(n) for n in args.sizes.split(",")]
    converge_sizes = [int(n) for n in args.converge.split(",")]

    localfleet.up(max(sizes + converge_sizes))
    names = [host["name"] for host in localfleet.load_hosts()]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        wheels = Path(scratch) / "wheels"
        wheels.mkdir()
        fill_index_dir(wheels, requirements=[f"uv=={UV_VERSION}"])
        with PackageIndex(wheels) as index:
            settings = {**TEST_DOUBLE, **test_model_settings(Path(scratch) / "model"), "pip_index_url": index.url}
            for size in converge_sizes:
                for name in names[:size]:
                    make_bare(name)
                rows.append(("converge bare hosts", size, timed_deploy(names[:size], settings, debug=True)))
            timed_deploy(names[: max(sizes)], settings)  # converge everything the re-runs use
            commands = {size: timed_deploy(names[:size], settings, debug=True).commands for size in sizes}
            runs = [(operations, size) for size in sizes for operations in (DEPLOY, SSH_FLOOR)]
            # Every other round runs backwards, so that no run always follows another.
            rounds = [
                {
                    run: timed_deploy(names[: run[1]], settings, operations=run[0])
                    for run in (runs if index % 2 == 0 else runs[::-1])
                }
                for index in range(args.rounds)
            ]
            for label, operations in (("no-op re-run", DEPLOY), ("SSH floor: `exec -- true`", SSH_FLOOR)):
                for size in sizes:
                    median = sorted((one[operations, size] for one in rounds), key=lambda timing: timing.seconds)[
                        (len(rounds) - 1) // 2
                    ]
                    if operations == DEPLOY:
                        median.commands = commands[size]
                    rows.append((label, size, median))

    table = [
        "| run | hosts | wall s | machine CPU s | controller CPU s | CPU per host (its cgroup) ms "
        "| remote commands per host (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {run} | {hosts} | {t.seconds:.1f} | {t.cpu:.1f} | {t.controller_cpu:.1f} | "
        f"{'-' if t.host_cpu is None else f'{t.host_cpu * 1000:.0f}'} | {max(t.commands.values(), default='-')} |"
        for run, hosts, t in rows
    ]

    def scaling(operations, size) -> str:
        """The rounds' own ratios of size to 1 host: their low median (like the rows: with an
        even number of rounds, a round that was run) and quartiles."""
        ratios = [one[operations, size].seconds / one[operations, 1].seconds for one in rounds]
        first, _, third = statistics.quantiles(ratios, n=4)
        return f"{statistics.median_low(ratios):.2f}x ({first:.2f}-{third:.2f})"

    ratios = [
        f"{size} hosts / 1 host: {scaling(DEPLOY, size)}, SSH floor {scaling(SSH_FLOOR, size)}"
        for size in sizes
        if 1 in sizes and size != 1
    ]
    text = (
        f"\n## Deploy speed ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
        f"Machine: {machine()}. `python -m benchmarks.deploy_speed --sizes {args.sizes} --converge {args.converge} --rounds {args.rounds}`;"
        " other work may have shared the machine. Machine CPU: every core's busy time during the run, the"
        " controller's and the hosts' together (they share the machine); controller CPU: pyinfra's process;"
        " CPU per host: what the run cost each host, read from its cgroup (sshd, the checks, vLLM answering).\n\n"
        + "\n".join(table)
        + "\n\n"
        + (
            f"No-op re-run scaling, median (quartiles) of {args.rounds} rounds' ratios: " + "; ".join(ratios) + ".\n"
            if ratios
            else ""
        )
    )
    print(text)
    with open(RESULTS, "a", encoding="utf-8") as results:
        results.write(text)


if __name__ == "__main__":
    main()
