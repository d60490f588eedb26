"""preflight: what the configuration and the host say cannot work, found before anything changes."""

from __future__ import annotations

import shlex

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.operations import server

from glmfleet import compat
from glmfleet.config import documented, host_config
from glmfleet.facts import ListeningPorts
from roles.vllm_service import UNIT

SETTINGS = ()


def combination_problems(cfg: dict) -> list[str]:
    """The catalog's rules: model against vLLM release, parsers, engine, companions, heads."""
    return compat.combination_problems(cfg)


def fail_command(problems: list[str]) -> str:
    return "; ".join(f"echo {shlex.quote(problem)} >&2" for problem in problems) + "; exit 1"


@deploy("preflight")
@documented(SETTINGS)
def preflight():
    """
    Check the host against the configuration while planning, and stop a host that cannot
    serve it before any of its operations runs; log what runs but is known to go wrong.

    Checks what the host's facts tell: the port vLLM will listen on is free or already ours.
    (GPU count, GPU memory and driver CUDA version go through the same
    ``compat.host_problems`` once the GPU facts exist.)
    """
    cfg = host_config(host)
    for warning in compat.combination_warnings(cfg):
        logger.warning(f"{host.name}: {warning}")
    problems = compat.host_problems(cfg, listeners=host.get_fact(ListeningPorts), own_unit=UNIT)
    if problems:
        server.shell(name="preflight: the host cannot serve this configuration",
                     commands=[fail_command([f"{host.name}: {problem}" for problem in problems])])
