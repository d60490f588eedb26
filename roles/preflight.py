"""preflight: what the configuration and the host say cannot work, found before anything changes."""

from __future__ import annotations

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.operations import server

from glmfleet import compat
from glmfleet.config import HostConfig, host_config, replica_group
from glmfleet.facts.engine import Question, ask_together
from glmfleet.facts.gpu import gpu_generation
from glmfleet.facts.network import ListeningPorts, NetworkInterfaces
from glmfleet.layout import UNIT
from glmfleet.shell import fail_with
from roles.nvidia_driver import driver_problems, gpu_question


def combination_problems(cfg: dict, groups: frozenset[str] = frozenset()) -> list[str]:
    """The catalog's rules: model against vLLM release, parsers, engine, companions, heads."""
    return compat.combination_problems(cfg)


def gpu_facts(gpu: dict) -> dict:
    """compat.host_problems' GPU arguments from the GpuHost fact: None (not known, not checked)
    while no driver answers, e.g. before the driver role installed one."""
    smi = gpu["smi"] or []
    memory = [card["memory_mib"] for card in smi if card["memory_mib"]]
    return {
        "gpu_count": len(smi) or None,
        "gpu_memory_mib": min(memory, default=None),
        "gpu_generation": gpu_generation(gpu),
        "driver_cuda_version": gpu["cuda_version"],
    }


def questions(cfg: HostConfig) -> dict[str, Question]:
    asked = {"gpu": gpu_question(cfg), "listeners": Question(ListeningPorts, {"port": cfg.vllm_port})}
    if cfg.vllm_group_interface:
        asked["interfaces"] = Question(NetworkInterfaces, {})
    return asked


def fail_command(problems: list[str]) -> str:
    return fail_with(*problems)


@deploy("preflight")
def preflight():
    """
    Check the host against the configuration while planning, and stop a host that cannot
    serve it before any of its operations runs; log what runs but is known to go wrong.

    Checks what the host's facts tell: enough GPUs for tensor × pipeline parallel, weights and
    one full-length sequence of KV cache within ``vllm_gpu_memory_utilization`` of the smallest
    GPU, a driver for the CUDA of the pinned vLLM's torch (all three once a driver answers),
    the port vLLM will listen on free or already ours, and that the driver role can install the
    wanted driver (``nvidia_driver.driver_problems``: distro, Secure Boot, the branch offered).
    """
    cfg = host_config(host)
    answers = ask_together(host, questions(cfg))
    gpus = gpu_facts(answers["gpu"])
    for warning in compat.combination_warnings(cfg) + compat.host_warnings(
        cfg, driver_cuda_version=gpus["driver_cuda_version"]
    ):
        logger.warning(f"{host.name}: {warning}")
    group = replica_group(host)
    problems = compat.host_problems(
        cfg,
        **gpus,
        listeners=answers["listeners"],
        own_unit=UNIT,
        group_hosts=group.size if group else 1,
        interfaces=answers.get("interfaces"),
    )
    if cfg.nvidia_driver_source != "none":
        problems += driver_problems(cfg, answers["gpu"])
    if problems:
        server.shell(
            name="preflight: the host cannot serve this configuration",
            commands=[fail_command([f"{host.name}: {problem}" for problem in problems])],
        )
