"""Every verb's --help and every command line README.md documents, run: a user who types what
the README says gets a parse, not a traceback."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pyinfra.api import State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory

from glmfleet.config import validate_inventory
from glmfleet_cli.main import build_parser
from tests.support.entry_points import metadata_dir
from tests.support.paths import ROOT

BIN = Path(sys.executable).parent
VERBS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("argv", [[], *([verb] for verb in VERBS)], ids=lambda argv: " ".join(argv) or "glmfleet")
def test_every_verb_explains_itself(argv):
    result = subprocess.run([str(BIN / "glmfleet"), *argv, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("usage: glmfleet")


def documented_commands() -> list[str]:
    """The command lines of README.md: its sh blocks, and inline code that starts with a command."""
    readme = (ROOT / "README.md").read_text()
    blocks = [
        line.split("#", 1)[0].strip()
        for block in re.findall(r"```sh\n(.*?)```", readme, re.S)
        for line in block.splitlines()
    ]
    # Inline: a whole command line (a glmfleet verb named in passing is not one).
    inline = re.findall(r"`((?:pyinfra|glmfleet) [^`\s]+ [^`\s][^`]*|make [^`]+|python -m [^`]+)`", readme)
    return sorted({command for command in blocks + inline if command})


def test_readme_documents_commands():
    commands = documented_commands()
    assert {"make demo", "make test"} <= set(commands) and any(c.startswith("glmfleet rollout") for c in commands)


@pytest.mark.parametrize("command", documented_commands())
def test_every_documented_command_line_works_as_written(command, monkeypatch):
    """Run as far as needs no fleet: glmfleet's command lines parse; pyinfra's inventories load
    and validate; make's targets exist; python modules run (--help where they take work)."""
    argv = shlex.split(command)
    monkeypatch.setenv("GLMFLEET_VLLM_API_KEY", "sk-documented")
    if argv[0] == "glmfleet":
        build_parser().parse_args(argv[1:])
    elif argv[0] == "pyinfra":
        monkeypatch.syspath_prepend(str(metadata_dir()))  # the @ansible connector, as pyproject.toml declares it
        with ctx_state.use(State()):
            inventory = make_inventory(argv[1], override_data={}, cwd=str(ROOT))
        if argv[1] != "inventory/local.py":  # local.py lists the fleet's hosts that are up: none here
            assert validate_inventory(inventory)
        assert (ROOT / argv[2]).is_file()
    elif argv[0] == "make":
        assert subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True).returncode == 0
    elif argv[:2] == ["python", "-m"]:
        extra = ["--help"]
        result = subprocess.run(
            [sys.executable, "-m", *argv[2:], *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    else:
        pytest.fail(f"README documents {command!r}, which this test does not know how to run")
