"""Benchmark: model weights to 4 and 8 fleet hosts, fan-out against every host pulling from the
origin, both against the raw copy throughput of the same bytes on this machine (the physical
limit here: every host's disk is this machine's disk).

    python -m benchmarks.weights_fanout --size-gb 1 --hosts 4 8

Makes a multi-GB checkpoint, serves it with olah on loopback (the origin), brings up the local
fleet (export the fleet slot's variables first, see CONVENTIONS), runs the real deploy of the
weights role, and appends the figures to benchmarks/RESULTS.md. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devfleet import localfleet
from glmfleet.layout import WEIGHTS_STATE_DIR as STATE_DIR
from tests.support.fleettools import fleet_host
from tests.support.hub_mirror import OlahServer, publish
from tests.support.model_maker import make_checkpoint
from tests.support.pkgindex import PackageIndex, download_wheels

ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "glmfleet-bench/glm-shaped"
HF_CLI_VERSION = "2.4.0"


def tree_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def raw_copy_rate(source: Path, scratch: Path) -> float:
    """Bytes/s of `cp` of the checkpoint plus `sync`: what this machine's disk does at best."""
    target = scratch / "raw-copy"
    shutil.rmtree(target, ignore_errors=True)
    started = time.monotonic()
    subprocess.run(["cp", "-r", "--reflink=never", str(source), str(target)], check=True)
    subprocess.run(["sync"], check=True)
    seconds = time.monotonic() - started
    shutil.rmtree(target)
    return tree_size(source) / seconds


def deploy(inventory: Path, data: dict) -> float:
    args = []
    for key, value in data.items():
        args += ["--data", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    started = time.monotonic()
    process = subprocess.run(
        [str(Path(sys.executable).parent / "pyinfra"), "-y", str(inventory), "tests/support/deploy_weights.py", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    if process.returncode != 0:
        sys.exit(f"deploy failed:\n{process.stderr[-4000:]}")
    return seconds


def inventory(path: Path, names: list[str]) -> Path:
    path.write_text(
        "from devfleet.localfleet import inventory_hosts\n"
        f"local_fleet = [(name, data) for name, data in inventory_hosts() if name in {names!r}]\n"
    )
    return path


def wipe(names: list[str], model_dir: str) -> None:
    """Each host back to no copy (over SSH: the hosts' roots are overlays in namespaces of their own)."""
    for name in names:
        fleet_host(name).run_test(f"rm -rf {model_dir} {STATE_DIR}/*")


def served_bytes(olah_log: Path, mark: int, sizes: dict[str, int]) -> int:
    import re

    lines = olah_log.read_text().splitlines()[mark:]
    return sum(
        sizes.get(m.group(1), 0)
        for line in lines
        if (m := re.search(r'"GET /[^ ]+/resolve/[0-9a-f]{40}/([^ ]+) HTTP', line))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1)
    parser.add_argument("--hosts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--workdir", default="/var/tmp/glmfleet-bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    checkpoint = work / f"checkpoint-{args.size_gb}g"
    if not (checkpoint / "config.json").exists():
        # 100 MB shards: olah holds each file it serves in memory, and 8 hosts x 8 workers read at once.
        make_checkpoint(checkpoint, size_bytes=int(args.size_gb * 10**9), shard_bytes=100 * 10**6)
    size = tree_size(checkpoint)
    sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.is_file()}
    shutil.rmtree(work / "mirrors", ignore_errors=True)
    revision = publish(checkpoint, work / "mirrors", REPO_ID)
    rate = raw_copy_rate(checkpoint, work)
    print(f"checkpoint {size / 1e9:.2f} GB; raw copy on this machine {rate / 1e6:.0f} MB/s", flush=True)

    wheels = Path(tempfile.mkdtemp(prefix="bench-wheels-"))
    download_wheels([f"huggingface_hub=={HF_CLI_VERSION}"], wheels, dependencies=True)
    localfleet.up(max(args.hosts))
    names = [h["name"] for h in localfleet.load_hosts()][: max(args.hosts)]
    model_dir = "/srv/bench-model"
    rows = []
    with OlahServer(work / "mirrors", work / "olah") as origin, PackageIndex(wheels) as index:
        base = {
            "model": REPO_ID,
            "model_revision": revision,
            "hf_endpoint": origin.url,
            "hf_cli_version": HF_CLI_VERSION,
            "pip_index_url": index.url,
            "model_dir": model_dir,
            "model_disk_margin_gb": 4,
            "model_progress_interval": 30,
        }
        # Warm-up: the hub CLI, rsync and the transfer key on every host, so the timed runs move weights only.
        warm = {**base, "model_include": ["config.json"], "model_dir": "/srv/bench-warmup"}
        deploy(inventory(work / "inv.py", names), {**warm, "model_source": "peer", "model_peer_seed": "hf"})
        deploy(inventory(work / "inv.py", names), {**warm, "model_source": "hf"})
        log = work / "olah" / "olah.log"
        # The origin's own rate, for reference: one host alone.
        runs = [(1, "one host from the origin", {**base, "model_source": "hf"})]
        for count in args.hosts:
            runs += [
                (count, "peer fan-out", {**base, "model_source": "peer"}),
                (count, "every host from the origin", {**base, "model_source": "hf"}),
            ]
        for count, mode, data in runs:
            group = names[:count]
            wipe(names, model_dir)
            subprocess.run(["sync"], check=True)
            mark = len(log.read_text().splitlines())
            seconds = deploy(inventory(work / "inv.py", group), data)
            delivered = size * count
            limit_seconds = delivered / rate
            rows.append(
                {
                    "hosts": count,
                    "mode": mode,
                    "bytes": delivered,
                    "seconds": round(seconds, 1),
                    "from_origin": served_bytes(log, mark, sizes),
                    "limit_seconds": round(limit_seconds, 1),
                    "ratio_to_limit": round(limit_seconds / seconds, 3),
                }
            )
            print(rows[-1], flush=True)
        wipe(names, model_dir)
    localfleet.down()

    machine = f"{platform.node()}: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    lines = [
        "",
        f"## Model weights fan-out ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {machine}; every host's disk is this machine's disk. Checkpoint {size / 1e9:.2f} GB "
        f"({len([n for n in sizes if n.endswith('.safetensors')])} shards); origin: olah on loopback; raw copy "
        f"(`cp` + `sync` of the same bytes): {rate / 1e6:.0f} MB/s. Seconds are the whole `pyinfra` run "
        "(connect, facts, transfer, sha256 of every copy). Ratio to the limit: the seconds the raw copy "
        "rate needs for the bytes delivered, over the seconds taken.",
        "",
        "| hosts | mode | bytes delivered | bytes from the origin | seconds | raw-copy seconds | ratio to the limit |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['hosts']} | {row['mode']} | {row['bytes'] / 1e9:.2f} GB | {row['from_origin'] / 1e9:.2f} GB | "
            f"{row['seconds']} | {row['limit_seconds']} | {row['ratio_to_limit']} |"
        )
    results = ROOT / "benchmarks" / "RESULTS.md"
    if not results.exists():
        results.write_text("# Benchmark results\n\nEach section: machine, date, what was measured.\n")
    with open(results, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
