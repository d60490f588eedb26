"""The per-host steps a rollout adds around the roles: keep the known-good state, drain, roll back.

The known-good state is what a host last served well: its unit, its environment file and the
venv ``current`` pointed at, copied to a root-only directory before a rollout changes the host.
Rolling back puts those three back, restarts and proves the host serves again. Nothing else
records what a host ran: the host itself is the record.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from glmfleet.config import HostConfig, host_config, replica_group
from glmfleet.facts.engine import ask
from glmfleet.facts.paths import ManagedPaths
from glmfleet.facts.vllm import VllmServes, VllmUnit, vllm_status_command
from glmfleet.layout import (
    COMPLETE_MARKER,
    ENV_FILE,
    KNOWN_GOOD_DIR,
    KNOWN_GOOD_ENV,
    KNOWN_GOOD_UNIT,
    KNOWN_GOOD_VENV,
    UNIT,
    UNIT_PATH,
)
from glmfleet.shell import quote
from roles.verify import argv_for, rank_check_command, wait_command


def keep_command(cfg: HostConfig) -> str:
    """Copy unit, env file and the `current` venv link's target (empty for the image runtime,
    whose unit names its image) aside, replacing the last copy only once the new one is complete."""
    new, good = quote(f"{KNOWN_GOOD_DIR}.new"), quote(KNOWN_GOOD_DIR)
    return " && ".join(
        [
            f"rm -rf {new}",
            f"mkdir -m 700 {new}",
            f"cp -p {quote(UNIT_PATH)} {new}/{quote(UNIT)}",
            f"cp -p {quote(ENV_FILE)} {new}/vllm.env",
            f"{{ readlink {quote(cfg.vllm_venv_root + '/current')} || true; }} > {new}/venv",
            f"rm -rf {good}",
            f"mv {new} {good}",
        ]
    )


def restore_command(cfg: HostConfig) -> str:
    """Put the known-good unit, env file and venv back and restart; the venv replaced becomes
    `previous`, as a venv switch would leave it."""
    root = quote(cfg.vllm_venv_root)
    return "; ".join(
        [
            "set -e",
            f"test -f {quote(KNOWN_GOOD_VENV)} || "
            "{ echo 'no known-good state on this host: nothing to roll back to'; exit 1; }",
            f"good=$(cat {quote(KNOWN_GOOD_VENV)})",
            f'test -z "$good" || test -e {root}/"$good"/{quote(COMPLETE_MARKER)} || '
            '{ echo "the known-good venv $good is gone"; exit 1; }',
            f"replaced=$(readlink {root}/current || true)",
            f"cp -p {quote(KNOWN_GOOD_UNIT)} {quote(UNIT_PATH)}",
            f"cp -p {quote(KNOWN_GOOD_ENV)} {quote(ENV_FILE)}",
            f'if [ -n "$good" ]; then cd {root} && ln -sfn "$good" current.new && mv -Tf current.new current; fi',
            'if [ -n "$good" ] && [ -n "$replaced" ] && [ "$replaced" != "$good" ]; then '
            'ln -sfn "$replaced" previous.new && mv -Tf previous.new previous; fi',
            "systemctl daemon-reload",
            f"systemctl reset-failed {quote(UNIT)} 2>/dev/null || true",
            f"systemctl restart {quote(UNIT)}",
            'echo "rolled back to the known-good unit${good:+ and venv ${good#venvs/}}"',
        ]
    )


def headless() -> bool:
    """Whether this host is a rank of a replica group that serves no API."""
    group = replica_group(host)
    return group is not None and host.name not in group.endpoints()


def serves(unit: dict | None) -> bool:
    """Whether the host serves as this parsed unit defines serving: its port, its model name;
    for a headless rank of a replica group, whether its unit runs."""
    if not unit:
        return False
    if headless():
        return bool(ask(host, ManagedPaths, paths=[], units=[UNIT])["units"].get(UNIT, {}).get("running"))
    return ask(host, VllmServes, verify_argv=argv_for(unit["base_url"], unit["served_model_name"]))["ok"]


@deploy("keep the known-good state")
def keep_known_good():
    """
    Copy aside what the host runs, if it serves now: the state a rollback returns to.

    A host that does not serve keeps the copy it has, so a failed change never becomes the
    state a later rollback returns to.
    """
    cfg = host_config(host)
    if serves(ask(host, VllmUnit, path=UNIT_PATH)):
        server.shell(name="keep the known-good unit, environment and venv", commands=[keep_command(cfg)])


@deploy("drain vLLM")
def drain():
    """
    Wait until the vLLM of this host holds no request (running or waiting), at most
    ``vllm_shutdown_timeout`` seconds; the gateway no longer sends it any.

    vLLM before 0.18 aborts the requests it holds when it stops; from 0.18 a stop drains too
    (``--shutdown-timeout``), and this wait costs nothing when the host is already idle.
    """
    cfg = host_config(host)
    if headless():
        return  # the head holds the group's requests
    server.shell(
        name="wait until no request is in flight",
        commands=[vllm_status_command("wait-idle", UNIT_PATH, "--deadline", str(cfg.vllm_shutdown_timeout))],
        _timeout=cfg.vllm_shutdown_timeout + 60,
    )


@deploy("roll back")
def roll_back():
    """
    Return the host to its known-good state and prove it serves again, as that state defines
    serving (its own port and served model name).

    Returns the check that the host serves, or None when there is no known-good state.
    """
    cfg = host_config(host)
    known_good = ask(host, VllmUnit, path=KNOWN_GOOD_UNIT)
    server.shell(name="restore the known-good unit, environment and venv", commands=[restore_command(cfg)])
    if known_good is None:
        return None
    group = replica_group(host)
    if group is None or host.name in group.endpoints():
        return server.shell(
            name="verify the rolled-back host serves",
            commands=[wait_command(cfg, argv_for(known_good["base_url"], known_good["served_model_name"]))],
            _timeout=cfg.vllm_ready_timeout + 120,
        )
    # Below the heads' check: runs once the group's head served (or failed to) again.
    return server.shell(name="verify every rolled-back rank runs", commands=[rank_check_command(cfg, group)])
