"""The checkout's own entry points (pyproject.toml), for commands the tests run with
PYTHONPATH at the checkout: a venv installed from another commit lacks or differs in them."""

from __future__ import annotations

import functools
import tempfile
import tomllib
from pathlib import Path

from tests.support.paths import ROOT


@functools.cache
def metadata_dir() -> Path:
    """A directory to put on PYTHONPATH ahead of the venv: glmfleet's metadata with the entry points
    pyproject.toml declares (the first distribution of a name on the path is the one Python reads)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = Path(tempfile.mkdtemp(prefix="glmfleet-entry-points-")) / f"glmfleet-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: glmfleet\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
            for group, points in {"console_scripts": project["scripts"], **project["entry-points"]}.items()
        )
    )
    return info.parent
