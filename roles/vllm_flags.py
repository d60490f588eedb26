"""vllm_flags: the installed vLLM's own parser checks every flag of the unit's command before
the unit is written, so a typo never takes a serving host down."""

from __future__ import annotations

import hashlib
import json

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server

from glmfleet import FILES
from glmfleet.config import HostConfig, host_config, replica_group
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.gpu import gpu_generation
from glmfleet.groups import ReplicaGroup
from glmfleet.layout import FLAGS_SCRIPT as SCRIPT
from glmfleet.layout import UNIT_PATH
from glmfleet.shell import assignments, join, quote
from roles.nvidia_driver import gpu_question
from roles.vllm_image import image_ref
from roles.vllm_service import FLAG_KEYS, render_unit, serve_args, service_question
from roles.vllm_venv import venv_dir, venv_name, venvs_question

SOURCE = FILES / "check_vllm_flags.py"


OFFLINE = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def guard_argument(cfg: HostConfig, generation: str | None = None, group: ReplicaGroup | None = None) -> list[str]:
    """``--guard`` for the check: the flags glmfleet's keys own and where vllm_extra_args begin,
    so that vLLM's own parser says whether any extra argument, however spelt, sets one of them."""
    owned = sorted({flag for flag in FLAG_KEYS if flag.startswith("--") and flag != "--config"})
    extra_from = len(serve_args(cfg, generation, group)) - len(cfg.vllm_extra_args)
    return ["--guard", json.dumps({"flags": owned, "extra_from": extra_from}, separators=(",", ":"))]


def check_command(cfg: HostConfig, generation: str | None = None, group: ReplicaGroup | None = None) -> str:
    """The pinned vLLM's own python runs the check, offline, on what follows `vllm serve`: the
    venv's, or the image's in a throwaway container without network or GPU."""
    args = [*guard_argument(cfg, generation, group), "--", *serve_args(cfg, generation, group)]
    if cfg.vllm_runtime == "image":
        env = [arg for name, value in OFFLINE.items() for arg in ("--env", f"{name}={value}")]
        docker = [
            "docker",
            "run",
            "--rm",
            "--interactive",
            "--network",
            "none",
            *env,
            "--entrypoint",
            "python3",
            image_ref(cfg),
        ]
        return f"{join([*docker, '-', *args])} < {quote(SCRIPT)}"
    return f"{assignments(OFFLINE)} {join([f'{venv_dir(cfg)}/bin/python', SCRIPT, *args])}"


def questions(cfg: HostConfig) -> dict[str, Question]:
    if cfg.vllm_package != "vllm":
        return {}
    return {
        "service": service_question(cfg),
        "gpu": gpu_question(cfg),
        **({"venvs": venvs_question(cfg)} if cfg.vllm_runtime == "venv" else {}),
    }


@deploy("check vLLM flags")
def vllm_flags():
    """
    Check the rendered ``vllm serve`` command against the pinned vLLM's own argument parser
    (built in-process, so hosts without a working GPU can run it too), in the venv or the
    image: an unknown or malformed flag fails the host with vLLM's message before the running
    unit is replaced.

    Runs only when the unit or the vLLM release would change: a converged host runs nothing.
    A stand-in package (the test double) has no vLLM parser to ask and is not checked.
    """
    cfg = host_config(host)
    if cfg.vllm_package != "vllm":
        return
    answers = ask_together(host, questions(cfg))
    unit = answers["service"]["paths"].get(UNIT_PATH, {})
    generation, group = gpu_generation(answers["gpu"]), replica_group(host)
    if unit.get("sha256") == hashlib.sha256(render_unit(cfg, generation, group).encode()).hexdigest():
        # The unit names the image; a venv switch leaves it alone.
        if cfg.vllm_runtime == "image" or answers["venvs"]["current"] == venv_name(cfg):
            return
    files.put(name="vLLM flag check script", src=str(SOURCE), dest=SCRIPT, mode="755")
    server.shell(
        name=f"vllm serve flags accepted by vLLM {cfg.vllm_version}", commands=[check_command(cfg, generation)]
    )
