"""vllm_flags: the installed vLLM's own parser checks every flag of the unit's command before
the unit is written, so a typo never takes a serving host down."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import Sha256File
from pyinfra.operations import files, server

from glmfleet.config import HostConfig, documented, host_config
from glmfleet.facts import VllmVenvs
from roles.vllm_service import UNIT, render_unit, vllm_command
from roles.vllm_venv import uv_path, venv_name

SOURCE = Path(__file__).resolve().parent.parent / "files" / "check_vllm_flags.py"
SCRIPT = "/opt/glmfleet/bin/check-vllm-flags"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"

SETTINGS = ()


def combination_problems(cfg: dict) -> list[str]:
    return []


def check_command(cfg: HostConfig) -> str:
    """The pinned venv's python runs the check (offline, no usage report) on what follows
    `vllm serve` in the unit."""
    python = f"{cfg.vllm_venv_root}/venvs/{venv_name(cfg)}/bin/python"
    return "HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 " + shlex.join([python, SCRIPT, *vllm_command(cfg)[2:]])


@deploy("check vLLM flags")
@documented(SETTINGS)
def vllm_flags():
    """
    Check the rendered ``vllm serve`` command against the pinned vLLM's own argument parser
    (built in-process, so hosts without a working GPU can run it too), between the venv and
    the unit: an unknown or malformed flag fails the host with vLLM's message before the
    running unit is replaced.

    Runs only when the unit or the vLLM release would change: a converged host runs nothing.
    A stand-in package (the test double) has no vLLM parser to ask and is not checked.
    """
    cfg = host_config(host)
    if cfg.vllm_package != "vllm":
        return
    unit_unchanged = host.get_fact(Sha256File, path=UNIT_PATH) == hashlib.sha256(render_unit(cfg).encode()).hexdigest()
    if unit_unchanged and host.get_fact(VllmVenvs, root=cfg.vllm_venv_root, uv=uv_path(cfg))["current"] == venv_name(cfg):
        return
    files.put(name="vLLM flag check script", src=str(SOURCE), dest=SCRIPT, mode="755")
    server.shell(name=f"vllm serve flags accepted by vLLM {cfg.vllm_version}", commands=[check_command(cfg)])
