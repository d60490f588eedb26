"""Rollout wall time against the sum of the hosts' own restart+ready times, on the local fleet.

    GLMFLEET_FLEET_SLOT=N .venv/bin/python -m benchmarks.rollout --hosts 4 8

For each fleet size (brought up in increasing order: the fleet must not have more hosts up),
the plain deploy first (test double, gateway on the first host), then rollouts of a changed
setting for each --batch spec. "restart+ready" is the rollout's own per-host time from the
restart to the verified real request; the rest of the wall time is the rollout's reading,
staging, pool edits, drains and SSH connections, and the batches' waits for each other.
Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import secrets
import tempfile
import time
from pathlib import Path

from devfleet import localfleet
from tests.support.fleettools import (
    API_KEY_ENV,
    TEST_DOUBLE,
    UV_VERSION,
    deploy,
    gateway_port,
    glmfleet,
    test_model_settings,
    write_inventory,
)
from tests.support.pkgindex import PackageIndex, fill_index_dir

SPECS = ("1,25%,100%", "1")


def ready_times(stdout: str) -> list[float]:
    return [float(seconds) for seconds in re.findall(r"\s{2}updated\s{2,}([0-9.]+) s", stdout)]


def measure(hosts: int, data: dict, env: dict, workdir: Path) -> list[str]:
    localfleet.up(hosts)
    names = [host["name"] for host in localfleet.load_hosts()]
    if len(names) != hosts:
        raise SystemExit(f"{len(names)} hosts are up, not {hosts}: run `python -m devfleet.localfleet down` first")
    path = workdir / f"inventory-{hosts}.py"

    def inventory(max_model_len: int | None) -> str:
        write_inventory(
            path,
            {name: {"vllm_max_model_len": max_model_len} for name in names},
            {"gateway": ([names[0]], {"gateway_port": gateway_port()})},
        )
        return str(path)

    baseline = deploy(inventory(None), data=data, env=env)
    if baseline.returncode != 0:
        raise SystemExit(baseline.stderr[-3000:])
    rows = []
    for number, spec in enumerate(SPECS):
        started = time.monotonic()
        run = glmfleet("rollout", inventory(4096 - 1024 * number), "--batch", spec, data=data, env=env)
        wall = time.monotonic() - started
        times = ready_times(run.stdout)
        if run.returncode != 0 or len(times) != hosts:
            raise SystemExit(run.stdout + run.stderr[-3000:])
        batches = re.search(r"to update in (\d+) batches", run.stdout)[1]
        rows.append(
            f"| {hosts} | `{spec}` | {batches} | {wall:.1f} s | {sum(times):.1f} s | "
            f"{min(times):.1f}-{max(times):.1f} s | {wall / int(batches):.1f} s |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    env = {API_KEY_ENV: secrets.token_urlsafe(16)}
    print("| hosts | --batch | batches | rollout wall time | sum of restart+ready | per host | wall per batch |")
    print("|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="glmfleet-bench-") as workdir:
        wheels = Path(workdir) / "wheels"
        fill_index_dir(wheels, requirements=[f"uv=={UV_VERSION}"])
        with PackageIndex(wheels) as index:
            data = {key: value for key, value in TEST_DOUBLE.items() if key != "vllm_ready_timeout"}
            data["pip_index_url"] = index.url
            # The catalog's models want a pinned revision: the fleet tests' small checkpoint has one.
            data.update(test_model_settings(Path(workdir) / "model"))
            for hosts in sorted(args.hosts):
                measure(hosts, data, env, Path(workdir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
