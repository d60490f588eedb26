"""model_weights: the configured model's files on every host, at a pinned revision, verified.

Each host keeps one directory per model revision and a host-local state that says which files
were verified against the revision's manifest. The host script ``files/glmfleet_weights.py``
does the fetching and hashing; this role installs it and what it needs (the hub CLI in its own
small venv, rsync, the fleet's transfer key), reads the state as a fact, and runs it only
where the revision is not complete, so a converged host does no hashing and no transfer.

With ``model_source: peer`` the hosts of one model revision fetch it once: one seed host (or
an already complete host) gets it from the origin, then every complete host hands it to one
more host per round (1 -> 2 -> 4 -> ...), by rsync over SSH. The rounds are pyinfra
operations: pyinfra runs each operation on every host before the next, which is the barrier
between rounds; see :func:`fanout_rounds`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path, PurePosixPath
from weakref import WeakKeyDictionary

from gevent.pool import Pool
from packaging.version import Version
from pyinfra import host
from pyinfra.api import State, deploy
from pyinfra.operations import files

from glmfleet import FILES
from glmfleet import catalog
from glmfleet.config import (
    ConfigError,
    HostConfig,
    Setting,
    documented,
    format_problems,
    host_config,
    is_abs_path,
    is_int_in,
    is_number_in,
    is_one_of,
    is_str,
    is_str_list,
    is_url,
    is_version,
    optional,
)
from glmfleet.facts import ManagedPaths, ModelWeights, Question, ask_together
from glmfleet.operations import directory, live_steps, secret_file, upload
from glmfleet.toolvenv import ensure_debs, install_tool, tool_bin
from roles.vllm_venv import SYSTEM_CA_BUNDLE, index_args

TOOLS_BIN = "/opt/glmfleet/bin"
SCRIPT = f"{TOOLS_BIN}/glmfleet-weights"
RSYNC = "/usr/bin/rsync"  # copies from the control node and between peers
SCRIPT_SOURCE = FILES / "glmfleet_weights.py"
STATE_DIR = "/var/lib/glmfleet/weights"
SECRETS_DIR = "/etc/glmfleet"
HF_TOKEN_FILE = f"{SECRETS_DIR}/hf_token"
PEER_KEY = f"{SECRETS_DIR}/peer_ed25519"
PEER_KNOWN_HOSTS = f"{SECRETS_DIR}/peer_known_hosts"
CLI_HOME = "/var/cache/glmfleet/hub"
# The trees manifest (size + LFS sha256 of every file) is written by hf from this version on.
HF_TREES_SINCE = Version("1.28")
SOURCES = ("hf", "modelscope", "control", "path", "peer")


def is_commit(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40}", value) is not None


def is_gigabytes(value) -> bool:
    return type(value) in (int, float) and 0 <= value <= 100_000


SETTINGS = (
    Setting("model_source", "hf", "where the weights come from: 'hf' (the hub CLI on each host), 'modelscope', "
            "'control' (pushed from a directory on the control node), 'path' (already on the host: verify only), "
            "'peer' (fetched once, then copied host to host)", "one of " + ", ".join(map(repr, SOURCES)), is_one_of(*SOURCES)),
    Setting("model_revision", None, "the commit to fetch and serve, pinned so every host serves the same bytes (required)",
            "a 40-hex commit id", optional(is_commit)),
    Setting("model_dir", None, "where the weights live on the host and vLLM serves from "
            "(default: <vllm_state_dir>/models/<owner>--<name>/<model_revision>)", "None or an absolute path", optional(is_abs_path)),
    Setting("model_include", [], "only the files matching these globs (the hub CLI's --include)", "a list of glob patterns", is_str_list),
    Setting("model_exclude", [], "leave out the files matching these globs (the hub CLI's --exclude), e.g. ['original/*']",
            "a list of glob patterns", is_str_list),
    Setting("model_control_dir", None, "the directory on the control node that holds the files (model_source 'control', "
            "or model_peer_seed 'control')", "None or an absolute path", optional(is_abs_path)),
    Setting("model_peer_seed", "hf", "with model_source 'peer': how the first host gets the weights", "'hf', 'modelscope' or 'control'",
            is_one_of("hf", "modelscope", "control")),
    Setting("model_peer_key", ".glmfleet/peer_ed25519", "the fleet's own transfer key on the control node, made if missing "
            "(hosts copy from each other with it; never the operator's key); relative paths are from the deploy directory",
            "a path", is_str),
    Setting("model_peer_address", None, "the address other hosts reach this host's sshd on for copies (default: its ssh_hostname)",
            "None or a host name or address", optional(is_str)),
    Setting("model_disk_margin_gb", 5, "free space (GB) that must remain after the model is fetched; checked before any transfer",
            "a number 0-100000", is_gigabytes),
    Setting("model_verify", "changed", "'changed': re-hash only files whose size, mtime, ctime or inode changed since they "
            "were verified; 'always': re-hash every file on every run (a scrub for silent disk corruption)",
            "'changed' or 'always'", is_one_of("changed", "always")),
    Setting("model_transfer_limit_mbps", None, "cap (MB/s) for each copy between hosts and from the control node, so copies "
            "leave bandwidth to serving traffic (rsync --bwlimit)", "None or a number > 0", optional(is_number_in(0, 100_000))),
    Setting("model_progress_interval", 10, "seconds between progress lines of a transfer", "an integer 1-3600", is_int_in(1, 3600)),
    Setting("hf_endpoint", None, "the Hugging Face hub or a mirror of it (HF_ENDPOINT)", "None or an http(s) URL", optional(is_url)),
    Setting("hf_xet", "on", "hub transfers over xet: 'on', 'off' (HF_HUB_DISABLE_XET=1, for mirrors that serve plain HTTP), "
            "'high-performance' (HF_XET_HIGH_PERFORMANCE=1, hosts with >= 64 GB RAM)", "'on', 'off' or 'high-performance'",
            is_one_of("on", "off", "high-performance")),
    Setting("hf_token", None, "Hugging Face token for gated and private models (kept in a root-only file, never on a command line)",
            "None or a string", optional(is_str), secret=True),
    Setting("hf_cli_version", "2.4.0", "huggingface_hub version whose `hf` CLI fetches on the hosts (>= 1.28: it writes the "
            "hub's manifest)", "a version such as '2.4.0'", is_version),
    Setting("modelscope_version", "1.40.2", "modelscope version whose CLI fetches on the hosts", "a version such as '1.40.2'", is_version),
    Setting("modelscope_domain", None, "the ModelScope site or a mirror of it, as a host name (MODELSCOPE_DOMAIN)",
            "None or a host name such as 'www.modelscope.cn'", optional(lambda v: is_str(v) and re.fullmatch(r"[\w.-]+(:\d+)?", v) is not None)),
)


def combination_problems(cfg: dict) -> list[str]:
    found = []
    if cfg["model"].startswith("/"):
        found.append(f"model = {cfg['model']!r} is a path: set model_dir to it (with model_source 'path') and model to a repo id")
    origin = cfg["model_peer_seed"] if cfg["model_source"] == "peer" else cfg["model_source"]
    if origin == "control" and not cfg["model_control_dir"]:
        found.append(f"model_source {cfg['model_source']!r} takes the files from the control node: set model_control_dir")
    if cfg["model_source"] == "path" and not cfg["model_dir"]:
        found.append("model_source 'path' verifies files already on the host: set model_dir to their directory")
    if origin == "hf" and Version(cfg["hf_cli_version"]) < HF_TREES_SINCE:
        found.append(f"hf_cli_version = {cfg['hf_cli_version']!r} writes no manifest of the hub's sha256s: use {HF_TREES_SINCE} or later")
    return found


# --- names: a model and revision always map to the same directory and state ----------------------


def model_path(cfg: HostConfig) -> str:
    """The directory vLLM serves from."""
    if cfg.model_dir:
        return cfg.model_dir
    return f"{cfg.vllm_state_dir}/models/{cfg.model.replace('/', '--')}/{cfg.model_revision}"


def state_path(cfg: HostConfig) -> str:
    return f"{STATE_DIR}/{model_path(cfg).strip('/').replace('/', '-')}.json"


def selection_key(cfg: HostConfig) -> str:
    """What a completion mark is valid for: the same directory holding another model, revision or
    file selection is not complete."""
    identity = json.dumps([cfg.model, cfg.model_revision, sorted(cfg.model_include), sorted(cfg.model_exclude)])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def state_args(cfg: HostConfig) -> list[str]:
    return ["--dir", model_path(cfg), "--state", state_path(cfg), "--key", selection_key(cfg)]


def check_argv(cfg: HostConfig) -> list[str]:
    """For the vLLM unit's ExecStartPre: fails unless this revision is complete on the host."""
    return [SCRIPT, "check", *state_args(cfg)]


def origin(cfg: HostConfig) -> str:
    return cfg.model_peer_seed if cfg.model_source == "peer" else cfg.model_source


def cli_bin(cfg: HostConfig, source: str) -> str | None:
    if source == "hf":
        return tool_bin("huggingface_hub", cfg.hf_cli_version, "hf")
    if source == "modelscope":
        return tool_bin("modelscope", cfg.modelscope_version, "modelscope")
    return None


def source_repo(cfg: HostConfig, source: str) -> str:
    """The repository to fetch: on ModelScope, the catalog's ModelScope id of the model."""
    entry = catalog.find(cfg.model) if source == "modelscope" else None
    return entry.modelscope if entry and entry.modelscope else cfg.model


def sync_argv(cfg: HostConfig, source: str, phase: str = "all", peers: list[str] = ()) -> list[str]:
    """The host script's command line for one fetch; secrets only as file names."""
    argv = [SCRIPT, "sync", *state_args(cfg), "--model", source_repo(cfg, source), "--revision", cfg.model_revision, "--source", source,
            "--phase", phase, "--margin-bytes", str(int(cfg.model_disk_margin_gb * 10**9)), "--verify", cfg.model_verify,
            "--progress-interval", str(cfg.model_progress_interval), "--cli-home", CLI_HOME]
    for pattern in cfg.model_include:
        argv += ["--include", pattern]
    for pattern in cfg.model_exclude:
        argv += ["--exclude", pattern]
    if source in ("hf", "modelscope"):
        argv += ["--cli", cli_bin(cfg, source)]
        for name, value in cli_environment(cfg, source).items():
            argv += ["--env", f"{name}={value}"]
        if source == "hf" and cfg.hf_token:
            argv += ["--token-file", HF_TOKEN_FILE]
    if source == "peer":
        argv += ["--peer-path", peer_path(cfg), "--peer-key", PEER_KEY, "--known-hosts", PEER_KNOWN_HOSTS,
                 *rsync_limit(cfg)]
        for peer in peers:
            argv += ["--peer", peer]
    return argv


def cli_environment(cfg: HostConfig, source: str) -> dict[str, str]:
    env = {}
    if source == "hf":
        if cfg.hf_endpoint:
            env["HF_ENDPOINT"] = cfg.hf_endpoint
        if cfg.hf_xet == "off":
            env["HF_HUB_DISABLE_XET"] = "1"
        elif cfg.hf_xet == "high-performance":
            env["HF_XET_HIGH_PERFORMANCE"] = "1"
    elif cfg.modelscope_domain:
        env["MODELSCOPE_DOMAIN"] = cfg.modelscope_domain
    return env


# --- peer fan-out ------------------------------------------------------------------------------


def peer_root(cfg: HostConfig) -> str:
    """The one directory the transfer key may read (rrsync -ro): the model directory's parent."""
    return str(PurePosixPath(model_path(cfg)).parent)


def peer_path(cfg: HostConfig) -> str:
    """The model directory as a peer's rrsync sees it (relative to its peer_root)."""
    return PurePosixPath(model_path(cfg)).name


def fanout_rounds(complete: list[str], pending: list[str]) -> list[list[tuple[str, str | None]]]:
    """Who copies from whom, round by round: ``[[(receiver, source), ...], ...]``.

    Every host that holds the revision hands it to one host that does not, so the holders
    double each round. With no holder, round 0 is the first pending host fetching from the
    origin (source ``None``): the one copy the whole fleet reads from the origin."""
    holders, waiting, rounds = list(complete), list(pending), []
    if not holders and waiting:
        seed = waiting.pop(0)
        rounds.append([(seed, None)])
        holders.append(seed)
    while waiting:
        this_round = [(waiting.pop(0), source) for source in holders[: len(waiting)]]
        rounds.append(this_round)
        holders += [receiver for receiver, _ in this_round]
    return rounds


@dataclass
class FanoutPlan:
    rounds: list[list[tuple[str, str | None]]] = field(default_factory=list)
    # host name -> "address:port" other hosts reach its sshd on, and its ssh host key
    addresses: dict[str, str] = field(default_factory=dict)
    host_keys: dict[str, str] = field(default_factory=dict)
    facts: dict[str, dict] = field(default_factory=dict)


_plans: WeakKeyDictionary[State, dict[str, FanoutPlan]] = WeakKeyDictionary()


def fanout_group(cfg: HostConfig) -> str:
    return json.dumps([model_path(cfg), selection_key(cfg)])


def weights_question(cfg: HostConfig) -> Question:
    return Question(ModelWeights, {"state_file": state_path(cfg), "model_dir": model_path(cfg), "key": selection_key(cfg),
                                   "tools": [t for t in (cli_bin(cfg, "hf"), cli_bin(cfg, "modelscope"), RSYNC) if t]})


def questions(cfg: HostConfig) -> dict[str, Question]:
    """What this role reads from the host, by name; ``roles.serving_host`` asks every role's in one command."""
    if cfg.model_revision is None:  # the role raises the ConfigError that says why
        return {}
    return {"weights": weights_question(cfg), "managed": Question(ManagedPaths, {"paths": [TOOLS_BIN, SCRIPT, STATE_DIR, SECRETS_DIR]})}


def fanout_plans() -> dict[str, FanoutPlan]:
    """Every peer group's rounds, computed once per deploy from every host's state (one fact
    per host), so each host plans the same rounds."""
    run = host.state  # the run's own State: pyinfra's `state` is one proxy for every run
    if run not in _plans:
        groups: dict[str, list] = {}
        for target in run.inventory:  # (the inventory context is unset under pyinfra's API)
            cfg = host_config(target)
            if cfg.model_source == "peer":
                groups.setdefault(fanout_group(cfg), []).append((target, cfg))
        plans = {}
        for group, members in groups.items():
            answers = members_weights(run, members)
            plan = FanoutPlan()
            complete, pending = [], []
            for (target, cfg), fact in zip(members, answers):
                plan.facts[target.name] = fact
                (complete if fact["complete"] else pending).append(target.name)
                address = cfg.model_peer_address or target.data.get("ssh_hostname") or target.name
                plan.addresses[target.name] = f"{address}:{target.data.get('ssh_port') or 22}"
                plan.host_keys[target.name] = fact["host_key"]
            plan.rounds = fanout_rounds(complete, pending)
            plans[group] = plan
        _plans[run] = plans
    return _plans[run]


def members_weights(run: State, members: list) -> list[dict]:
    """Each member's weights fact, asked side by side (as many at once as pyinfra's --parallel):
    a member whose own plan has not begun (a fleet larger than that pool) is asked here, a
    round trip each if asked in turn. A failure is raised here, in this host's planning, as
    pyinfra reports it; a greenlet that raised would also print its traceback."""

    def weights_or_error(member):
        target, cfg = member
        try:
            return weights_question(cfg).of(target)
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
        if plan.host_keys.get(name):
            lines.append(f"[{hostname}]:{port} {plan.host_keys[name]}" if port != "22" else f"{hostname} {plan.host_keys[name]}")
    return "\n".join(lines) + "\n"


def peer_key_pair(cfg: HostConfig) -> tuple[str, str]:
    """The fleet's transfer key (made once on the control node, never the operator's own)."""
    path = Path(cfg.model_peer_key)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "glmfleet-peer-transfer", "-f", str(path)], check=True)
    return path.read_text(), Path(f"{path}.pub").read_text().strip()


def authorized_line(cfg: HostConfig, public_key: str) -> str:
    """The transfer key may only read the model directory's parent, with rsync, nothing else."""
    return f'restrict,command="/usr/bin/rrsync -ro {peer_root(cfg)}" {public_key}'


# --- the control node's push -------------------------------------------------------------------


def rsync_limit(cfg: HostConfig) -> list[str]:
    """rsync's --bwlimit counts KiB/s."""
    return [f"--bwlimit={max(1, int(cfg.model_transfer_limit_mbps * 10**6 / 1024))}"] if cfg.model_transfer_limit_mbps else []


def push_argv(host_data, src: str, dest: str, sudo: bool, limit: list[str] = ()) -> list[str]:
    """rsync from the control node to a host over the host's own SSH settings (as pyinfra's)."""
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "Compression=no"]
    if host_data.get("ssh_known_hosts_file"):
        ssh += ["-o", f"UserKnownHostsFile={host_data.get('ssh_known_hosts_file')}"]
    if host_data.get("ssh_strict_host_key_checking"):
        ssh += ["-o", f"StrictHostKeyChecking={host_data.get('ssh_strict_host_key_checking')}"]
    if host_data.get("ssh_port"):
        ssh += ["-p", str(host_data.get("ssh_port"))]
    if host_data.get("ssh_key"):
        ssh += ["-i", str(host_data.get("ssh_key"))]
    user = f"{host_data.get('ssh_user')}@" if host_data.get("ssh_user") else ""
    return ["rsync", "--archive", "--partial-dir=.rsync-partial", "--exclude=/.cache/", "--info=progress2", "--no-inc-recursive", *limit,
            "--rsh", shlex.join(ssh), *(["--rsync-path", "sudo rsync"] if sudo else []),
            f"{src.rstrip('/')}/", f"{user}{host_data.get('ssh_hostname') or host.name}:{dest}/"]


def push(state, host, argv: list[str], interval: int) -> bool:
    """Run rsync here and show its progress2 line (bytes, %, rate, ETA) every ``interval`` s."""
    import time

    from gevent.subprocess import PIPE, STDOUT, Popen
    from pyinfra.api.output import echo

    process = Popen(argv, stdout=PIPE, stderr=STDOUT, stdin=PIPE)
    process.stdin.close()
    last, buffer, tail = 0.0, b"", []
    while chunk := process.stdout.read1(65536):
        buffer += chunk
        *lines, buffer = re.split(rb"[\r\n]", buffer)
        for line in filter(None, (line.decode(errors="replace").strip() for line in lines)):
            tail = (tail + [line])[-10:]
            if time.monotonic() - last >= interval and re.search(r"\d+%", line):
                last = time.monotonic()
                echo(f"{host.print_prefix}push from the control node: {line}", err=True)
    process.wait()
    if process.returncode != 0:
        echo(f"{host.print_prefix}rsync from the control node failed ({process.returncode}):\n" + "\n".join(tail), err=True)
    return process.returncode == 0


def fetch_steps(cfg: HostConfig, source: str, peers: list[str] = ()) -> list:
    """The commands that bring this host's copy to complete from ``source``."""
    if source != "control":
        return [shlex.join(sync_argv(cfg, source, peers=peers))]
    control_dir = cfg.model_control_dir
    # The manifest travels first (computed here once if the directory has none), so the host
    # checks its disk against the model's size before any weight is pushed.
    manifest = Path(control_dir) / ".glmfleet" / "manifest.json"
    if not manifest.exists():
        subprocess.run(["python3", str(SCRIPT_SOURCE), "manifest", control_dir, "--model", cfg.model, "--revision", cfg.model_revision,
                        *sum((["--include", p] for p in cfg.model_include), []), *sum((["--exclude", p] for p in cfg.model_exclude), [])],
                       check=True, stdout=subprocess.DEVNULL)
    sudo = bool((host.current_op_global_arguments or {}).get("_sudo") or host.data.get("_sudo"))
    manifest_dest = f"{model_path(cfg)}/.glmfleet"
    return [
        f"mkdir -p {shlex.quote(manifest_dest)}",
        (push, push_argv(host.data, str(manifest.parent), manifest_dest, sudo), cfg.model_progress_interval),
        shlex.join(sync_argv(cfg, "control", phase="prepare")),
        (push, push_argv(host.data, control_dir, model_path(cfg), sudo, rsync_limit(cfg)), cfg.model_progress_interval),
        shlex.join(sync_argv(cfg, "control", phase="finish")),
    ]


# --- the role --------------------------------------------------------------------------------


@deploy("model weights")
@documented(SETTINGS)
def model_weights():
    """
    Bring the configured model revision onto the host, verified, and mark it complete.

    A host whose copy is complete (every file verified, nothing changed since) runs nothing.
    Otherwise the host script checks free disk first, fetches what is missing or wrong, hashes
    it against the manifest and only then marks the revision complete; a failure fails the
    host, so vLLM is never started on it. ``check_argv`` is the same test for the unit's
    ExecStartPre. Returns the operations whose change means new weights (restart vLLM).
    """
    cfg = host_config(host)
    if cfg.model_revision is None:
        # Checked here, not with the other keys: the other roles run without it (alone, or in tests).
        raise ConfigError(format_problems([
            f"{host.name}: model_revision is not set: glmfleet fetches and serves a pinned commit of {cfg.model}; set it "
            "to the 40-hex commit id from the repository's history (a branch name would make 'already complete' lie)"]))
    peer_plan = fanout_plans().get(fanout_group(cfg)) if cfg.model_source == "peer" else None
    answers = ask_together(host, questions(cfg))
    fact = peer_plan.facts[host.name] if peer_plan else answers["weights"]

    managed = answers["managed"]
    directory(managed, TOOLS_BIN, name="glmfleet tools dir")
    upload(managed, SCRIPT, SCRIPT_SOURCE, mode="755", name="weights script")
    directory(managed, STATE_DIR, name="weights state dir")
    directory(managed, SECRETS_DIR, mode="700", name="root-only secrets dir")

    # Which source this host fetches from in this run: its own origin, or (peer) the seed's
    # origin for the seed and rsync from a peer for everyone else.
    if peer_plan:
        schedule = {receiver: source for round_ in peer_plan.rounds for receiver, source in round_}
        source = (origin(cfg) if schedule.get(host.name, "") is None else "peer") if host.name in schedule else None
    else:
        source = None if fact["complete"] else cfg.model_source

    debs = ["rsync"] if cfg.model_source in ("peer", "control") and RSYNC not in fact["tools"] else []
    if source in ("hf", "modelscope"):
        package, version = {"hf": ("huggingface_hub", cfg.hf_cli_version), "modelscope": ("modelscope", cfg.modelscope_version)}[source]
        install_tool(package, version, cfg.vllm_python, ["--cert", SYSTEM_CA_BUNDLE, *index_args(cfg)], installed=cli_bin(cfg, source) in fact["tools"])
    if debs:
        ensure_debs(debs)
    if cfg.hf_token and source == "hf":
        secret_file(name=f"hub token {HF_TOKEN_FILE}", dest=HF_TOKEN_FILE, content=cfg.hf_token + "\n")

    if peer_plan:
        # A group whose every member is complete transfers nothing: its key, host keys and
        # rounds (several commands of pyinfra's own facts on every host) wait for a run that does.
        return _peer_rounds(cfg, peer_plan, source) if peer_plan.rounds else []
    if source is None:
        return []
    return [live_steps(name=f"fetch {cfg.model}@{cfg.model_revision[:12]} from {source}",
                       steps=fetch_steps(cfg, source))]


def _peer_rounds(cfg: HostConfig, plan: FanoutPlan, source: str | None) -> list:
    private_key, public_key = peer_key_pair(cfg)
    secret_file(name="fleet transfer key", dest=PEER_KEY, content=private_key)
    files.put(name="peers' host keys", src=StringIO(known_hosts(plan)), dest=PEER_KNOWN_HOSTS, user="root", group="root", mode="644")
    files.directory(name="root's ssh dir", path="/root/.ssh", user="root", group="root", mode="700")
    files.line(name="transfer key may read the model directory (rrsync -ro)", path="/root/.ssh/authorized_keys",
               line=re.escape(public_key.split()[1]), replace=authorized_line(cfg, public_key))
    changed = []
    # The same operations on every host, one per round: pyinfra finishes an operation on all
    # hosts before it starts the next, so a round only copies from hosts done in earlier ones.
    for number in host.loop(range(len(plan.rounds))):
        pairs = dict(plan.rounds[number])
        steps = []
        if host.name in pairs:
            giver = pairs[host.name]
            if giver is None:
                steps = fetch_steps(cfg, origin(cfg))
            else:
                # The assigned giver first; the seed as fallback should the giver have failed.
                seed = plan.rounds[0][0][1] or plan.rounds[0][0][0]
                givers = [plan.addresses[giver]] + ([plan.addresses[seed]] if seed not in (giver, host.name) else [])
                steps = fetch_steps(cfg, "peer", peers=givers)
        # One name on every host: pyinfra shows an operation once, whoever runs what in it.
        op = live_steps(name=f"weights round {number + 1}/{len(plan.rounds)}", steps=steps)
        if steps:
            changed.append(op)
    return changed
