"""verify: a host counts as done only when its vLLM answers a real request."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from glmfleet import FILES, checks
from glmfleet.config import HostConfig, Setting, documented, host_config, replica_group
from glmfleet.connection import NotForwarded, connect_on_host
from glmfleet.facts.engine import Question, ask, ask_together
from glmfleet.facts.output import host_script
from glmfleet.facts.paths import ManagedPaths
from glmfleet.facts.vllm import VllmServes
from glmfleet.groups import ReplicaGroup
from glmfleet.layout import ENV_FILE, UNIT, VERIFY_SCRIPT
from glmfleet.layout import local_url as url_of
from glmfleet.operations import journal_tail, upload
from glmfleet.shell import join, quote
from roles.vllm_service import served_model_name

SOURCE = FILES / "verify_vllm.py"
JOURNAL_HEADER = f"--- last lines of the {UNIT} journal:"

SETTINGS = (
    Setting(
        "vllm_ready_timeout",
        1800,
        "seconds the verify step waits for vLLM to serve (big models load for minutes)",
        checks.int_in(0, 86400),
    ),
    Setting(
        "verify_journal_lines",
        40,
        "lines of the unit's journal shown when a host fails to serve",
        checks.int_in(0, 10000),
    ),
)


def local_url(cfg: HostConfig) -> str:
    """Where the host itself reaches its vLLM: a wildcard listen address means loopback."""
    return url_of(cfg.vllm_host, cfg.vllm_port)


def verify_argv(cfg: HostConfig) -> list[str]:
    return argv_for(local_url(cfg), served_model_name(cfg))


def argv_for(base_url: str, served_name: str) -> list[str]:
    return [VERIFY_SCRIPT, "--base-url", base_url, "--served-model-name", served_name, "--env-file", ENV_FILE]


def wait_command(cfg: HostConfig, argv: list[str]) -> str:
    """Wait up to vllm_ready_timeout for the check to pass; on failure show the unit's journal."""
    wait = join([*argv, "--deadline", str(cfg.vllm_ready_timeout)])
    journal = journal_tail(UNIT, cfg.verify_journal_lines)
    return f"{wait} || {{ echo {quote(JOURNAL_HEADER)}; {journal}; exit 1; }}"


def questions(cfg: HostConfig) -> dict[str, Question]:
    """The real request is among them only where the controller cannot make it (``serving_now``)."""
    asked = {"managed": Question(ManagedPaths, {"paths": [VERIFY_SCRIPT], "units": [UNIT]})}
    if connect_on_host(host) is None:
        asked["serving"] = Question(VllmServes, {"verify_argv": verify_argv(cfg)})
    return asked


def serving_now(cfg: HostConfig) -> dict:
    """Whether the host serves now, as ``VllmServes`` answers: one pass of the verify script's
    check. The controller makes the request itself, with the configured API key, where it
    reaches the host's vLLM port from the host (``connect_on_host``): the host then runs no
    Python interpreter for it, every run. Otherwise, and wherever the host's sshd opens no
    connection (it forwards nothing, or nothing listens yet), the script runs on the host.
    """
    connect = connect_on_host(host)
    if connect is not None:
        script = host_script("verify_vllm")
        try:
            return {
                "ok": True,
                "detail": script.check_once(local_url(cfg), served_model_name(cfg), cfg.vllm_api_key, connect=connect),
            }
        except NotForwarded:
            pass
        except Exception as error:  # every failure is an answer: the host does not serve
            return {"ok": False, "detail": f"not serving: {script.describe(error)}"}
    return ask(host, VllmServes, verify_argv=verify_argv(cfg))


@deploy("verify vLLM serves")
@documented(SETTINGS)
def verify(changes=()):
    """
    Prove the host serves: one short real chat completion for the served name returns text
    (where vLLM answers it with an error, ``/health`` and ``/v1/models`` say why).

    + changes: operations whose change (a start or restart) makes a fresh check necessary

    The same check runs once while planning (``serving_now``); on a host that already serves
    and where none of ``changes`` is planned, that is the whole check and no operation is
    planned. Otherwise the check waits up to ``vllm_ready_timeout`` and, on failure, fails the
    host with the last lines of the unit's journal. A rank of a replica group that serves no
    API (headless) is checked after its head's request: its unit still runs. Returns the check,
    or None where it was not planned.
    """
    cfg = host_config(host)
    answers = ask_together(host, questions(cfg))
    upload(answers["managed"], VERIFY_SCRIPT, SOURCE, mode="755", name="verify script")
    group = replica_group(host)
    headless = group is not None and host.name not in group.endpoints()
    running = bool(answers["managed"]["units"].get(UNIT, {}).get("running"))
    serving = {"ok": running} if headless else serving_now(cfg)
    if serving["ok"] and not changes:
        return None
    fresh = lambda: not serving["ok"] or any(op.did_change() for op in changes)  # noqa: E731
    # One name on every host: pyinfra merges an operation's names across hosts.
    request = server.shell(
        name="verify a real request is served",
        commands=[":" if headless else wait_command(cfg, verify_argv(cfg))],
        _if=(lambda: False) if headless else fresh,
        _timeout=cfg.vllm_ready_timeout + 120,
    )
    if group is None:
        return request
    # Every rank plans both checks at the same call sites, so pyinfra orders each rank's check
    # after every head's request (a rank's own request step is skipped): a rank that died
    # while its head loaded is found.
    ranks = server.shell(
        name="verify every rank of the replica group runs", commands=[rank_check_command(cfg, group)], _if=fresh
    )
    return ranks if headless else request


def rank_check_command(cfg: HostConfig, group: ReplicaGroup) -> str:
    """A headless rank serves no API: it is up when its unit still runs once its head served,
    and has not been restarted by systemd since it was last (re)started (``NRestarts`` counts
    systemd's own restarts since the last explicit start); else the host fails, named with its
    rank and group, with the unit's journal."""
    rank = group.rank_of(cfg.host)
    journal = journal_tail(UNIT, cfg.verify_journal_lines)
    why = f"rank {rank} of replica group {group.name} (head {group.head}) is not running, or died since its start"
    unit = quote(UNIT)
    return (
        f'{{ systemctl is-active --quiet {unit} && [ "$(systemctl show --property NRestarts --value {unit})" = 0 ]; }} '
        f"|| {{ echo {quote(why)}; echo {quote(JOURNAL_HEADER)}; {journal}; exit 1; }}"
    )
