"""The control node's part of the weights: the fleet's transfer key and the control directory's
manifest, both made in one step before any host is planned (``prepare``), and the rsync push
of a control directory to a host while the deploy runs (``push``)."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import time
from pathlib import Path

from gevent.subprocess import PIPE, STDOUT, Popen
from pyinfra.api.output import echo

from glmfleet import FILES, shell
from glmfleet.config import ConfigError, HostConfig, format_problems

SCRIPT_SOURCE = FILES / "glmfleet_weights.py"
# What glmfleet writes as the transfer key's comment, and so what marks its lines in a host's
# authorized_keys; a key without it was not made by glmfleet and is refused.
KEY_COMMENT = "glmfleet-peer-transfer"
# The transfer key that glmfleet's repository once published (.glmfleet/peer_ed25519, removed):
# every host's authorized_keys loses it on every run, whatever its comment.
PUBLISHED_KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIKpYNpkHA25F2wqFkPy3TWozTbf9eCYuzlXjG3OxSM1F"
CONTROL_DIR_ENV = "GLMFLEET_CONTROL_DIR"


def control_dir() -> Path:
    """Where this control node keeps what is its own (the transfer key): ``$GLMFLEET_CONTROL_DIR``,
    else ``$XDG_STATE_HOME/glmfleet``, else ``~/.local/state/glmfleet``; never a working tree."""
    if os.environ.get(CONTROL_DIR_ENV):
        return Path(os.environ[CONTROL_DIR_ENV])
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "glmfleet"


def key_path(cfg: HostConfig) -> Path:
    return Path(cfg.model_peer_key) if cfg.model_peer_key else control_dir() / "peer_ed25519"


def key_problems(path: Path) -> list[str]:
    """Why ``path`` is not a transfer key glmfleet made and keeps private (empty: it is one)."""
    public = Path(f"{path}.pub")
    if not path.is_file() or not public.is_file():
        return [f"{path} and {public} are not both files"]
    found = []
    fields = public.read_text().split()
    if len(fields) < 3 or fields[0] != "ssh-ed25519" or fields[2] != KEY_COMMENT:
        found.append(
            f"{public} is not a key glmfleet made (an ed25519 key with the comment {KEY_COMMENT}): "
            "glmfleet never hands an operator's own key to the hosts"
        )
    elif fields[1] == PUBLISHED_KEY:
        found.append(f"{path} is the transfer key glmfleet's repository once published: delete it, a new one is made")
    for item, mode in ((path, 0o600), (path.parent, 0o700)):
        stat = item.stat()
        if stat.st_mode & 0o077 or stat.st_uid != os.geteuid():
            found.append(
                f"{item} must be yours with mode {mode:o} (it is {stat.st_mode & 0o777:o}): chmod {mode:o} {item}"
            )
    return found


def ensure_key(path: Path) -> None:
    """Make the key pair once (under a lock: several runs may start together), 0600 in a 0700
    directory, outside any working tree; refuse one that is not glmfleet's own."""
    deploy_dir = Path.cwd().resolve()
    if path.resolve().is_relative_to(deploy_dir):
        raise ConfigError(
            format_problems(
                [
                    f"model_peer_key = {str(path)!r} is inside the deploy directory {deploy_dir}, "
                    "where a key gets committed and published: leave model_peer_key unset (the "
                    f"key is kept in {control_dir()}) or choose a path outside it"
                ]
            )
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", KEY_COMMENT, "-f", str(path)],
                check=True,
                stdin=subprocess.DEVNULL,
            )
    problems = key_problems(path)
    if problems:
        raise ConfigError(format_problems([f"model_peer_key: {problem}" for problem in problems]))


def key_pair(cfg: HostConfig) -> tuple[str, str]:
    """The transfer key (private, public line) that ``prepare`` made or checked."""
    path = key_path(cfg)
    return path.read_text(), Path(f"{path}.pub").read_text().strip()


def manifest_argv(cfg: HostConfig) -> list[str]:
    patterns = [arg for p in cfg.model_include for arg in ("--include", p)]
    patterns += [arg for p in cfg.model_exclude for arg in ("--exclude", p)]
    return [
        "python3",
        str(SCRIPT_SOURCE),
        "manifest",
        cfg.model_control_dir,
        "--model",
        cfg.model,
        "--revision",
        cfg.model_revision,
        *patterns,
    ]


def manifest_path(cfg: HostConfig) -> Path:
    return Path(cfg.model_control_dir) / ".glmfleet" / "manifest.json"


def prepare(configs: dict[str, HostConfig]) -> None:
    """The control node's work, once per run before any host is planned: the transfer key where
    a host copies from peers, the manifest of every control directory that has none."""
    paths = {key_path(cfg) for cfg in configs.values() if cfg.model_source == "peer"}
    for path in sorted(paths):
        ensure_key(path)
    origins = {
        cfg.model_control_dir: cfg
        for cfg in configs.values()
        if "control" in (cfg.model_source, cfg.model_peer_seed if cfg.model_source == "peer" else None)
    }
    for cfg in origins.values():
        if cfg.model_revision and not manifest_path(cfg).exists():
            subprocess.run(manifest_argv(cfg), check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


# --- the push ----------------------------------------------------------------------------------

# Files arrive root's and world-readable, whoever owns them here: vLLM reads them as its own user.
RECEIVED_MODES = ["--no-owner", "--no-group", "--chmod=Du=rwx,Dgo=rx,Fu=rw,Fgo=r"]


def rsync_limit(cfg: HostConfig) -> list[str]:
    """rsync's --bwlimit counts KiB/s."""
    return (
        [f"--bwlimit={max(1, int(cfg.model_transfer_limit_mbps * 10**6 / 1024))}"]
        if cfg.model_transfer_limit_mbps
        else []
    )


def ssh_argv(host_data) -> list[str]:
    """ssh to a host with the host's own SSH settings (as pyinfra's), up to the remote command."""
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "Compression=no"]
    if host_data.get("ssh_known_hosts_file"):
        ssh += ["-o", f"UserKnownHostsFile={host_data.get('ssh_known_hosts_file')}"]
    if host_data.get("ssh_strict_host_key_checking"):
        ssh += ["-o", f"StrictHostKeyChecking={host_data.get('ssh_strict_host_key_checking')}"]
    if host_data.get("ssh_port"):
        ssh += ["-p", str(host_data.get("ssh_port"))]
    if host_data.get("ssh_key"):
        ssh += ["-i", str(host_data.get("ssh_key"))]
    return ssh


def ssh_target(host_data, host_name: str) -> str:
    user = f"{host_data.get('ssh_user')}@" if host_data.get("ssh_user") else ""
    return f"{user}{host_data.get('ssh_hostname') or host_name}"


def push_argv(
    host_data, host_name: str, src: str, dest: str, sudo: bool, limit: list[str] = (), listed: bool = False
) -> list[str]:
    """rsync from the control node to a host over the host's own SSH settings (as pyinfra's).
    ``listed``: only the files named on standard input, each written in place in ``dest`` (a
    fan-out seed's staging directory, whose files peers take as they land) and appended to
    after an interruption; else into a partial directory and moved into place once whole."""
    return [
        "rsync",
        "--archive",
        *RECEIVED_MODES,
        *(["--append-verify", "--files-from=-", "--from0"] if listed else ["--partial-dir=.rsync-partial"]),
        "--exclude=/.cache/",
        "--info=progress2",
        "--no-inc-recursive",
        *limit,
        "--rsh",
        shell.join(ssh_argv(host_data)),
        *(["--rsync-path", "sudo rsync"] if sudo else []),
        f"{src.rstrip('/')}/",
        f"{ssh_target(host_data, host_name)}:{dest}/",
    ]


def push(state, host, argv: list[str], interval: int, listed: list[str] = ()) -> bool:
    """Run rsync here and show its progress2 line (bytes, %, rate, ETA) every ``interval`` s;
    ``listed``: the files for ``--files-from=- --from0``."""
    process = Popen(argv, stdout=PIPE, stderr=STDOUT, stdin=PIPE)
    process.stdin.write(b"".join(os.fsencode(path) + b"\0" for path in listed))
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
        echo(
            f"{host.print_prefix}rsync from the control node failed ({process.returncode}):\n" + "\n".join(tail),
            err=True,
        )
    return process.returncode == 0
