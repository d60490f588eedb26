"""The `glmfleet` command: `glmfleet rollout INVENTORY`, `status INVENTORY`, `logs INVENTORY`, `keys`,
`models`.

`pyinfra INVENTORY deploy.py` installs and converges; these drive the same roles through
pyinfra's API, reading the inventory the way pyinfra does (group_data/, --data).
"""

# pyinfra works on many hosts at once in gevent greenlets: patch before anything opens sockets,
# as pyinfra's own command does.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from pyinfra_cli.util import parse_cli_arg  # noqa: E402

import roles  # noqa: E402,F401  (hands the roles' settings to the configuration model)
from glmfleet.config import ConfigError, settings_table  # noqa: E402
from glmfleet_cli.logs import fleet_logs  # noqa: E402
from glmfleet_cli.models import models_table  # noqa: E402
from glmfleet_cli.rollout import DEFAULT_BATCHES, DEFAULT_MAX_FAIL, rollout  # noqa: E402
from glmfleet_cli.runner import UsageError  # noqa: E402
from glmfleet_cli.status import fleet_status  # noqa: E402


def data_overrides(pairs: list[str]) -> dict:
    """--data key=value, parsed as pyinfra parses it (ints, booleans and JSON)."""
    data = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--data {pair!r}: expected key=value")
        data[key] = parse_cli_arg(value)
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmfleet", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    roll = commands.add_parser("rollout", help="apply the inventory to a serving fleet in health-gated batches")
    # argparse formats help with %: a percentage in the default is written %% to print as %.
    roll.add_argument(
        "--batch",
        default=DEFAULT_BATCHES,
        help=f"batch sizes, counts or percentages; the last repeats (default {DEFAULT_BATCHES.replace('%', '%%')})",
    )
    roll.add_argument(
        "--max-fail",
        default=DEFAULT_MAX_FAIL,
        help="stop once more hosts failed than this count or percentage (default 0)",
    )
    status = commands.add_parser("status", help="per host: unit, vLLM version, model, GPUs, health, requests")
    logs = commands.add_parser("logs", help="the vLLM unit's journal from every host, each line prefixed with its host")
    logs.add_argument("-f", "--follow", action="store_true", help="follow the journals until Ctrl-C")
    logs.add_argument("-n", "--lines", type=int, help="the last N lines of each host's journal (as journalctl -n)")
    logs.add_argument(
        "--since", help="from this time on, as journalctl reads it: '2026-12-07 10:00', 'yesterday', --since=-1h"
    )
    commands.add_parser("keys", help="every data key: role, default, meaning and what is accepted (README's table)")
    commands.add_parser("models", help="the model catalog: repos, sizes, vLLM releases, hosts needed (README's table)")
    for command in (roll, status, logs):
        command.add_argument(
            "inventory", help="a pyinfra inventory file (inventory/prod.py) or an Ansible one (@ansible/hosts.yml)"
        )
        command.add_argument("--limit", action="append", default=[], help="only this group or host name pattern")
        command.add_argument("--data", action="append", default=[], help="override data, key=value (as pyinfra)")
        command.add_argument("-v", "--verbose", action="store_true", help="show pyinfra's output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("keys", "models"):
        print(settings_table() if args.command == "keys" else models_table())
        return 0

    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("pyinfra").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    # Each verb names a host it cannot reach, and why, itself.
    logging.getLogger("paramiko").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    sys.stdout.reconfigure(line_buffering=True)
    try:
        data = data_overrides(args.data)
        if args.command == "rollout":
            return rollout(args.inventory, data, args.batch, args.max_fail, args.limit)
        if args.command == "logs":
            return fleet_logs(args.inventory, data, args.limit, args.lines, args.since, args.follow)
        return fleet_status(args.inventory, data, args.limit)
    except (ConfigError, UsageError) as error:
        print(f"glmfleet: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
