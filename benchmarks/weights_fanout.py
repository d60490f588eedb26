"""Benchmark: model weights fanned out to 4, 8 and 16 linked hosts, every host's link capped at the
same rate B, against S/B (S: the checkpoint's bytes), the least any scheme needs, since each host
takes S bytes through its own link; and against the doubling rounds that the fan-out was before
issue 25 (whole copies, 1 -> 2 -> 4 -> ... holders), measured in the same run.

    GLMFLEET_FLEET_SLOT=4 python -m benchmarks.weights_fanout --size-gb 0.6 --rate-mbit 40 --hosts 4 8 16

Makes the checkpoint (shards of --shard-mb), brings up linked hosts (``localfleet up --links``) and
shapes each one's link with tc, then for each fleet size runs the real deploy of the weights role,
``model_source: peer`` seeded from the control node: once as the project was at BASELINE (exported
with ``git archive``: the doubling rounds), once as it is. After each run every host's copy is
checked (the vLLM unit's own check). The origin's egress is what the machine sent onto the fleet's
bridge (the control node pushes the seed's copy; pyinfra's own traffic is in it). Appends the
figures to benchmarks/RESULTS.md; takes the fleet down. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import roles  # noqa: F401  (hands the roles' settings to the configuration model)
from devfleet import localfleet
from glmfleet import shell
from glmfleet.config import resolve
from glmfleet.layout import model_dir, weights_check_argv, weights_state_file
from roles.model_weights.control import manifest_argv
from tests.support.model_maker import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# main before issue 25: whole copies host to host in doubling rounds.
BASELINE = "46dc556267f43c472ee9aef8881645ba8c8523aa"
MODEL = "glmfleet-bench/glm-shaped"
REVISION = "be7c" * 10  # with the control source a revision only names the files


def tree_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and ".glmfleet" not in p.parts)


def ssh(name: str, command: str) -> subprocess.CompletedProcess:
    host = next(h for h in localfleet.load_hosts() if h["name"] == name)
    return subprocess.run([*localfleet.ssh_argv(host), command], capture_output=True, text=True)


def write_inventory(path: Path, names: list[str]) -> Path:
    """Plain host data, so that the baseline's tree reads it too."""
    hosts = [(name, data) for name, data in localfleet.inventory_hosts() if name in names]
    path.write_text(f"local_fleet = {hosts!r}\n")
    return path


def deploy(tree: Path, inventory: Path, data: dict, control_dir: Path) -> tuple[float, str]:
    args = []
    for key, value in data.items():
        args += ["--data", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    started = time.monotonic()
    process = subprocess.run(
        [str(Path(sys.executable).parent / "pyinfra"), "-y", str(inventory), "tests/support/deploy_weights.py", *args],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), "GLMFLEET_CONTROL_DIR": str(control_dir)},
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    if process.returncode != 0:
        print(process.stderr[-3000:], file=sys.stderr)
    return seconds, process.stderr


def wipe(names: list[str], cfg) -> None:
    for name in names:
        ssh(name, shell.join(["rm", "-rf", model_dir(cfg), weights_state_file(cfg)]))


class Traffic:
    """Samples what the hosts' links received while a deploy runs: the transfer window is from
    the first sample that moved a megabyte into the hosts to the last one that did (pyinfra's
    connecting, planning and final checks move far less)."""

    STEP_BYTES = 10**6
    INTERVAL_S = 0.5

    def __init__(self, names: list[str]):
        self.names = names
        self.moving: list[float] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def total(self) -> int:
        return sum(localfleet.link_bytes(name)["received"] for name in self.names)

    def sample(self) -> None:
        last = self.total()
        while not self.stopping.wait(self.INTERVAL_S):
            now = self.total()
            if now - last >= self.STEP_BYTES:
                self.moving.append(time.monotonic())
            last = now

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join()

    def window_s(self) -> float:
        return self.moving[-1] - self.moving[0] + self.INTERVAL_S if self.moving else 0.0


def busy_jiffies() -> tuple[int, int]:
    user, nice, system, idle, iowait, irq, softirq, *_ = map(int, Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + irq + softirq, idle + iowait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=0.6)
    parser.add_argument("--shard-mb", type=float, default=8, help="shard size (MB)")
    parser.add_argument("--rate-mbit", type=float, default=40, help="every host's link, each way (Mbit/s)")
    parser.add_argument("--hosts", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--schemes", nargs="+", default=["rounds", "swarm"], choices=["rounds", "swarm"])
    parser.add_argument("--workdir", default="/var/tmp/glmfleet-bench-fanout")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    checkpoint = work / f"checkpoint-{args.size_gb}g-{args.shard_mb}mb"
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, size_bytes=int(args.size_gb * 10**9), shard_bytes=int(args.shard_mb * 10**6))
    size = tree_size(checkpoint)
    shards = len(list(checkpoint.glob("*.safetensors")))
    rate = args.rate_mbit * 10**6 / 8  # tc's mbit: 10^6 bit/s
    limit = size / rate
    print(
        f"checkpoint {size / 1e9:.2f} GB in {shards} shards; links {args.rate_mbit} Mbit/s; S/B {limit:.0f} s",
        flush=True,
    )

    baseline = work / "baseline"
    if not (baseline / "roles").is_dir():
        baseline.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
    trees = {"rounds": baseline, "swarm": ROOT}
    control_dir = work / "control"
    control_dir.mkdir(mode=0o700, exist_ok=True)

    localfleet.up(max(args.hosts), links=True)
    names = [h["name"] for h in localfleet.load_hosts() if h["network"] == "linked"][: max(args.hosts)]
    for name in names:
        localfleet.shape(name, rate_mbit=args.rate_mbit)
    data = {
        "model": MODEL,
        "model_revision": REVISION,
        "model_source": "peer",
        "model_peer_seed": "control",
        "model_control_dir": str(checkpoint),
        "model_disk_margin_gb": 1,
        "model_progress_interval": 30,
    }
    cfg = resolve(data)
    # The control node keeps a directory's manifest once made, whatever the file selection: one
    # left by an interrupted run (every file) would make the warm-up move every file.
    shutil.rmtree(checkpoint / ".glmfleet", ignore_errors=True)
    # Warm-up: the weights script and its directories on every host, so the runs move weights only.
    deploy(ROOT, write_inventory(work / "inventory.py", names), {**data, "model_include": ["config.json"]}, control_dir)
    # The control node keeps a directory's manifest once made: the warm-up's names config.json
    # alone. Made again for every file before the runs, so no run pays for hashing the checkpoint.
    shutil.rmtree(checkpoint / ".glmfleet")
    subprocess.run(manifest_argv(cfg), check=True, stdout=subprocess.DEVNULL)

    rows = []
    for count in args.hosts:
        group = names[:count]
        inventory = write_inventory(work / "inventory.py", group)
        for scheme in args.schemes:
            wipe(names, cfg)
            subprocess.run(["sync"], check=True)
            sent_before, links_before = localfleet.bridge_bytes()["sent"], [localfleet.link_bytes(n) for n in group]
            cpu_before, hosts_cpu_before = busy_jiffies(), [localfleet.host_cpu_seconds(n) or 0 for n in group]
            with Traffic(group) as traffic:
                seconds, output = deploy(trees[scheme], inventory, data, control_dir)
            cpu_after = busy_jiffies()
            busy = (cpu_after[0] - cpu_before[0]) / max(1, sum(cpu_after) - sum(cpu_before))
            hosts_cpu = sum(localfleet.host_cpu_seconds(n) or 0 for n in group) - sum(hosts_cpu_before)
            received = [localfleet.link_bytes(n)["received"] - b["received"] for n, b in zip(group, links_before)]
            verified = sum(ssh(n, shell.join(weights_check_argv(cfg))).returncode == 0 for n in group)
            rows.append(
                {
                    "hosts": count,
                    "scheme": scheme,
                    "seconds": round(seconds, 1),
                    "limit_seconds": round(limit, 1),
                    "ratio": round(limit / seconds, 3),
                    "transfer_seconds": round(traffic.window_s(), 1),
                    "transfer_ratio": round(limit / max(traffic.window_s(), 0.1), 3),
                    "from_origin_gb": round((localfleet.bridge_bytes()["sent"] - sent_before) / 1e9, 2),
                    "received_gb_mean": round(statistics.mean(received) / 1e9, 2),
                    "verified": f"{verified}/{count}",
                    "machine_busy": round(busy, 2),
                    "hosts_cpu_s": round(hosts_cpu, 1),
                    "load": os.getloadavg()[0],
                }
            )
            print(rows[-1], flush=True)
            (work / f"deploy-{scheme}-{count}.log").write_text(output)
    wipe(names, cfg)
    localfleet.down()

    machine = (
        f"{platform.node()}: {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    )
    lines = [
        "",
        f"## Model weights fan-out on shaped links ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine}, shared with other sessions. Linked local-fleet hosts (own network "
        f"namespaces on a bridge), every link shaped to {args.rate_mbit} Mbit/s each way (tc tbf). "
        f"Checkpoint {size / 1e9:.2f} GB in {shards} shards, pushed to the seed by the control node. "
        f"S/B = {limit:.0f} s. Seconds: the whole `pyinfra` run of the weights role (connect, facts, "
        "key, transfers, sha256 of every copy, key withdrawn). Ratio: S/B over the seconds taken. "
        "Transfer: from the first half second in which the hosts' links took in a megabyte to the last "
        "(the copies alone, without pyinfra's connecting and planning), and S/B over it. "
        f"rounds: the project at {BASELINE[:12]} (whole copies in doubling rounds); swarm: this tree. "
        "From the origin: bytes the machine sent onto the fleet's bridge during the run. Machine busy: "
        "the share of both cores busy (everything on the machine), hosts' CPU: the CPU seconds the "
        "hosts' cgroups used.",
        "",
        "| hosts | scheme | seconds | S/B | ratio | transfer s | transfer ratio | from the origin | received per host | verified | machine busy | hosts' CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['hosts']} | {row['scheme']} | {row['seconds']} | {row['limit_seconds']} | {row['ratio']} | "
            f"{row['transfer_seconds']} | {row['transfer_ratio']} | "
            f"{row['from_origin_gb']} GB | {row['received_gb_mean']} GB | {row['verified']} | "
            f"{row['machine_busy']:.0%} | {row['hosts_cpu_s']} s |"
        )
    with open(ROOT / "benchmarks" / "RESULTS.md", "a") as results:
        results.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work / "baseline", ignore_errors=True)


if __name__ == "__main__":
    main()
