"""How reliably the local fleet boots: bring N hosts up and down again, many times, and count
the boots that stopped (the empty-console boot stop of issue 18), with boot times.

    python -m benchmarks.fleet_boot [--rounds 30] [--hosts 4] [--load 2]

--load starts that many busy processes beside the boots, as a test run's pyinfra and servers
load the machine. Runs in fleet slot 7 (its own hosts, ports and state); prints a line per
round and a summary; writes nothing into the repository.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time

os.environ["GLMFLEET_FLEET_SLOT"] = "7"
os.environ.pop("GLMFLEET_FLEET_DIR", None)

from glmfleet import localfleet  # noqa: E402  (after the slot is chosen)


def burn(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--load", type=int, default=0, help="busy processes beside the boots")
    args = parser.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {os.cpu_count()} cores, {args.hosts} hosts, "
          f"{args.rounds} rounds, load {args.load}", flush=True)
    times, stops, errors = [], 0, []
    for number in range(1, args.rounds + 1):
        burners = [multiprocessing.Process(target=burn, args=(600,), daemon=True) for _ in range(args.load)]
        for burner in burners:
            burner.start()
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
            for burner in burners:
                burner.terminate()
            localfleet.down(destroy=True)
    if times:
        print(f"boots: {len(times)} of {args.rounds} rounds whole; up in median {statistics.median(times):.1f} s "
              f"(min {min(times):.1f}, max {max(times):.1f}); boot stops: {stops}; other errors: {len(errors) - stops}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
