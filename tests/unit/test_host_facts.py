"""How glmfleet reads hosts cheaply: a fact asked once per host and run, every role's facts asked
in one command, and one fact that tells a role whether its files, units and users are already
right (run here for real, with sh, and through pyinfra's @local connector)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import gevent
import pytest
from pyinfra.api import Config, FactBase, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.exceptions import PyinfraError

from glmfleet.facts.engine import Question, ask, ask_together
from glmfleet.facts.paths import ManagedPaths
from glmfleet.facts.vllm import VllmVenvs
from glmfleet.layout import COMPLETE_MARKER


class CountedEcho(FactBase):
    """`echo WORD`; counts how often a host really answered."""

    answered = 0

    def command(self, word: str) -> str:
        return f"echo {word}"

    def process(self, output):
        CountedEcho.answered += 1
        return output


def fake_host(word: str):
    inventory = Inventory(
        ([("@fake/host-1", {"fake_responses": {"echo": [word]}, "fake_delay": 0, "fake_delay_jitter": 0})], {})
    )
    state = State(inventory, Config())
    connect_all(state)
    return inventory.get_host("@fake/host-1")


def test_a_fact_is_asked_once_per_host_and_run():
    CountedEcho.answered = 0
    host = fake_host("first")
    assert ask(host, CountedEcho, word="a") == ["first"]
    assert ask(host, CountedEcho, word="a") == ["first"]
    assert CountedEcho.answered == 1
    ask(host, CountedEcho, word="b")  # other arguments, another question
    assert CountedEcho.answered == 2
    # A new run (a rollout makes several) asks again: the host may have changed since.
    assert ask(fake_host("second"), CountedEcho, word="a") == ["second"]
    assert CountedEcho.answered == 3


class Counted(FactBase):
    """Runs ``command`` and counts the commands the host ran, through pyinfra's own connector."""

    requires_command = None

    def command(self, command: str, requires: str | None = None) -> str:
        return command

    def process(self, output):
        return output


def local_host():
    inventory = Inventory(([("@local", {})], {}))
    state = State(inventory, Config())
    connect_all(state)
    host = inventory.get_host("@local")
    host.commands_run = []
    run = host.run_shell_command

    def counting(command, **kwargs):
        host.commands_run.append(str(command))
        return run(command, **kwargs)

    host.run_shell_command = counting
    return host


class NeedsTool(Counted):
    def requires_command(self, command: str, requires: str | None = None) -> str | None:
        return requires


def test_facts_asked_together_are_one_command_and_answer_as_each_alone(tmp_path):
    (tmp_path / "unit").write_text("[Unit]\n")
    host = local_host()
    questions = {
        "paths": Question(ManagedPaths, {"paths": [str(tmp_path / "unit"), str(tmp_path)]}),
        "lines": Question(Counted, {"command": "echo one; echo; echo two"}),
        "no_newline": Question(Counted, {"command": "printf last"}),  # the next part still starts on its own
        "exits": Question(Counted, {"command": "echo ok; exit 0"}),  # ends its part only
        "comment": Question(Counted, {"command": "echo b # a comment to the end of the line"}),
        "empty": Question(Counted, {"command": "true"}),
    }
    answers = ask_together(host, questions)
    assert len(host.commands_run) == 1
    assert answers["lines"] == ["one", "", "two"] and answers["no_newline"] == ["last"] and answers["exits"] == ["ok"]
    assert answers["comment"] == ["b"]
    assert answers["empty"] is None  # the fact's default, as pyinfra gives for no output
    alone = local_host()
    assert answers["paths"] == ask(alone, ManagedPaths, paths=[str(tmp_path / "unit"), str(tmp_path)])
    assert answers["paths"]["paths"][str(tmp_path / "unit")]["sha256"] == hashlib.sha256(b"[Unit]\n").hexdigest()
    # Asked again in the same run: nothing runs.
    assert ask_together(host, questions) == answers and len(host.commands_run) == 1


def test_roles_managed_paths_are_one_part_and_each_role_gets_its_own_answer(tmp_path):
    """Every role asks ManagedPaths about its own paths, units and users: asked together, they
    are one find and one sha256sum on the host, and each role's answer is what it would get alone."""
    (tmp_path / "unit").write_text("[Unit]\n")
    host = local_host()
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    questions = {
        "service": Question(
            ManagedPaths, {"paths": [str(tmp_path / "unit"), str(tmp_path / "absent")], "users": [user]}
        ),
        "state": Question(ManagedPaths, {"paths": [str(tmp_path), str(tmp_path / "unit")]}),
    }
    answers = ask_together(host, questions)
    assert len(host.commands_run) == 1 and host.commands_run[0].count("sha256sum") == 1
    for name, question in questions.items():
        assert answers[name] == ask(local_host(), ManagedPaths, **question.kwargs)
    assert set(answers["service"]["paths"]) == {str(tmp_path / "unit")} and set(answers["service"]["users"]) == {user}
    assert set(answers["state"]["paths"]) == {str(tmp_path), str(tmp_path / "unit")} and answers["state"]["users"] == {}


def test_a_question_already_under_way_is_waited_for_not_asked_again():
    """pyinfra plans hosts side by side in greenlets, and one host's plan may read another's
    facts (the peer fan-out reads every host's weights) while that host's own batch is still
    under way: it waits for that answer, and the host runs one command."""
    host = local_host()
    slow = {"command": "sleep 0.3; echo answer"}
    together = gevent.spawn(ask_together, host, {"slow": Question(Counted, slow)})
    gevent.sleep(0)  # the batch starts and waits on the host
    alone = gevent.spawn(ask, host, Counted, **slow)
    gevent.joinall([together, alone], raise_error=True)
    assert together.value == {"slow": ["answer"]} and alone.value == ["answer"]
    assert len(host.commands_run) == 1


def test_a_fact_that_fails_together_is_asked_alone_for_pyinfra_to_report():
    host = local_host()
    questions = {
        "fine": Question(Counted, {"command": "echo fine"}),
        "fails": Question(Counted, {"command": "echo partial; exit 3"}),
    }
    with pytest.raises(PyinfraError):  # pyinfra fails the host, as for any fact whose command fails
        ask_together(host, questions)
    assert len(host.commands_run) == 2 and host.commands_run[1].endswith("exit 3")
    assert ask(host, Counted, command="echo fine") == ["fine"] and len(host.commands_run) == 2  # answered together
    host = local_host()
    missing = Question(NeedsTool, {"command": "echo never", "requires": "no-such-tool-here"})
    # Together the part fails (127); alone, pyinfra answers the fact's default while planning.
    assert ask_together(host, {"missing": missing}) == {"missing": None}
    assert len(host.commands_run) == 2 and "##PYINFRA_NOCMD##" in host.commands_run[1]


def run_fact(fact: FactBase, **kwargs) -> dict:
    output = subprocess.run(["sh", "-c", fact.command(**kwargs)], capture_output=True, text=True, check=True).stdout
    return fact.process(output.splitlines())


def test_managed_paths_reads_type_owner_mode_and_content_of_real_paths(tmp_path):
    text = tmp_path / "vllm.env"
    text.write_text("KEY=1\n")
    text.chmod(0o600)
    empty = tmp_path / "empty"
    empty.touch()
    link = tmp_path / "current"
    link.symlink_to(text)
    found = run_fact(
        ManagedPaths(),
        paths=[str(tmp_path), str(text), str(empty), str(link), str(tmp_path / "absent")],
        users=["root", "no-such-user-here"],
    )
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True, check=True).stdout.strip()
    assert found["paths"] == {
        str(tmp_path): {
            "type": "directory",
            "user": user,
            "group": group,
            "mode": format(os.stat(tmp_path).st_mode & 0o7777, "o"),
            "sha256": None,
        },
        str(text): {
            "type": "file",
            "user": user,
            "group": group,
            "mode": "600",
            "sha256": hashlib.sha256(b"KEY=1\n").hexdigest(),
        },
        str(empty): {
            "type": "file",
            "user": user,
            "group": group,
            "mode": format(os.stat(empty).st_mode & 0o777, "o"),
            "sha256": hashlib.sha256(b"").hexdigest(),
        },
        # A link is reported as a link, never as what it points to: it is not the file wanted there.
        str(link): {"type": "symbolic link", "user": user, "group": group, "mode": "777", "sha256": None},
    }
    root_home, root_shell = (
        subprocess.run(["getent", "passwd", "root"], capture_output=True, text=True, check=True)
        .stdout.strip()
        .split(":")[5:7]
    )
    assert found["users"] == {"root": {"group": "root", "home": root_home, "shell": root_shell}}


def whole_venv(venv: Path, record: str | None) -> None:
    """A venv's files the fact checks, and its completion marker (None: none; "": an older glmfleet's empty one)."""
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "vllm").touch(mode=0o755)
    (venv / "lib" / "vllm-0.22.0.dist-info").mkdir(parents=True)
    if record is not None:
        (venv / COMPLETE_MARKER).write_text(record)


def test_venvs_links_and_complete_venvs_are_read_from_a_real_root(tmp_path):
    whole_venv(tmp_path / "venvs" / "vllm-0.22.0-ab12", "bin/python\nbin/vllm\nlib/vllm-0.22.0.dist-info\n")
    whole_venv(tmp_path / "venvs" / "vllm-0.21.0-cd34", "")
    whole_venv(tmp_path / "venvs" / "vllm-0.20.0-half", None)
    (tmp_path / "current").symlink_to("venvs/vllm-0.22.0-ab12")
    uv = tmp_path / "uv"
    uv.touch(mode=0o755)
    found = run_fact(VllmVenvs(), root=str(tmp_path), uv=str(uv))
    assert found == {
        "uv": True,
        "current": "vllm-0.22.0-ab12",
        "previous": None,
        "complete": ["vllm-0.21.0-cd34", "vllm-0.22.0-ab12"],
    }
    # previous as a link to an absolute path; current a directory, not a link: not a venv glmfleet switched to.
    (tmp_path / "previous").symlink_to(tmp_path / "venvs" / "vllm-0.21.0-cd34")
    (tmp_path / "current").unlink()
    (tmp_path / "current").mkdir()
    found = run_fact(VllmVenvs(), root=str(tmp_path), uv=str(tmp_path / "no-uv"))
    assert (found["uv"], found["current"], found["previous"]) == (False, None, "vllm-0.21.0-cd34")
    assert run_fact(VllmVenvs(), root=str(tmp_path / "absent"), uv=str(uv)) == {
        "uv": True,
        "current": None,
        "previous": None,
        "complete": [],
    }


@pytest.mark.parametrize("damage", ["bin/vllm", "lib/vllm-0.22.0.dist-info", "bin/python"])
def test_a_venv_missing_a_file_its_marker_records_is_not_complete(tmp_path, damage):
    """A deleted entry point, package metadata, or interpreter (the link's target gone): rebuilt."""
    venv = tmp_path / "venvs" / "vllm-0.22.0-ab12"
    whole_venv(venv, "bin/python\nbin/vllm\nlib/vllm-0.22.0.dist-info\n")
    assert run_fact(VllmVenvs(), root=str(tmp_path), uv="/nonexistent")["complete"] == ["vllm-0.22.0-ab12"]
    if damage == "bin/python":
        (venv / "bin" / "python").unlink()
        (venv / "bin" / "python").symlink_to(tmp_path / "python-that-was-removed")
    else:
        subprocess.run(["rm", "-r", str(venv / damage)], check=True)
    assert run_fact(VllmVenvs(), root=str(tmp_path), uv="/nonexistent")["complete"] == []


def test_managed_paths_reads_units_as_systemctl_prints_them():
    # Each unit's line, then `systemctl show --property ... -- UNIT` as a fleet host (Debian 12,
    # systemd 252) printed it on 2026-12-07; sshd.service is an alias of ssh.service. The clock
    # line pairs `date +%s.%N` with /proc/uptime, read in the same command.
    shown = ["SubState=running", "DropInPaths=", "UnitFileState=enabled", "NeedDaemonReload=no"]
    output = [
        "clock\t1796638404.203046208\t39.15",
        "unit\tvllm.service",
        "ExecMainStartTimestampMonotonic=38164323",
        *shown,
        "unit\tsshd.service",
        "ExecMainStartTimestampMonotonic=588647",
        *shown,
        "unit\tgone.service",
        "ExecMainStartTimestampMonotonic=0",
        "SubState=dead",
        "DropInPaths=",
        "UnitFileState=",
        "NeedDaemonReload=no",
        "unit\tsystemd-journald.service",
        "ExecMainStartTimestampMonotonic=487657",
        "SubState=running",
        "DropInPaths=/etc/systemd/system/systemd-journald.service.d/a.conf /run/systemd/system/systemd-journald.service.d/b.conf",
        "UnitFileState=static",
        "NeedDaemonReload=yes",
        "unit\tno-systemctl-here.service",
    ]
    units = ManagedPaths().process(output)["units"]
    booted = 1796638404.203046208 - 39.15
    assert units == {
        "vllm.service": {
            "enabled": True,
            "running": True,
            "need_reload": False,
            "dropins": [],
            "started": booted + 38.164323,
        },
        "sshd.service": {
            "enabled": True,
            "running": True,
            "need_reload": False,
            "dropins": [],  # under the name asked for
            "started": booted + 0.588647,
        },
        "gone.service": {"enabled": False, "running": False, "need_reload": False, "dropins": [], "started": None},
        # Static units cannot be enabled: not what a role that enables its unit wants.
        "systemd-journald.service": {
            "enabled": False,
            "running": True,
            "need_reload": True,
            "started": booted + 0.487657,
            "dropins": [
                "/etc/systemd/system/systemd-journald.service.d/a.conf",
                "/run/systemd/system/systemd-journald.service.d/b.conf",
            ],
        },
    }
    assert units["vllm.service"]["started"] == pytest.approx(1796638403.217, abs=0.001)
