"""How reliably the local fleet boots: bring N hosts up and down again, many times, and count
the boots that stopped (the empty-console boot stop of issue 18), with boot times.

    python -m benchmarks.fleet_boot [--rounds 30] [--hosts 4] [--load 2]

--load starts that many busy processes beside the boots, as a test run's pyinfra and servers
load the machine. A watcher asks ``is_up`` of every host as fast as it can while the hosts boot,
and counts the answers "down" for a supervisor that is alive (not a zombie): each such answer
would stop a boot "while booting" with an empty console log. Runs in fleet slot 7 (its own
hosts, ports and state); prints a line per round and a summary; writes nothing into the repository.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ["GLMFLEET_FLEET_SLOT"] = "7"
os.environ.pop("GLMFLEET_FLEET_DIR", None)

from devfleet import localfleet  # noqa: E402  (after the slot is chosen)


def burn(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def watch(stop: threading.Event, found: list[int]) -> None:
    """Count "down" answers for supervisors that live, until ``stop``."""
    asked = 0
    while not stop.is_set():
        for host in localfleet._read_hosts():
            try:
                pid = int(localfleet._pid_file(host).read_text())
            except (OSError, ValueError):
                continue
            asked += 1
            if not localfleet.is_up(host) and alive(pid):
                found[0] += 1
    found[1] += asked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--load", type=int, default=0, help="busy processes beside the boots")
    args = parser.parse_args(argv)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {os.cpu_count()} cores, {args.hosts} hosts, "
        f"{args.rounds} rounds, load {args.load}",
        flush=True,
    )
    times, stops, errors, false_downs, asked = [], 0, [], 0, 0
    for number in range(1, args.rounds + 1):
        burners = [multiprocessing.Process(target=burn, args=(600,), daemon=True) for _ in range(args.load)]
        for burner in burners:
            burner.start()
        stop, wrong = threading.Event(), [0, 0]
        watcher = threading.Thread(target=watch, args=(stop, wrong), daemon=True)
        watcher.start()
        started = time.monotonic()
        try:
            localfleet.up(args.hosts)
            times.append(time.monotonic() - started)
            print(f"round {number}: {args.hosts} hosts up in {times[-1]:.1f} s", flush=True)
        except localfleet.BootStopped as error:
            stops += 1
            errors.append(str(error))
            print(f"round {number}: BOOT STOPPED: {error}", flush=True)
        except localfleet.FleetError as error:
            errors.append(str(error))
            print(f"round {number}: FLEET ERROR: {error}", flush=True)
        finally:
            stop.set()
            watcher.join()
            false_downs += wrong[0]
            asked += wrong[1]
            for burner in burners:
                burner.terminate()
            localfleet.down(destroy=True)
    if times:
        print(
            f"boots: {len(times)} of {args.rounds} rounds whole; up in median {statistics.median(times):.1f} s "
            f"(min {min(times):.1f}, max {max(times):.1f}); boot stops: {stops}; other errors: {len(errors) - stops}; "
            f"'down' for a live supervisor: {false_downs} of {asked} answers"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
