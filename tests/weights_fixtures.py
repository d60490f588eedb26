"""Fixtures shared by the weights tests and benchmark: a real checkpoint served by a real mirror."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from glmfleet import FILES
from tests.hub_mirror import OlahServer, publish
from tests.model_maker import make_checkpoint

REPO_ID = "glmfleet-test/tiny-glm"
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
        return [m.group(1) for line in lines if (m := re.search(r'"GET /[^ ]+/resolve/[0-9a-f]{40}/([^ ]+) HTTP', line))]


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    checkpoint = make_checkpoint(root / "checkpoint")
    revision = publish(checkpoint, root / "mirrors", REPO_ID)
    with OlahServer(root / "mirrors", root / "olah") as server:
        yield Hub(checkpoint, revision, server)


def sync(directory: Path, state: Path, hub_url: str, revision: str, *extra: str, repo: str = REPO_ID, timeout: int = 300,
         key: str = "k") -> subprocess.CompletedProcess:
    """The host script's sync from the hf source, run here as the role runs it on a host."""
    argv = [sys.executable, str(SCRIPT), "sync", "--dir", str(directory), "--state", str(state), "--key", key,
            "--model", repo, "--revision", revision, "--source", "hf", "--cli", HF_CLI, "--cli-home", str(state.parent / "hub-home"),
            "--env", f"HF_ENDPOINT={hub_url}", "--progress-interval", "2", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
