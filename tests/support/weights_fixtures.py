"""Fixtures shared by the weights tests and benchmark: a real checkpoint served by a real mirror,
the weights role run alone on fleet hosts, and what a host holds, asked over SSH."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from glmfleet import FILES
from tests.support.fleettools import ROOT, Run, data_args, fleet_host
from tests.support.hub_mirror import OlahServer, publish
from tests.support.model_maker import make_checkpoint

REPO_ID = "glmfleet-test/tiny-glm"
SHARDS = "model-*.safetensors"
SCRIPT = FILES / "glmfleet_weights.py"
HF_CLI = str(Path(sys.executable).with_name("hf"))


@dataclass
class Hub:
    checkpoint: Path
    revision: str
    server: OlahServer

    @property
    def url(self) -> str:
        return self.server.url

    def log_mark(self) -> int:
        return len((self.server.workdir / "olah.log").read_text().splitlines())

    def downloads_since(self, mark: int) -> list[str]:
        """The files GET-resolved since ``mark``: what the mirror served."""
        lines = (self.server.workdir / "olah.log").read_text().splitlines()[mark:]
        return [
            m.group(1) for line in lines if (m := re.search(r'"GET /[^ ]+/resolve/[0-9a-f]{40}/([^ ]+) HTTP', line))
        ]


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    checkpoint = make_checkpoint(root / "checkpoint")
    revision = publish(checkpoint, root / "mirrors", REPO_ID)
    with OlahServer(root / "mirrors", root / "olah") as server:
        yield Hub(checkpoint, revision, server)


def hub_env_file(directory: Path, hub_url: str, **env: str) -> Path:
    """The hub environment file the role writes (root-only on a host): endpoint, token, knobs."""
    path = directory / "hub.env"
    path.write_text(json.dumps({"HF_ENDPOINT": hub_url, **env}))
    path.chmod(0o600)
    return path


def sync_argv(
    directory: Path,
    state: Path,
    hub_url: str,
    revision: str,
    *extra: str,
    repo: str = REPO_ID,
    key: str = "k",
    env: dict | None = None,
) -> list[str]:
    """The host script's sync from the hf source, as the role runs it on a host."""
    return [
        sys.executable,
        str(SCRIPT),
        "sync",
        "--dir",
        str(directory),
        "--state",
        str(state),
        "--key",
        key,
        "--model",
        repo,
        "--revision",
        revision,
        "--source",
        "hf",
        "--cli",
        HF_CLI,
        "--cli-home",
        str(state.parent / "hub-home"),
        "--env-file",
        str(hub_env_file(state.parent, hub_url, **(env or {}))),
        "--progress-interval",
        "2",
        *extra,
    ]


def sync(
    directory: Path,
    state: Path,
    hub_url: str,
    revision: str,
    *extra: str,
    repo: str = REPO_ID,
    timeout: int = 300,
    key: str = "k",
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """The host script's sync from the hf source, run here as the role runs it on a host."""
    return subprocess.run(
        sync_argv(directory, state, hub_url, revision, *extra, repo=repo, key=key, env=env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def inventory(tmp_path: Path, names: list[str]) -> Path:
    """An inventory of the fleet hosts ``names`` (those up)."""
    path = tmp_path / "inventory.py"
    path.write_text(
        "from devfleet.localfleet import inventory_hosts\n"
        f"local_fleet = [(name, data) for name, data in inventory_hosts() if name in {names!r}]\n"
    )
    return path


def deploy_weights(inventory_file: Path, data: dict, background: bool = False, debug: bool = False):
    """tests/support/deploy_weights.py (the weights role alone) with ``data``, as pyinfra runs it."""
    command = [
        str(Path(sys.executable).parent / "pyinfra"),
        "-y",
        "--json",
        *(["--debug"] if debug else []),
        str(inventory_file),
        "tests/support/deploy_weights.py",
        *data_args(data),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if background:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    return Run(completed.returncode, completed.stdout, completed.stderr)


# What a host holds, asked over SSH (the hosts' roots are overlays mounted in namespaces of their own).


def shards(name: str, directory: str) -> dict[str, int]:
    """Shard file name -> inode (a file copied again gets a new one)."""
    out = fleet_host(name).check_output(
        f"find {directory} -maxdepth 1 -name '{SHARDS}' -printf '%f %i\\n' 2>/dev/null || true"
    )
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if line.strip()}


def digests(name: str, directory: str, pattern: str = SHARDS) -> dict[str, str]:
    out = fleet_host(name).check_output(f"cd {directory} && sha256sum {pattern}")
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}
