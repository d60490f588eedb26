"""glmfleet's own pyinfra operations, for what pyinfra's built-in ones cannot do safely."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import FunctionCommand, StringCommand, operation
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.facts.files import Sha256File
from pyinfra.operations import files, server, systemd

from glmfleet import filesyntax
from glmfleet.checks import redact, url_credentials, without_credentials
from glmfleet.facts.network import ListeningPorts, port_holders
from glmfleet.facts.packages import DebPackageStates
from glmfleet.layout import KEYRINGS_DIR, MADE_DIRS_RECORD, NETRC, OWN_DIRS, STATE_ROOT, apt_keyring, apt_source
from glmfleet.shell import fail_with, join, quote

# Every apt-get call waits for a dpkg lock held by another apt (cloud-init, unattended-upgrades)
# instead of failing at once, and never asks a question.
APT_GET = (
    "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 "
    "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
)


def secret_write_command(dest: str, user: str, group: str, mode: str) -> str:
    """Write standard input to ``dest`` so that no other user can read it at any moment: into a
    new file that ``mktemp`` makes 0600 beside it, owned and moded before it replaces ``dest``.
    (pyinfra's own upload stages files in /tmp, mode 644, when it runs commands with sudo.)"""
    temporary = '"$tmp"'
    return (
        f"umask 077 && tmp=$(mktemp {quote(dest + '.XXXXXX')}) && "
        f"{{ cat > {temporary} && chown {quote(f'{user}:{group}')} {temporary} && chmod {quote(mode)} {temporary} && "
        f"mv -f {temporary} {quote(dest)} || {{ rm -f {temporary}; exit 1; }}; }}"
    )


def write_secret(name: str, dest: str, content: str, user: str = "root", group: str = "root", mode: str = "600"):
    """An operation that streams ``content`` into ``dest`` over the command's standard input
    (``secret_write_command``): never on a command line, never staged in a readable file, never
    in pyinfra's output (only the operation's name and the file's path are shown)."""
    if not content.endswith("\n"):
        raise ValueError("a secret file's content ends with a newline (pyinfra adds one to standard input)")
    return server.shell(name=name, commands=[secret_write_command(dest, user, group, mode)], _stdin=content)


def directory(
    managed: dict, path: str, user: str = "root", group: str = "root", mode: str = "755", name: str | None = None
):
    """``files.directory`` of one of glmfleet's own directories (``layout.OWN_DIRS``), planned
    only where ``managed`` (the ``ManagedPaths`` fact) shows it missing or different: a converged
    host plans nothing, and pyinfra asks none of the operation's own facts (a round trip each,
    in lock-step across the fleet). Returns the operation, or None when there is nothing to do."""
    if path not in OWN_DIRS:
        raise ValueError(f"{path} is not one of glmfleet's own directories: use owned_directory")
    if managed["paths"].get(path) == {"type": "directory", "user": user, "group": group, "mode": mode, "sha256": None}:
        return None
    return files.directory(name=name or f"directory {path}", path=path, user=user, group=group, mode=mode)


# Every existing directory above ``$p``, links resolved, must be root's and writable by root
# alone, so nobody else can swap a component for a link between this check and the mkdir. Above
# the deepest one, a root-owned sticky directory (/tmp) is fine: others cannot rename what is in it.
SAFE_ANCESTORS = (
    'a=$(dirname -- "$p"); while [ ! -e "$a" ]; do a=$(dirname -- "$a"); done; '
    'a=$(realpath -e -- "$a") || exit 1; d=$a; while :; do s=$(stat -c "%u %a" -- "$d") || exit 1; m=0${s#* }; '
    'case "$s" in "0 "*) ;; *) printf "%s\\n" "$d (above $p) is not owned by root: glmfleet makes and changes '
    'nothing below a directory another user controls" >&2; exit 1;; esac; '
    'if [ $(( m & 022 )) -ne 0 ] && { [ "$d" = "$a" ] || [ $(( m & 01000 )) -eq 0 ]; }; then printf "%s\\n" '
    '"$d (above $p) is writable by users other than root: glmfleet makes and changes nothing below it" >&2; exit 1; fi; '
    '[ "$d" = / ] && break; d=$(dirname -- "$d"); done'
)


def owned_directory(managed: dict, path: str, key: str, user: str = "root", group: str = "root", mode: str = "755"):
    """A configured directory that glmfleet owns (``vllm_venv_root``, ``vllm_state_dir``,
    ``model_root``): made once, below directories only root can change, and recorded in
    ``layout.MADE_DIRS_RECORD``; a recorded one that drifted is put right. One that exists and
    that glmfleet did not make keeps its owner and mode: if they are not what glmfleet needs, the
    host stops with the fix. Returns the operation, or None when there is nothing to do.

    + key: the setting that names the directory, for the message
    """
    wanted = {"type": "directory", "user": user, "group": group, "mode": mode, "sha256": None}
    found = managed["paths"].get(path)
    if found == wanted:
        return None
    owner, p = quote(f"{user}:{group}"), quote(path)
    if found is None:
        return server.shell(
            name=f"make {path} ({key})",
            commands=[
                f'umask 022; p={p}; {SAFE_ANCESTORS}; mkdir -p -- "$p" {quote(STATE_ROOT)} && chown {owner} -- "$p" && '
                f'chmod {quote(mode)} -- "$p" && printf \'%s\\n\' "$p" >> {quote(MADE_DIRS_RECORD)}'
            ],
        )
    if path in managed.get("made", ()) and found["type"] == "directory":
        return server.shell(
            name=f"put {path} right ({key})",
            commands=[f'p={p}; {SAFE_ANCESTORS}; chown {owner} -- "$p" && chmod {quote(mode)} -- "$p"'],
        )
    kind = (
        found["type"]
        if found["type"] != "directory"
        else f"owned by {found['user']}:{found['group']} with mode {found['mode']}"
    )
    return stop_host(
        name=f"stop: {key} {path} exists and glmfleet did not make it",
        reason=(
            f"{key} = {path!r} exists ({kind}) and glmfleet did not make it, so it changes nothing there; glmfleet needs a "
            f"directory owned by {user}:{group} with mode {mode}: choose another path, or make it so yourself "
            f"(chown {user}:{group} {path}; chmod {mode} {path})"
        ),
    )


# Makes or repairs directories in the service user's home without following anything that user
# could have planted: each is opened relative to the home, O_NOFOLLOW; a link in its place is
# removed (the link, never its target) and a directory made. argv: home uid gid mode name...
SERVICE_DIRS_PROGRAM = """
import os, stat, sys
home, uid, gid, mode, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4], 8), sys.argv[5:]
base = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
for name in names:
    try:
        if not stat.S_ISDIR(os.stat(name, dir_fd=base, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=base)
    except FileNotFoundError:
        pass
    try:
        os.mkdir(name, 0o700, dir_fd=base)
    except FileExistsError:
        pass
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base)
    os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)
    os.close(fd)
"""


def service_user_dirs(managed: dict, home: str, names: list[str], user: str, mode: str = "750"):
    """Directories in the service user's home (``home``/NAME), made or put right where
    ``managed`` shows them missing or different, through ``SERVICE_DIRS_PROGRAM``: root
    follows no link the service user could plant there. Returns the operation or None."""
    wanted = {"type": "directory", "user": user, "group": user, "mode": mode, "sha256": None}
    due = [name for name in names if managed["paths"].get(f"{home}/{name}") != wanted]
    if not due:
        return None
    return server.shell(
        name=f"{user}'s directories in {home}: {', '.join(due)}",
        commands=[
            f'python3 -c {quote(SERVICE_DIRS_PROGRAM)} {quote(home)} "$(id -u {quote(user)})" "$(id -g {quote(user)})" '
            f"{join([mode, *due])}"
        ],
    )


def upload(
    managed: dict,
    dest: str,
    content: str | Path,
    user: str = "root",
    group: str = "root",
    mode: str = "644",
    name: str | None = None,
    secret: bool = False,
    atomic: bool = False,
):
    """``files.put`` of a local file (a Path) or of a text, planned like ``directory`` only
    where the remote file differs in content, owner or mode; with ``secret``, ``write_secret``,
    which never shows the content nor stages it readable; with ``atomic``, the same, so that the
    file is replaced in one rename (a program that watches it, as Prometheus its target files,
    never reads it half written). Returns the operation, or None when there is nothing to do."""
    data = content.read_bytes() if isinstance(content, Path) else content.encode()
    wanted = {"type": "file", "user": user, "group": group, "mode": mode, "sha256": hashlib.sha256(data).hexdigest()}
    if managed["paths"].get(dest) == wanted:
        return None
    name = name or f"file {dest}"
    if secret or atomic:
        return write_secret(name, dest, data.decode(), user=user, group=group, mode=mode)
    source = str(content) if isinstance(content, Path) else StringIO(content)
    return files.put(name=name, src=source, dest=dest, user=user, group=group, mode=mode)


def unit_enabled(managed: dict, unit: str, name: str | None = None, running: bool | None = None):
    """``systemd.service(enabled=True)`` (and started, with ``running``), planned only where the
    unit is not enabled (or not running) yet."""
    state = managed["units"].get(unit, {})
    if state.get("enabled") and (not running or state.get("running")):
        return None
    return systemd.service(name=name or f"{unit} enabled", service=unit, running=running or None, enabled=True)


def port_taken(listeners: list, port: int, key: str, unit: str) -> bool:
    """Stop the host, naming who holds it, where a service other than ``unit`` or a process
    outside any service holds ``port`` (set by ``key``; ``listeners``: the ListeningPorts answer)."""
    holders = port_holders(listeners, port, unit)
    if holders:
        stop_host(
            name=f"stop: {key} {port} is taken",
            reason=f"{key} = {port} is already in use by {' and '.join(holders)}: set {key} to a free port, or stop what holds it",
        )
    return bool(holders)


@dataclass(frozen=True)
class PackagedDaemon:
    """A daemon from the distribution's package whose unit runs ``binary $ARGS``, ARGS read from
    a Debian /etc/default file: Prometheus and its exporters on Debian and Ubuntu."""

    package: str
    binary: str
    unit: str
    defaults: str


def daemon_installed(managed: dict, daemon: PackagedDaemon, args: list[str], name: str) -> list:
    """The daemon's flags (``args``) written, then its package installed where missing: the
    flags go first, so that the package's own first start already listens where they say
    (apt keeps a configuration file that is there before its package). Planned only where
    ``managed`` (ManagedPaths of the binary and the defaults file) shows something to do;
    returns the operations planned, after which ``service_running`` (re)starts it."""
    flags = upload(managed, daemon.defaults, filesyntax.debian_defaults(args), name=f"{name} flags {daemon.defaults}")
    installed = None
    if daemon.binary not in managed["paths"]:
        installed = apt_install(name=f"{name}: {daemon.package}", packages={daemon.package: None})
    return planned(flags, installed)


def journal_tail(unit: str, lines: int) -> str:
    """The shell command that prints the last ``lines`` lines of ``unit``'s journal, for a
    failure's message."""
    return join(["journalctl", "--unit", unit, "--lines", str(lines), "--no-pager", "--quiet"])


def listening_check(unit: str, port: int, journal_lines: int, timeout_s: int = 300) -> str:
    """Wait until ``unit``'s own process listens on ``port`` (another host's or process's
    listener does not count); a unit that fails meanwhile, or never listens, fails the host with
    systemd's status and the journal's last lines."""
    listeners = ListeningPorts().command(port=port)
    journal = journal_tail(unit, journal_lines)
    quoted = quote(unit)
    return (
        f"for i in $(seq {timeout_s * 10}); do {listeners} | grep -qx {quote(f'{port} {unit}')} && exit 0; "
        f"systemctl is-failed --quiet {quoted} && break; sleep 0.1; done; "
        f"echo {quote(f'{unit} does not listen on port {port}:')} >&2; systemctl status --no-pager --lines 0 {quoted} >&2; "
        f"echo {quote(f'--- last lines of the {unit} journal:')} >&2; {journal} >&2; exit 1"
    )


def service_running(
    managed: dict, unit: str, changes: list, port: int, journal_lines: int, name: str, files: tuple[str, ...] = ()
):
    """The service enabled and (re)started where ``changes`` (its package, its flags) were
    planned, where it is not running or not enabled, or where it started before one of its
    ``files`` last changed; then waited for until it listens on ``port`` (``listening_check``).
    Returns the operation, or None where it runs what is on disk and nothing changes."""
    state = managed["units"].get(unit, {})
    started = state.get("started")
    stale = started is not None and any((managed["mtimes"].get(path) or 0) > started for path in files)
    if not changes and not stale and state.get("enabled") and state.get("running"):
        return None
    quoted = quote(unit)
    return server.shell(
        name=f"{name}: (re)start {unit}",
        commands=[
            f"systemctl enable --quiet {quoted} && systemctl reset-failed {quoted} 2>/dev/null; systemctl restart {quoted}; "
            + listening_check(unit, port, journal_lines)
        ],
    )


def planned(*ops) -> list:
    """The operations that were planned, leaving out the None of those with nothing to do."""
    return [op for op in ops if op is not None]


def render_apt_source(url: str, suite: str, components: list[str], keyring: str) -> str:
    """A deb822 source that trusts one keyring for this repository only (``signed-by``); a
    suite ending in ``/`` is a flat repository, which takes no components."""
    lines = ["# Managed by glmfleet.", "Types: deb", f"URIs: {url}", f"Suites: {suite}"]
    if components:
        lines.append(f"Components: {' '.join(components)}")
    lines.append(f"Signed-By: {keyring}")
    return "\n".join(lines) + "\n"


def fetch_command(url: str, dest: str, sha256: str | None = None) -> str:
    """Download ``url`` next to ``dest``, check its sha256 when pinned, then move it in (mode
    644): a file that fails the check never takes the place. Credentials of the URL come from
    the root-only netrc (``layout.NETRC``, curl's ``--netrc-file``), never from the command line."""
    partial = quote(f"{dest}.partial")
    quoted_url = quote(without_credentials(url))
    if url_credentials(url):
        download = f"curl -fsSL --netrc-file {quote(NETRC)} -o {partial} {quoted_url}"
    else:
        download = (
            f"{{ if command -v curl >/dev/null; then curl -fsSL -o {partial} {quoted_url}; "
            f"else wget -q -O {partial} {quoted_url}; fi; }}"
        )
    steps = [download]
    if sha256:
        steps.append(
            f"{{ echo {quote(f'{sha256}  {dest}.partial')} | sha256sum --check --status || "
            f"{{ found=$(sha256sum < {partial} | cut -d' ' -f1); rm -f {partial}; "
            f"printf '%s has sha256 %s, pinned %s\\n' {quote(redact(url))} \"$found\" {quote(sha256)} >&2; exit 1; }}; }}"
        )
    steps.append(f"chmod 644 {partial} && mv -f {partial} {quote(dest)}")
    return " && ".join(steps)


def fetch_key_command(key_url: str, keyring: str, key_sha256: str | None) -> str:
    """A repository key fetched into its keyring (``fetch_command``): a key that fails its pin never reaches apt."""
    return f"mkdir -p {quote(KEYRINGS_DIR)} && " + fetch_command(key_url, keyring, key_sha256)


def apt_repository_question(repo: str) -> list[str]:
    """The paths ``repository_due`` reads (in a role's ManagedPaths question)."""
    return [apt_keyring(repo), apt_source(repo)]


def repository_due(
    managed: dict, repo: str, url: str, suite: str, components: list[str], key_sha256: str | None
) -> bool:
    """Whether ``apt_repository`` has anything to do: its key missing (or not the pinned one),
    its source file missing or different."""
    key = managed["paths"].get(apt_keyring(repo))
    source = managed["paths"].get(apt_source(repo), {}).get("sha256")
    rendered = render_apt_source(without_credentials(url), suite, components, apt_keyring(repo))
    return (
        key is None
        or bool(key_sha256 and key["sha256"] != key_sha256)
        or source != hashlib.sha256(rendered.encode()).hexdigest()
    )


@operation()
def apt_repository(repo: str, url: str, suite: str, components: list[str], key_url: str, key_sha256: str | None = None):
    """
    Add an apt repository whose key signs it alone: the key goes to
    ``/etc/apt/keyrings/glmfleet-REPO.asc`` and the source names it in ``Signed-By``
    (never ``apt-key``, never a key trusted for every repository).

    + repo: short name of the repository (file names derive from it)
    + url: the repository's base URL (a mirror's, on mirror-only sites)
    + suite: the distribution, e.g. ``bookworm``, or a path ending in ``/`` for a flat repository
    + components: e.g. ``["stable"]``; empty for a flat repository
    + key_url: where the host downloads the ASCII-armored key from
    + key_sha256: the key's sha256; when given, a key that differs is refused and re-fetched

    The key is fetched when missing or, if pinned, when it differs from the pin.
    """
    keyring = apt_keyring(repo)
    present = host.get_fact(Sha256File, path=keyring)
    if present is None or (key_sha256 and present != key_sha256):
        yield fetch_key_command(key_url, keyring, key_sha256)
    yield from files.put._inner(
        src=StringIO(render_apt_source(without_credentials(url), suite, components, keyring)),
        dest=apt_source(repo),
        user="root",
        group="root",
        mode="644",
    )


def version_matches(version: str, pattern: str | None) -> bool:
    """apt's ``package=PATTERN`` match: a glob over the whole version string."""
    return pattern is None or fnmatchcase(version, pattern)


def packages_due(installed: dict, packages: dict[str, str | None]) -> list[str]:
    """The packages ``apt_install`` would install: missing, or at another version (``installed``:
    the ``DebPackageStates`` answer). A role calls ``apt_install`` only where any are."""
    return [
        name
        for name, pattern in packages.items()
        if name not in installed or not version_matches(installed[name]["version"], pattern)
    ]


def unheld(installed: dict, patterns: list[str]) -> list[str]:
    """Installed packages that match ``patterns`` and are not held (``apt_hold`` would hold them)."""
    return [
        name
        for name, state in installed.items()
        if not state["held"] and any(fnmatchcase(name, pattern) for pattern in patterns)
    ]


@operation()
def apt_install(packages: dict[str, str | None]):
    """
    Install packages at the versions wanted, refreshing the package lists first, only when one
    of them is missing or at another version.

    + packages: package name to an apt version glob (``"535.*"``, ``"1.17.8-1"``) or None for any

    Packages held with ``apt-mark hold`` are changed too: glmfleet holds what it pins, and this
    is how a pin moves. A glob no version matches fails with apt's own message.
    """
    if not packages_due(host.get_fact(DebPackageStates), packages):
        host.noop(f"{', '.join(packages)} installed at the wanted versions")
        return
    wanted = [name if pattern is None else f"{name}={pattern}" for name, pattern in packages.items()]
    yield (
        f"{APT_GET} update && {APT_GET} install --no-install-recommends --allow-downgrades "
        f"--allow-change-held-packages {join(wanted)}"
    )


@operation()
def apt_hold(patterns: list[str], pending: bool = False):
    """
    Hold every installed package whose name matches one of the globs, so that neither
    ``apt upgrade`` nor unattended-upgrades moves it.

    + patterns: package name globs, as ``dpkg-query -W`` takes them
    + pending: packages are being installed in this run, so the list seen while planning is
      not the final one: hold whatever matches once they are in
    """
    if not unheld(host.get_fact(DebPackageStates), patterns) and not pending:
        host.noop(f"packages matching {' '.join(patterns)} are held")
        return
    yield (
        f"dpkg-query -W -f='${{db:Status-Abbrev}} ${{Package}}\\n' {join(patterns)} 2>/dev/null "
        "| awk '$1 ~ /^.i/ {print $2}' | xargs -r apt-mark hold"
    )


@operation(is_idempotent=False)
def stop_host(reason: str):
    """
    Fail this host here with a message that says why and how to fix it; the other hosts go on.

    + reason: the message, shown as the operation's error output
    """
    yield fail_with(reason)


def _run_live(state, host, command: str, connector_arguments: dict) -> bool:
    status, _ = host.run_shell_command(
        StringCommand(command), print_output=True, print_input=False, **connector_arguments
    )
    return status


@operation(is_idempotent=False)
def live_steps(steps: list):
    """
    Run steps and show their output as it comes, whatever pyinfra's verbosity.

    + steps: in order, the first failure fails the operation; each either a shell command for
      the host (str) or ``(function, *args)``, run on the control node as
      ``function(state, host, *args)`` and returning False on failure

    For long transfers (model weights): the person running the deploy sees progress lines
    (bytes, rate, ETA) instead of ten minutes of silence. Output goes to stderr, so ``--json``
    stays clean. Gate it with a fact, as ``server.shell``: it reports a change whenever it runs.
    """
    arguments = host.current_op_global_arguments or {}
    connector_arguments = {key: arguments[key] for key in CONNECTOR_ARGUMENT_KEYS if key in arguments}
    for step in steps:
        if isinstance(step, str):
            yield FunctionCommand(_run_live, (step, connector_arguments), {})
        else:
            yield FunctionCommand(step[0], step[1:], {})
