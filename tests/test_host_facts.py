"""How glmfleet reads hosts cheaply: a fact asked once per host and run, and one command that
tells a role whether its files, units and users are already right (run here for real, with sh)."""

from __future__ import annotations

import hashlib
import os
import subprocess

from pyinfra.api import Config, FactBase, Inventory, State
from pyinfra.api.connect import connect_all

from glmfleet.facts import ManagedPaths, ask


class CountedEcho(FactBase):
    """`echo WORD`; counts how often a host really answered."""

    answered = 0

    def command(self, word: str) -> str:
        return f"echo {word}"

    def process(self, output):
        CountedEcho.answered += 1
        return output


def fake_host(word: str):
    inventory = Inventory(([("@fake/host-1", {"fake_responses": {"echo": [word]}, "fake_delay": 0,
                                               "fake_delay_jitter": 0})], {}))
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
    found = run_fact(ManagedPaths(), paths=[str(tmp_path), str(text), str(empty), str(link), str(tmp_path / "absent")],
                     users=["root", "no-such-user-here"])
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True, check=True).stdout.strip()
    assert found["paths"] == {
        str(tmp_path): {"type": "directory", "user": user, "group": group,
                        "mode": format(os.stat(tmp_path).st_mode & 0o7777, "o"), "sha256": None},
        str(text): {"type": "file", "user": user, "group": group, "mode": "600",
                    "sha256": hashlib.sha256(b"KEY=1\n").hexdigest()},
        str(empty): {"type": "file", "user": user, "group": group, "mode": format(os.stat(empty).st_mode & 0o777, "o"),
                     "sha256": hashlib.sha256(b"").hexdigest()},
        # A link is reported as a link, never as what it points to: it is not the file wanted there.
        str(link): {"type": "symbolic link", "user": user, "group": group, "mode": "777", "sha256": None},
    }
    root_home, root_shell = subprocess.run(["getent", "passwd", "root"], capture_output=True, text=True,
                                           check=True).stdout.strip().split(":")[5:7]
    assert found["users"] == {"root": {"group": "root", "home": root_home, "shell": root_shell}}


def test_managed_paths_reads_units_as_systemctl_prints_them():
    # `systemctl show --property UnitFileState --property SubState`, values sorted by property name
    output = ["unit\tvllm.service\trunning\tenabled", "unit\tnginx.service\tdead\tdisabled",
              "unit\tgone.service\tdead", "unit\tno-systemctl.service\t", "path\t/etc/glmfleet\t"]
    assert ManagedPaths().process(output) == {
        "paths": {},
        "units": {"vllm.service": {"enabled": True, "running": True},
                  "nginx.service": {"enabled": False, "running": False},
                  "gone.service": {"enabled": False, "running": False}},
        "users": {},
    }
