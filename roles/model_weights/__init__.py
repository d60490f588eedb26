"""model_weights: the configured model's files on every host, at a pinned revision, verified.

Each host keeps one directory per model revision, in the model store (``model_root``, root's,
read-only to vLLM) unless ``model_dir`` names another, and a host-local state that says which
files were verified against the revision's manifest. The host script
``files/glmfleet_weights.py`` does the fetching and hashing; this role installs it and what it
needs (the hub CLI in its own small venv, rsync, for a fan-out the fleet's transfer key),
reads the state as a fact, and runs it only where the revision is not complete, so a converged
host does no hashing and no transfer.

With ``model_source: peer`` the hosts of one model revision fetch it once: one seed host gets
it from the origin (where no host holds it yet) and every host passes on each file as soon as it
has verified it, while it still receives others, as the control node's scheduler directs
(``swarm``): by rsync over SSH with a key that may only read the model store, authorized only
while the fan-out runs.
"""

from __future__ import annotations

import json
import re
from io import StringIO

from packaging.version import Version
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from glmfleet import catalog, checks
from glmfleet.checks import inside
from glmfleet.config import ConfigError, HostConfig, Setting, documented, format_problems, host_config
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.paths import ManagedPaths
from glmfleet.layout import (
    BIN_DIR,
    DEFAULT_MODEL_ROOT,
    HUB_CLI_HOME,
    HUB_ENV_FILE,
    PEER_CONNECTIONS,
    PEER_KEY,
    PEER_KNOWN_HOSTS,
    RSYNC,
    SECRETS_DIR,
    STATE_ROOT,
    WEIGHTS_SCRIPT,
    WEIGHTS_STATE_DIR,
    model_dir,
    model_dir_in_store,
    model_incoming_dir,
    tool_dir,
    weights_state_args,
)
from glmfleet.operations import directory, live_steps, owned_directory, upload, write_secret
from glmfleet.shell import join
from glmfleet.toolvenv import ensure_debs, install_tool
from roles.model_weights import control, fanout

SCRIPT_SOURCE = control.SCRIPT_SOURCE
# The trees manifest (size + LFS sha256 of every file) is written by hf from this version on.
HF_TREES_SINCE = Version("1.28")
SOURCES = ("hf", "modelscope", "control", "path", "peer")

SETTINGS = (
    Setting(
        "model_source",
        "hf",
        "where the weights come from: 'hf' (the hub CLI on each host), 'modelscope', "
        "'control' (pushed from a directory on the control node), 'path' (already on the host: verify only), "
        "'peer' (fetched once, then copied host to host)",
        checks.one_of(*SOURCES),
    ),
    Setting(
        "model_revision",
        None,
        "the commit to fetch and serve, pinned so every host serves the same bytes (required)",
        checks.optional(checks.matches(r"[0-9a-f]{40}", "a 40-hex commit id")),
        accepted_text="a 40-hex commit id",
    ),
    Setting(
        "model_root",
        DEFAULT_MODEL_ROOT,
        "the model store: one directory per revision (<owner>--<name>/<commit>), "
        "root's and read-only to vLLM, the only directory peers may copy from (made by glmfleet; put it on a "
        "disk with room for the weights)",
        checks.owned_dir,
    ),
    Setting(
        "model_dir",
        None,
        "where the weights live on the host and vLLM serves from, instead of the model store "
        "(model_source 'path': files already there, e.g. NFS, only verified)",
        checks.optional(checks.abs_path),
    ),
    Setting(
        "model_include",
        [],
        "only the files matching these globs (the hub CLI's --include)",
        checks.list_of(checks.text(), "a list of glob patterns"),
    ),
    Setting(
        "model_exclude",
        [],
        "leave out the files matching these globs (the hub CLI's --exclude), e.g. ['original/*']",
        checks.list_of(checks.text(), "a list of glob patterns"),
    ),
    Setting(
        "model_control_dir",
        None,
        "the directory on the control node that holds the files (model_source 'control', or model_peer_seed 'control')",
        checks.optional(checks.local_path),
    ),
    Setting(
        "model_peer_seed",
        "hf",
        "with model_source 'peer': how the first host gets the weights",
        checks.one_of("hf", "modelscope", "control"),
    ),
    Setting(
        "model_peer_key",
        None,
        "the fleet's own transfer key on the control node, made there once if missing (default: "
        f"{control.CONTROL_DIR_ENV}, else ~/.local/state/glmfleet/peer_ed25519; never in the deploy directory, never "
        "the operator's key); authorized on the hosts only while a fan-out runs",
        checks.optional(checks.local_path),
    ),
    Setting(
        "model_peer_address",
        None,
        "the address other hosts reach this host's sshd on for copies (default: its ssh_hostname)",
        checks.optional(checks.host_or_address),
    ),
    Setting(
        "model_disk_margin_gb",
        5,
        "free space (GB) that must remain after the model is fetched; checked before any transfer",
        checks.gigabytes(100_000),
    ),
    Setting(
        "model_verify",
        "changed",
        "'changed': re-hash only files whose size, mtime, ctime or inode changed since they "
        "were verified; 'always': re-hash every file on every run (a scrub for silent disk corruption)",
        checks.one_of("changed", "always"),
    ),
    Setting(
        "model_transfer_limit_mbps",
        None,
        "cap (MB/s) for each copy between hosts and from the control node, so copies "
        "leave bandwidth to serving traffic (rsync --bwlimit; in a fan-out the receiver paces each copy); a fan-out "
        "host reads one copy at a time and gives to one host at a time (a second where the first is slow), so this "
        "caps each host's fan-out traffic each way",
        checks.optional(checks.number_in(0, 100_000, "a number > 0")),
    ),
    Setting("model_progress_interval", 10, "seconds between progress lines of a transfer", checks.int_in(1, 3600)),
    Setting(
        "hf_endpoint",
        None,
        "the Hugging Face hub or a mirror of it (HF_ENDPOINT; credentials in it stay in a root-only file)",
        checks.optional(checks.http_url),
    ),
    Setting(
        "hf_xet",
        "on",
        "hub transfers over xet: 'on', 'off' (HF_HUB_DISABLE_XET=1, for mirrors that serve plain HTTP), "
        "'high-performance' (HF_XET_HIGH_PERFORMANCE=1, hosts with >= 64 GB RAM)",
        checks.one_of("on", "off", "high-performance"),
    ),
    Setting(
        "hf_token",
        None,
        "Hugging Face token for gated and private models (kept in a root-only file, never on a command line)",
        checks.optional(checks.printable_ascii("a token of printable ASCII without spaces")),
        secret=True,
    ),
    Setting(
        "hf_cli_version",
        "2.4.0",
        "huggingface_hub version whose `hf` CLI fetches on the hosts (>= 1.28: it writes the hub's manifest)",
        checks.version("2.4.0"),
    ),
    Setting(
        "modelscope_version",
        "1.40.2",
        "modelscope version installed with its CLI on the hosts",
        checks.version("1.40.2"),
    ),
    Setting(
        "modelscope_hub_version",
        "0.5.1",
        "modelscope-hub version, pinned with modelscope: its `modelscope` command "
        "is the one that fetches (modelscope >= 1.38 takes the CLI from it, unpinned)",
        checks.version("0.5.1"),
    ),
    Setting(
        "modelscope_domain",
        None,
        "the ModelScope site or a mirror of it (MODELSCOPE_ENDPOINT): a host name (https) or an http(s) URL",
        checks.optional(
            checks.Check(
                lambda v: checks.http_url(v) or re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?", v) is not None,
                "a host name such as 'www.modelscope.cn' or an http(s) URL",
            )
        ),
    ),
)


def origin(cfg) -> str:
    return cfg["model_peer_seed"] if cfg["model_source"] == "peer" else cfg["model_source"]


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    found = []
    if cfg["model"].startswith("/"):
        found.append(
            f"model = {cfg['model']!r} is a path: set model_dir to it (with model_source 'path') and model to a repo id"
        )
    if origin(cfg) == "control" and not cfg["model_control_dir"]:
        found.append(
            f"model_source {cfg['model_source']!r} takes the files from the control node: set model_control_dir"
        )
    if cfg["model_source"] == "path" and not cfg["model_dir"]:
        found.append("model_source 'path' verifies files already on the host: set model_dir to their directory")
    if origin(cfg) == "hf" and Version(cfg["hf_cli_version"]) < HF_TREES_SINCE:
        found.append(
            f"hf_cli_version = {cfg['hf_cli_version']!r} writes no manifest of the hub's sha256s: use {HF_TREES_SINCE} or later"
        )
    directory = cfg["model_dir"]
    if cfg["model_source"] == "peer" and directory and not directory.startswith(cfg["model_root"].rstrip("/") + "/"):
        found.append(
            f"model_source 'peer' copies from the model store only: model_dir = {directory!r} is outside "
            f"model_root = {cfg['model_root']!r}; leave model_dir unset, or set model_root to hold it"
        )
    for key in ("model_root", "model_dir"):
        if cfg[key] and inside(cfg[key], cfg["vllm_state_dir"]):
            found.append(
                f"{key} = {cfg[key]!r} is inside vllm_state_dir = {cfg['vllm_state_dir']!r}, which the vllm user "
                "owns: root writes the weights, so they live where only root can change the directories above them"
            )
    if directory and cfg["model_source"] != "path" and checks.is_system_dir(directory):
        found.append(f"model_dir = {directory!r} is a system directory: glmfleet would write the weights into it")
    return found


def prepare(configs: dict[str, HostConfig]) -> None:
    """The control node's work before any host is planned (``control.prepare``)."""
    control.prepare(configs)


# --- what runs on the host -------------------------------------------------------------------


def cli_tool(cfg: HostConfig, source: str) -> tuple[str, list[str], str] | None:
    """The hub CLI of a source: its venv, the pins installed there, and its command."""
    if source == "hf":
        return tool_dir("huggingface_hub", cfg.hf_cli_version), [f"huggingface_hub=={cfg.hf_cli_version}"], "hf"
    if source == "modelscope":
        return (
            tool_dir("modelscope", f"{cfg.modelscope_version}-hub{cfg.modelscope_hub_version}"),
            [f"modelscope=={cfg.modelscope_version}", f"modelscope-hub=={cfg.modelscope_hub_version}"],
            "modelscope",
        )
    return None


def cli_bin(cfg: HostConfig, source: str) -> str | None:
    tool = cli_tool(cfg, source)
    return f"{tool[0]}/bin/{tool[2]}" if tool else None


def tools(cfg: HostConfig) -> list[str]:
    """What the weights fact looks for: the hub CLIs of this configuration, rsync."""
    return [tool for tool in (cli_bin(cfg, "hf"), cli_bin(cfg, "modelscope"), RSYNC) if tool]


def source_repo(cfg: HostConfig, source: str) -> str:
    """The repository to fetch: on ModelScope, the catalog's ModelScope id of the model."""
    entry = catalog.find(cfg.model) if source == "modelscope" else None
    return entry.modelscope if entry and entry.modelscope else cfg.model


def hub_environment(cfg: HostConfig, source: str) -> dict[str, str]:
    """The hub CLI's environment, endpoint and token among it: written to a root-only file
    (``layout.HUB_ENV_FILE``) that the host script reads, never on its command line."""
    env = {}
    if source == "hf":
        if cfg.hf_endpoint:
            env["HF_ENDPOINT"] = cfg.hf_endpoint
        if cfg.hf_token:
            env["HF_TOKEN"] = cfg.hf_token
        if cfg.hf_xet == "off":
            env["HF_HUB_DISABLE_XET"] = "1"
        elif cfg.hf_xet == "high-performance":
            env["HF_XET_HIGH_PERFORMANCE"] = "1"
    elif source == "modelscope" and cfg.modelscope_domain:
        domain = cfg.modelscope_domain
        env["MODELSCOPE_ENDPOINT"] = domain if "://" in domain else f"https://{domain}"
    return env


def selection_args(cfg: HostConfig) -> list[str]:
    return [arg for pattern in cfg.model_include for arg in ("--include", pattern)] + [
        arg for pattern in cfg.model_exclude for arg in ("--exclude", pattern)
    ]


def hub_args(cfg: HostConfig, source: str) -> list[str]:
    """What the host script needs to run a hub CLI; the token and endpoint only as a file name."""
    return ["--cli", cli_bin(cfg, source), "--env-file", HUB_ENV_FILE] if source in ("hf", "modelscope") else []


def fetch_args(cfg: HostConfig, source: str | None) -> list[str]:
    """What every fetch of the host script takes, a sync's or a fan-out member's: the disk margin,
    the verification, progress, the file selection and the hub CLI."""
    return [
        "--margin-bytes",
        str(int(cfg.model_disk_margin_gb * 10**9)),
        "--verify",
        cfg.model_verify,
        "--progress-interval",
        str(cfg.model_progress_interval),
        "--cli-home",
        HUB_CLI_HOME,
        *selection_args(cfg),
        *hub_args(cfg, source),
    ]


def sync_argv(cfg: HostConfig, source: str, phase: str = "all") -> list[str]:
    """The host script's command line for one fetch; secrets only as file names."""
    return [
        WEIGHTS_SCRIPT,
        "sync",
        *weights_state_args(cfg),
        "--model",
        source_repo(cfg, source),
        "--revision",
        cfg.model_revision,
        "--source",
        source,
        "--phase",
        phase,
        *fetch_args(cfg, source),
    ]


def swarm_argv(cfg: HostConfig, seed_origin: str | None, sudo: bool) -> list[str]:
    """The host script's command line for a member's part in a fan-out (the seed's with its origin)."""
    return [
        *(["sudo", "-n"] if sudo else []),
        WEIGHTS_SCRIPT,
        "swarm",
        *weights_state_args(cfg),
        "--model",
        source_repo(cfg, seed_origin or cfg.model_peer_seed),
        "--revision",
        cfg.model_revision,
        *(["--origin", seed_origin] if seed_origin else []),
        *fetch_args(cfg, seed_origin),
        "--peer-path",
        model_dir_in_store(cfg),
        "--peer-key",
        PEER_KEY,
        "--known-hosts",
        PEER_KNOWN_HOSTS,
        "--connections",
        PEER_CONNECTIONS,
        *(["--transfer-limit", str(cfg.model_transfer_limit_mbps * 10**6)] if cfg.model_transfer_limit_mbps else []),
    ]


def sudo_here() -> bool:
    return bool((host.current_op_global_arguments or {}).get("_sudo") or host.data.get("_sudo"))


def fetch_steps(cfg: HostConfig, source: str) -> list:
    """The commands that bring this host's copy to complete from ``source``."""
    if source != "control":
        return [join(sync_argv(cfg, source))]
    # The manifest travels first (``control.prepare`` made it), so the host checks its disk
    # against the model's size before any weight is pushed.
    sudo = sudo_here()
    target = model_dir(cfg)
    manifest = control.manifest_path(cfg)
    return [
        join(sync_argv(cfg, "control", phase="receive")),
        (
            control.push,
            control.push_argv(host.data, host.name, str(manifest.parent), f"{target}/.glmfleet", sudo),
            cfg.model_progress_interval,
        ),
        join(sync_argv(cfg, "control", phase="prepare")),
        (
            control.push,
            control.push_argv(host.data, host.name, cfg.model_control_dir, target, sudo, control.rsync_limit(cfg)),
            cfg.model_progress_interval,
        ),
        join(sync_argv(cfg, "control", phase="finish")),
    ]


def questions(cfg: HostConfig) -> dict[str, Question]:
    if cfg.model_revision is None:  # the role raises the ConfigError that says why
        return {}
    paths = [BIN_DIR, WEIGHTS_SCRIPT, STATE_ROOT, WEIGHTS_STATE_DIR, SECRETS_DIR, HUB_ENV_FILE, PEER_KEY]
    if not cfg.model_dir:
        paths.append(cfg.model_root)
    return {"weights": fanout.weights_question(cfg, tools(cfg)), "managed": Question(ManagedPaths, {"paths": paths})}


# --- the role --------------------------------------------------------------------------------


@deploy("model weights")
@documented(SETTINGS)
def model_weights():
    """
    Bring the configured model revision onto the host, verified, and mark it complete.

    A host whose copy is complete (every file verified, nothing changed since) runs nothing.
    Otherwise the host script checks free disk first, fetches what is missing or wrong, hashes
    it against the manifest and only then marks the revision complete; a failure fails the
    host, so vLLM is never started on it. ``layout.weights_check_argv`` is the same test for the unit's
    ExecStartPre. Returns the operations whose change means new weights (restart vLLM).
    """
    cfg = host_config(host)
    if cfg.model_revision is None:
        # Checked here, not with the other keys: the other roles run without it (alone, or in tests).
        raise ConfigError(
            format_problems(
                [
                    f"{host.name}: model_revision is not set: glmfleet fetches and serves a pinned commit of {cfg.model}; set it "
                    "to the 40-hex commit id from the repository's history (a branch name would make 'already complete' lie)"
                ]
            )
        )
    peer_plan = fanout.fanout_plans(tools).get(fanout.fanout_group(cfg)) if cfg.model_source == "peer" else None
    answers = ask_together(host, questions(cfg))
    fact = peer_plan.facts[host.name] if peer_plan else answers["weights"]

    managed = answers["managed"]
    directory(managed, BIN_DIR, name="glmfleet tools dir")
    upload(managed, WEIGHTS_SCRIPT, SCRIPT_SOURCE, mode="755", name="weights script")
    directory(managed, STATE_ROOT, name="glmfleet state dir")
    directory(managed, WEIGHTS_STATE_DIR, name="weights state dir")
    if not cfg.model_dir:
        owned_directory(managed, cfg.model_root, "model_root")

    # Which origin this host fetches from in this run: its own, or in a fan-out the seed's (the
    # seed alone), everyone else copying from peers.
    if peer_plan and peer_plan.fanout:
        source = origin(cfg) if peer_plan.seed == host.name else None
    elif peer_plan:  # a lone member
        source = None if fact["complete"] else origin(cfg)
    else:
        source = None if fact["complete"] else cfg.model_source

    if source in ("hf", "modelscope"):
        target, requirements, _ = cli_tool(cfg, source)
        install_tool(target, requirements, installed=cli_bin(cfg, source) in fact["tools"], cfg=cfg)
        directory(managed, SECRETS_DIR, mode="700", name="root-only secrets dir")
        upload(
            managed,
            HUB_ENV_FILE,
            json.dumps(hub_environment(cfg, source), indent=1, sort_keys=True) + "\n",
            mode="600",
            name=f"hub environment {HUB_ENV_FILE}",
            secret=True,
        )
    if cfg.model_source in ("peer", "control") and RSYNC not in fact["tools"]:
        ensure_debs(["rsync"])

    in_fanout = bool(peer_plan and peer_plan.fanout)
    if in_fanout:
        changed = _fanout(cfg, peer_plan, managed, source)
    else:
        changed = (
            []
            if source is None
            else [
                live_steps(
                    name=f"fetch {cfg.model}@{cfg.model_revision[:12]} from {source}", steps=fetch_steps(cfg, source)
                )
            ]
        )
    # A host that takes no part in a fan-out keeps no transfer key, authorized or private (an
    # earlier run that stopped half way, or the key this repository once published).
    if not in_fanout and (fact["authorized"] or PEER_KEY in managed["paths"]):
        server.shell(name="no transfer key on this host", commands=[fanout.withdraw_command()])
    return changed


def _fanout(cfg: HostConfig, plan: fanout.FanoutPlan, managed: dict, seed_origin: str | None) -> list:
    """A member's fan-out: the transfer key authorized here (alone: every other glmfleet key line
    goes) and handed to this host, this host's part run under the control node's scheduler
    (``swarm``), and the key withdrawn again once every member's part has ended (pyinfra ends an
    operation on every host before the next). Every member takes part: a complete one gives,
    and hashes its copy again should a peer find a file from it wrong."""
    private_key, public_key = control.key_pair(cfg)
    directory(managed, SECRETS_DIR, mode="700", name="root-only secrets dir")
    write_secret("fleet transfer key", PEER_KEY, private_key)
    files.put(
        name="peers' host keys",
        src=StringIO(fanout.known_hosts(plan)),
        dest=PEER_KNOWN_HOSTS,
        user="root",
        group="root",
        mode="644",
    )
    server.shell(
        name="transfer key may read the model store's model files, for this fan-out",
        commands=[fanout.authorize_command(fanout.authorized_line(cfg, public_key))],
    )
    sudo = sudo_here()
    push = None
    if seed_origin == "control":  # the control node pushes to the seed while it hands on what it gets
        push = control.push_argv(
            host.data,
            host.name,
            cfg.model_control_dir,
            model_incoming_dir(cfg),
            sudo,
            control.rsync_limit(cfg),
            listed=True,
        )
    part = live_steps(
        name="weights fan-out",
        steps=[
            (plan.fanout.take_part, swarm_argv(cfg, seed_origin, sudo), push, cfg.model_progress_interval),
        ],
    )
    server.shell(name="transfer key withdrawn after the fan-out", commands=[fanout.withdraw_command()])
    # A complete member's part changes no weights: its vLLM keeps serving.
    return [part] if host.name in plan.pending else []
