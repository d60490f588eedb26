"""`glmfleet logs` below the fleet: the command each host runs, what --since and -n accept, how
pieces of lines become prefixed lines, and a host that cannot be reached (a loopback port with
nothing listening). The fleet tests read real journals."""

from __future__ import annotations

import io
import shlex
import socket
import subprocess
import threading

import pytest

from glmfleet_cli.logs import PrefixedLines, connection, fleet_logs, journal_command
from glmfleet_cli.runner import UsageError


def test_the_journal_command_is_literal_words():
    command = journal_command({}, lines=20, since="2026-12-07 10:00", follow=True)
    assert shlex.split(command) == [
        "env",
        "SYSTEMD_COLORS=0",
        "journalctl",
        "--unit",
        "vllm.service",
        "--no-pager",
        "--quiet",
        "--output",
        "short-iso",
        "--lines",
        "20",
        "--since",
        "2026-12-07 10:00",
        "--follow",
    ]


def test_with_sudo_the_journal_is_read_as_root_without_a_prompt():
    assert shlex.split(journal_command({"_sudo": True}, None, None, False))[:6] == [
        "sudo",
        "-n",
        "-u",
        "root",
        "--",
        "env",
    ]
    assert shlex.split(journal_command({"_sudo": True, "_sudo_user": "adm"}, None, None, False))[3] == "adm"


@pytest.mark.parametrize(
    "since",
    ["2026-12-07", "2026-12-07 10:00", "2026-12-07T10:00:30", "10:00", "today", "yesterday", "now"]
    + ["-1h", "+5min", "-1h 30min", "30 min ago", "2 days ago", "@1765100000"],
)
def test_since_takes_what_journalctl_reads(since):
    assert shlex.split(journal_command({}, None, since, False))[-2:] == ["--since", since]


@pytest.mark.parametrize("since", ["", "last tuesday", "1h; reboot", "$(id)", "10:00\n", "-1 fortnight", "--all"])
def test_since_refuses_anything_else_before_any_host(since):
    with pytest.raises(UsageError, match="is not a time journalctl reads; accepted: a journalctl time"):
        journal_command({}, None, since, False)


def test_a_negative_line_count_is_refused():
    with pytest.raises(UsageError, match="-n -1 is negative"):
        journal_command({}, -1, None, False)


def test_pieces_of_lines_become_whole_prefixed_lines():
    out = io.StringIO()
    lines = PrefixedLines("h1 | ", out, threading.Lock())
    for piece in ("first li", "ne\r\nsecond\r", "\nthi", "rd"):
        lines.write(piece)
    assert out.getvalue() == "h1 | first line\nh1 | second\n"
    lines.close()
    assert out.getvalue().endswith("h1 | third\n")


def test_fabric_is_told_to_refuse_unknown_host_keys(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host_key")], check=True)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("[127.0.0.1]:2201 " + (tmp_path / "host_key.pub").read_text())
    fabric = connection("h1", {"ssh_hostname": "127.0.0.1", "ssh_port": 2201, "ssh_known_hosts_file": str(known_hosts)})
    assert type(fabric.client._policy).__name__ == "RejectPolicy"
    assert fabric.client.get_host_keys().lookup("[127.0.0.1]:2201") is not None
    assert (fabric.host, fabric.port) == ("127.0.0.1", 2201)


def test_a_host_that_cannot_be_reached_is_named_and_the_run_fails(tmp_path):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inventory = tmp_path / "inventory.py"
    inventory.write_text(f"hosts = [('lost-01', {{'ssh_hostname': '127.0.0.1', 'ssh_port': {port}}})]\n")
    out, err = io.StringIO(), io.StringIO()
    assert fleet_logs(str(inventory), {}, out=out, err=err) == 1
    assert out.getvalue() == ""
    assert err.getvalue().startswith("glmfleet logs: lost-01: ") and str(port) in err.getvalue()
