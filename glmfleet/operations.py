"""glmfleet's own pyinfra operations, for what pyinfra's built-in ones cannot do safely."""

from __future__ import annotations

import hashlib
import shlex
from fnmatch import fnmatchcase
from io import BytesIO, StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand, operation
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.facts.files import File, Sha256File
from pyinfra.operations import files, systemd

from glmfleet.facts import DebPackageStates

KEYRINGS_DIR = "/etc/apt/keyrings"
# Every apt-get call waits for a dpkg lock held by another apt (cloud-init, unattended-upgrades)
# instead of failing at once, and never asks a question.
APT_GET = (
    "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 "
    "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
)


@operation()
def secret_file(dest: str, content: str, mode: str = "600", user: str = "root", group: str = "root"):
    """
    Upload a file that holds secrets, never showing its content.

    + dest: remote path; its directory must already exist and be closed to other users
      (connected as root, the upload writes there directly, before the mode is set)
    + content: the file's text
    + mode, user, group: ownership and permissions

    Unlike ``files.put``, nothing of the content reaches pyinfra's output, not even with
    ``--diff``; the change is detected from the sha256 alone.
    """
    data = content.encode()
    remote = host.get_fact(File, path=dest)
    if remote is None or host.get_fact(Sha256File, path=dest) != hashlib.sha256(data).hexdigest():
        yield FileUploadCommand(BytesIO(data), dest)
        remote = None
    if remote is None or (remote.get("user"), remote.get("group")) != (user, group):
        yield StringCommand("chown", f"{user}:{group}", dest)
    if remote is None or remote.get("mode") != int(mode):
        yield StringCommand("chmod", mode, dest)


def directory(managed: dict, path: str, user: str = "root", group: str = "root", mode: str = "755",
              name: str | None = None):
    """``files.directory``, planned only where ``managed`` (the ``ManagedPaths`` fact) shows the
    directory missing or different: a converged host plans nothing, and pyinfra asks none of the
    operation's own facts (a round trip each, in lock-step across the fleet). Returns the
    operation, or None when there is nothing to do."""
    if managed["paths"].get(path) == {"type": "directory", "user": user, "group": group, "mode": mode, "sha256": None}:
        return None
    return files.directory(name=name or f"directory {path}", path=path, user=user, group=group, mode=mode)


def upload(managed: dict, dest: str, content: str | Path, user: str = "root", group: str = "root",
           mode: str = "644", name: str | None = None, secret: bool = False):
    """``files.put`` of a local file (a Path) or of a text, planned like ``directory`` only
    where the remote file differs in content, owner or mode; with ``secret``, ``secret_file``,
    which never shows the content. Returns the operation, or None when there is nothing to do."""
    data = content.read_bytes() if isinstance(content, Path) else content.encode()
    wanted = {"type": "file", "user": user, "group": group, "mode": mode, "sha256": hashlib.sha256(data).hexdigest()}
    if managed["paths"].get(dest) == wanted:
        return None
    name = name or f"file {dest}"
    if secret:
        return secret_file(name=name, dest=dest, content=data.decode(), user=user, group=group, mode=mode)
    source = str(content) if isinstance(content, Path) else StringIO(content)
    return files.put(name=name, src=source, dest=dest, user=user, group=group, mode=mode)


def unit_enabled(managed: dict, unit: str, name: str | None = None):
    """``systemd.service(enabled=True)``, planned only where the unit is not enabled yet."""
    if managed["units"].get(unit, {}).get("enabled"):
        return None
    return systemd.service(name=name or f"{unit} enabled", service=unit, running=None, enabled=True)


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


def fetch_key_command(key_url: str, keyring: str, key_sha256: str | None) -> str:
    """Download a repository key next to its place, check its sha256 when pinned, then move it
    in: a key that fails the check never reaches apt."""
    partial = f"{keyring}.partial"
    steps = [
        f"mkdir -p {KEYRINGS_DIR}",
        f"{{ if command -v curl >/dev/null; then curl -fsSL -o {partial} {shlex.quote(key_url)}; "
        f"else wget -q -O {partial} {shlex.quote(key_url)}; fi; }}",
    ]
    if key_sha256:
        steps.append(
            f"{{ echo '{key_sha256}  {partial}' | sha256sum --check --status || "
            f"{{ echo \"{key_url} has sha256 $(sha256sum < {partial} | cut -d' ' -f1), pinned {key_sha256}\" >&2; "
            f"rm -f {partial}; exit 1; }}; }}"
        )
    steps.append(f"chmod 644 {partial} && mv -f {partial} {keyring}")
    return " && ".join(steps)


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
    keyring = f"{KEYRINGS_DIR}/glmfleet-{repo}.asc"
    present = host.get_fact(Sha256File, path=keyring)
    if present is None or (key_sha256 and present != key_sha256):
        yield fetch_key_command(key_url, keyring, key_sha256)
    yield from files.put._inner(
        src=StringIO(render_apt_source(url, suite, components, keyring)),
        dest=f"/etc/apt/sources.list.d/glmfleet-{repo}.sources",
        user="root",
        group="root",
        mode="644",
    )


def version_matches(version: str, pattern: str | None) -> bool:
    """apt's ``package=PATTERN`` match: a glob over the whole version string."""
    return pattern is None or fnmatchcase(version, pattern)


@operation()
def apt_install(packages: dict[str, str | None]):
    """
    Install packages at the versions wanted, refreshing the package lists first, only when one
    of them is missing or at another version.

    + packages: package name to an apt version glob (``"535.*"``, ``"1.17.8-1"``) or None for any

    Packages held with ``apt-mark hold`` are changed too: glmfleet holds what it pins, and this
    is how a pin moves. A glob no version matches fails with apt's own message.
    """
    installed = host.get_fact(DebPackageStates)
    due = [
        name for name, pattern in packages.items()
        if name not in installed or not version_matches(installed[name]["version"], pattern)
    ]
    if not due:
        host.noop(f"{', '.join(packages)} installed at the wanted versions")
        return
    wanted = [name if pattern is None else f"{name}={pattern}" for name, pattern in packages.items()]
    yield (
        f"{APT_GET} update && {APT_GET} install --no-install-recommends --allow-downgrades "
        f"--allow-change-held-packages {shlex.join(wanted)}"
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
    installed = host.get_fact(DebPackageStates)
    unheld = [
        name for name, state in installed.items()
        if not state["held"] and any(fnmatchcase(name, pattern) for pattern in patterns)
    ]
    if not unheld and not pending:
        host.noop(f"packages matching {' '.join(patterns)} are held")
        return
    yield (
        f"dpkg-query -W -f='${{db:Status-Abbrev}} ${{Package}}\\n' {shlex.join(patterns)} 2>/dev/null "
        "| awk '$1 ~ /^.i/ {print $2}' | xargs -r apt-mark hold"
    )


@operation(is_idempotent=False)
def stop_host(reason: str):
    """
    Fail this host here with a message that says why and how to fix it; the other hosts go on.

    + reason: the message, shown as the operation's error output
    """
    yield f"printf '%s\\n' {shlex.quote(reason)} >&2; exit 1"


@operation()
def notice(message: str):
    """
    Report something about this host in the run's output without changing anything.

    + message: what to report (also the operation's name, so it shows in ``--json`` output)
    """
    host.noop(message)
    return
    yield  # a generator that yields nothing: no commands, no change


def _run_live(state, host, command: str, connector_arguments: dict) -> bool:
    status, _ = host.run_shell_command(StringCommand(command), print_output=True, print_input=False, **connector_arguments)
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
