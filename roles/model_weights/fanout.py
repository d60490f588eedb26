"""The peer fan-out's plan, made once per run from every member's weights fact (who holds the
revision, who fetches it, the seed), its scheduler (``swarm``), and the transfer key's lines in a
host's authorized_keys, which exist only while a fan-out runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

from gevent.event import AsyncResult
from gevent.pool import Pool
from pyinfra import host
from pyinfra.api import State

from glmfleet import filesyntax
from glmfleet.config import ConfigError, HostConfig, format_problems, host_config
from glmfleet.facts.engine import Question
from glmfleet.facts.weights import ModelWeights
from glmfleet.layout import (
    PEER_KEY,
    PEER_KNOWN_HOSTS,
    ROOT_AUTHORIZED_KEYS,
    ROOT_SSH_DIR,
    WEIGHTS_SCRIPT,
    model_dir,
    weights_selection_key,
    weights_state_file,
)
from glmfleet.shell import join, quote
from roles.model_weights.control import KEY_COMMENT, PUBLISHED_KEY, manifest_path
from roles.model_weights.swarm import Fanout


@dataclass
class FanoutPlan:
    """A peer group's fan-out in this run: who holds the revision, who fetches it, which of them
    fetches from the origin (the seed, where no member holds it yet), and the run's scheduler
    (None where nothing is copied between hosts)."""

    complete: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    seed: str | None = None
    # host name -> "address:port" other hosts reach its sshd on, and its ssh host key
    addresses: dict[str, str] = field(default_factory=dict)
    host_keys: dict[str, str] = field(default_factory=dict)
    facts: dict[str, dict] = field(default_factory=dict)
    fanout: Fanout | None = None


_plans: WeakKeyDictionary[State, AsyncResult] = WeakKeyDictionary()


def fanout_group(cfg: HostConfig) -> str:
    return json.dumps([model_dir(cfg), weights_selection_key(cfg)])


def weights_question(cfg: HostConfig, tools: list[str]) -> Question:
    return Question(
        ModelWeights,
        {
            "state_file": weights_state_file(cfg),
            "model_dir": model_dir(cfg),
            "key": weights_selection_key(cfg),
            "tools": tools,
            "transfer_marks": [KEY_COMMENT, PUBLISHED_KEY],
        },
    )


def fanout_plans(tools_of) -> dict[str, FanoutPlan]:
    """Every peer group's fan-out, planned once per deploy from every host's state (one fact
    per host), so each host plans the same, and all share one scheduler. ``tools_of(cfg)``: the
    tools the weights fact looks for (as the role asks it, so the question is asked once)."""
    run = host.state  # the run's own State: pyinfra's `state` is one proxy for every run
    if run not in _plans:
        # Made once, by the first host that plans: asking the members yields to the other hosts'
        # planning, which waits here for the same plan rather than make a scheduler of its own.
        _plans[run] = AsyncResult()
        try:
            _plans[run].set(_plan_groups(run, tools_of))
        except Exception as error:
            _plans[run].set_exception(error)
    return _plans[run].get()


def _plan_groups(run: State, tools_of) -> dict[str, FanoutPlan]:
    groups: dict[str, list] = {}
    for target in run.inventory:  # (the inventory context is unset under pyinfra's API)
        cfg = host_config(target)
        # A host outside --limit runs none of the fan-out, nor authorizes the key to give.
        if cfg.model_source == "peer" and run.is_host_in_limit(target):
            groups.setdefault(fanout_group(cfg), []).append((target, cfg))
    plans = {}
    for group, members in groups.items():
        answers = members_weights(run, [(target, weights_question(cfg, tools_of(cfg))) for target, cfg in members])
        plan = FanoutPlan()
        for (target, cfg), fact in zip(members, answers):
            plan.facts[target.name] = fact
            (plan.complete if fact["complete"] else plan.pending).append(target.name)
            address = cfg.model_peer_address or target.data.get("ssh_hostname") or target.name
            plan.addresses[target.name] = f"{address}:{target.data.get('ssh_port') or 22}"
            plan.host_keys[target.name] = fact["host_key"]
        # A fan-out needs someone to copy to: a lone member without a copy fetches from the origin.
        if plan.pending and (plan.complete or len(plan.pending) > 1):
            cfg = members[0][1]
            # No member holds it: the first that fetches takes the one copy from the origin.
            plan.seed = None if plan.complete else plan.pending[0]
            from_control = plan.seed and cfg.model_peer_seed == "control"
            plan.fanout = Fanout(
                {
                    "addresses": plan.addresses,
                    "complete": set(plan.complete),
                    "seed": plan.seed,
                    "manifest": json.loads(manifest_path(cfg).read_text()) if from_control else None,
                    # pyinfra runs an operation on at most PARALLEL hosts at once
                    "leave_when_complete": run.config.PARALLEL < len(members),
                }
            )
        plans[group] = plan
    return plans


def members_weights(run: State, members: list) -> list[dict]:
    """Each member's weights fact, asked side by side (as many at once as pyinfra's --parallel):
    a member whose own plan has not begun (a fleet larger than that pool) is asked here, a
    round trip each if asked in turn. A failure is raised here, in this host's planning, as
    pyinfra reports it; a greenlet that raised would also print its traceback."""

    def weights_or_error(member):
        target, question = member
        try:
            return question.of(target)
        except Exception as error:  # raised again below
            return error

    answers = Pool(run.config.PARALLEL or None).map(weights_or_error, members)
    failed = next((answer for answer in answers if isinstance(answer, Exception)), None)
    if failed is not None:
        raise failed
    return answers


def known_hosts(plan: FanoutPlan) -> str:
    lines = []
    for name, address in sorted(plan.addresses.items()):
        hostname, port = address.rsplit(":", 1)
        if not plan.host_keys.get(name):
            continue
        try:
            lines.append(f"{filesyntax.known_hosts_host(hostname, port)} {plan.host_keys[name]}")
        except filesyntax.Unwritable as error:
            raise ConfigError(
                format_problems(
                    [
                        f"{name}: the address its peers reach it at, {hostname!r} (model_peer_address, "
                        f"else ssh_hostname, else its name), is refused: {error}"
                    ]
                )
            ) from None
    return "\n".join(lines) + "\n"


def authorized_line(cfg: HostConfig, public_key: str) -> str:
    """The transfer key may only read the model files of the model store, one at a time with the
    weights script's ``give``, nothing else: no shell, no forwarding, no pty (``restrict``),
    whatever the peer asks for (sshd hands the request to ``give`` as $SSH_ORIGINAL_COMMAND)."""
    # sshd runs the command with the user's shell: a shell command line, inside the option's quotes.
    command = filesyntax.authorized_keys_option(join([WEIGHTS_SCRIPT, "give", "--store", cfg.model_root]))
    key_type, blob = public_key.split()[:2]
    return f"restrict,command={command} {key_type} {blob} {KEY_COMMENT}"


def authorize_command(line: str | None) -> str:
    """Rewrite root's authorized_keys without any glmfleet transfer key (its comment, or the key
    the repository once published), then with ``line`` if given; the operator's lines stay.
    Written to a 0600 file beside it and moved into place."""
    keys = quote(ROOT_AUTHORIZED_KEYS)
    add = f"printf '%s\\n' {quote(line)}; " if line else ""
    return (
        f"umask 077; mkdir -p {quote(ROOT_SSH_DIR)} && tmp=$(mktemp {quote(ROOT_AUTHORIZED_KEYS + '.XXXXXX')}) && "
        f"{{ {{ if [ -f {keys} ]; then grep -v -F -e {quote(KEY_COMMENT)} -e {quote(PUBLISHED_KEY)} {keys} || true; fi; "
        f'{add}}} > "$tmp" && chmod 600 "$tmp" && mv -f "$tmp" {keys} || {{ rm -f "$tmp"; exit 1; }}; }}'
    )


def withdraw_command() -> str:
    """After a fan-out (or on a host that holds a transfer key it needs no more): no glmfleet key
    authorized, no private transfer key or peers' host keys left."""
    return f"{authorize_command(None)} && rm -f {quote(PEER_KEY)} {quote(PEER_KNOWN_HOSTS)}"
