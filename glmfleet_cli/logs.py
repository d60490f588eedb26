"""`glmfleet logs INVENTORY`: the vLLM unit's journal from every host at once, each line
prefixed with its host; `-f` follows until Ctrl-C.

Built on fabric: a Connection per host with the inventory's connection settings (address, port,
user, key, ssh config, sudo), opened side by side. fabric accepts any host key unless told
otherwise: the key is checked against the known_hosts file the inventory names (else
~/.ssh/known_hosts) and an unknown or changed one is refused. A host that cannot be reached is
named and the others go on. journalctl runs on a pty, so that closing the session (Ctrl-C) ends
it on the host; the output is read from the channel as it comes, never kept.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from fabric import Config, Connection
from paramiko import RejectPolicy

from glmfleet import shell
from glmfleet.layout import UNIT
from glmfleet_cli.runner import UsageError, load_inventory, select

CONNECT_TIMEOUT_S = 10
# A wide pty: journalctl fits its lines to the terminal it writes to.
PTY_COLUMNS = 4096

# journalctl's --since, as systemd.time(7) writes times: a date and time, a time, a word, seconds
# since the epoch, or a span before (or after) now.
_SPAN = r"\d+ ?(?:us|ms|s|sec|seconds?|m|min|minutes?|h|hr|hours?|d|days?|w|weeks?|M|months?|y|years?)"
SINCE = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2})?)?"
    r"|\d{2}:\d{2}(?::\d{2})?"
    r"|now|today|yesterday"
    r"|@\d+"
    rf"|[-+]?{_SPAN}(?: {_SPAN})*"
    rf"|{_SPAN}(?: {_SPAN})* ago"
)
SINCE_ACCEPTED = (
    "a journalctl time: '2026-12-07 10:00', '10:00', 'today', 'yesterday', '-1h', '30 min ago', '@1765100000'"
)


def journal_command(host_data: Any, lines: int | None, since: str | None, follow: bool) -> str:
    """The command that prints the vLLM unit's journal on a host (root's, through sudo where the
    inventory says so); every value through the one quoting helper."""
    if since is not None and not SINCE.fullmatch(since):
        raise UsageError(f"--since {since!r} is not a time journalctl reads; accepted: {SINCE_ACCEPTED}")
    if lines is not None and lines < 0:
        raise UsageError(f"-n {lines} is negative; accepted: a number of lines, 0 or more")
    argv = ["journalctl", "--unit", UNIT, "--no-pager", "--quiet", "--output", "short-iso"]
    argv += ["--lines", lines] if lines is not None else []
    argv += ["--since", since] if since is not None else []
    argv += ["--follow"] if follow else []
    # On a pty journalctl would colour its lines.
    argv = ["env", "SYSTEMD_COLORS=0", *argv]
    if host_data.get("_sudo"):
        # -n: a password prompt would wait for ever; glmfleet hands sudo no password (README: Security).
        argv = ["sudo", "-n", "-u", host_data.get("_sudo_user") or "root", "--", *argv]
    return shell.join(argv)


def connection(name: str, host_data: Any) -> Connection:
    """A fabric Connection as pyinfra's SSH connector makes one from the same host data, whose
    host key must be known."""
    options = {
        "key_filename": host_data.get("ssh_key") and os.path.expanduser(host_data.get("ssh_key")),
        "passphrase": host_data.get("ssh_key_password"),
        "password": host_data.get("ssh_password"),
        "allow_agent": host_data.get("ssh_allow_agent"),
        "look_for_keys": host_data.get("ssh_look_for_keys"),
    }
    config_file = host_data.get("ssh_config_file")
    connection = Connection(
        host_data.get("ssh_hostname") or name,
        user=host_data.get("ssh_user"),
        port=host_data.get("ssh_port"),
        connect_timeout=CONNECT_TIMEOUT_S,
        connect_kwargs={key: value for key, value in options.items() if value is not None},
        config=Config(runtime_ssh_path=os.path.expanduser(config_file)) if config_file else None,
    )
    known_hosts = os.path.expanduser(host_data.get("ssh_known_hosts_file") or "~/.ssh/known_hosts")
    if os.path.isfile(known_hosts):
        connection.client.get_host_keys().load(known_hosts)  # read only: with RejectPolicy nothing is added
    connection.client.set_missing_host_key_policy(RejectPolicy())
    return connection


class PrefixedLines:
    """Whole lines, each prefixed with its host, written under one lock shared by every host;
    the channel hands over pieces of lines, and a pty ends lines with \\r\\n."""

    def __init__(self, prefix: str, out: TextIO, lock: threading.Lock):
        self.prefix, self.out, self.lock, self.partial = prefix, out, lock, ""

    def write(self, text: str) -> None:
        *lines, self.partial = (self.partial + text).replace("\r\n", "\n").split("\n")
        if lines:
            with self.lock:
                self.out.write("".join(f"{self.prefix}{line}\n" for line in lines))
                self.out.flush()

    def close(self) -> None:
        if self.partial:
            self.write("\n")


class HostJournal:
    """One host's journal, streamed by a thread of its own."""

    def __init__(self, name: str, connection: Connection, command: str, out: PrefixedLines):
        self.name, self.connection, self.command, self.out = name, connection, command, out
        self.channel = None
        self.stopped = False
        self.error: str | None = None
        self.exit_status: int | None = None
        self.thread = threading.Thread(target=self._run, name=f"logs {name}", daemon=True)

    def _run(self) -> None:
        try:
            self.connection.open()
        except Exception as error:  # whatever it is, it is this host's alone: named, the others go on
            self.error = "stopped while connecting" if self.stopped else f"unreachable: {_reason(error)}"
            return
        try:
            self.channel = self.connection.create_session()
            self.channel.get_pty(term="dumb", width=PTY_COLUMNS)
            self.channel.exec_command(self.command)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            while data := self.channel.recv(32768):
                self.out.write(decoder.decode(data))
            self.out.close()
            status = self.channel.recv_exit_status()  # -1: closed without one (Ctrl-C)
            self.exit_status = None if status == -1 else status
        except Exception as error:  # the connection was lost
            self.error = f"lost: {_reason(error)}"

    def stop(self) -> None:
        self.stopped = True
        if self.channel is not None:
            self.channel.close()  # the pty's hangup ends journalctl on the host

    def close(self) -> None:
        self.connection.close()


def _reason(error: Exception) -> str:
    text = str(error).removeprefix("[Errno None] ") or type(error).__name__
    if "known_hosts" in text or type(error).__name__ == "BadHostKeyException":
        return f"{text} (glmfleet logs accepts only a known host key: the inventory's known_hosts file, else ~/.ssh/known_hosts)"
    return text


def fleet_logs(
    inventory_path: str,
    data: dict,
    limit: list[str] | None = None,
    lines: int | None = None,
    since: str | None = None,
    follow: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Stream the journals; returns 1 when a host could not be read, else 0 (also after Ctrl-C)."""
    inventory = load_inventory(inventory_path, data)
    names = select(inventory, limit or [])
    if not names:
        raise UsageError(f"{inventory_path} lists no host")
    commands = {name: journal_command(inventory.get_host(name).data, lines, since, follow) for name in names}
    width = max(map(len, names))
    lock = threading.Lock()
    journals = [
        HostJournal(
            name,
            connection(name, inventory.get_host(name).data),
            commands[name],
            PrefixedLines(f"{name.ljust(width)} | ", out, lock),
        )
        for name in names
    ]
    stopping = threading.Event()
    # Held through the clean-up too: a second Ctrl-C must not cut it short.
    with _on_signals((signal.SIGINT, signal.SIGTERM), stopping.set):
        for journal in journals:
            journal.thread.start()
        while not stopping.is_set() and any(journal.thread.is_alive() for journal in journals):
            stopping.wait(0.2)
        for journal in journals:
            journal.stop()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        for journal in journals:
            journal.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for journal in journals:
            journal.close()
    failed = 0
    for journal in journals:
        why = journal.error or (
            f"journalctl exited with {journal.exit_status}" if journal.exit_status not in (None, 0) else None
        )
        if why is None and journal.thread.is_alive():
            why = "did not answer"
        if why:
            failed += 1
            with lock:
                print(f"glmfleet logs: {journal.name}: {why}", file=err, flush=True)
    return 1 if failed else 0


@contextlib.contextmanager
def _on_signals(signals: tuple, action: Callable[[], None]):
    """``action`` instead of the default on these signals, within the block (Ctrl-C: stop
    reading, end every host's journalctl, then return)."""
    previous = {number: signal.signal(number, lambda *_: action()) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
